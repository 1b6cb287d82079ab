"""``python -m dgl_fast train --distributed`` as users launch it: torchrun, ranks launched with
different arguments, a rank stopped (SIGSTOP) or killed mid-run, a resumed run."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--data", "synthetic", "--in-size", "8", "--model", "aux-study", "--depth", "3", "--width", "8", "--aux", "mlp",
          "--batch-size", "64", "--no-progress"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # as torchrun sets it: several ranks on a few cores
    env.update({k: str(v) for k, v in extra.items()})
    return env


def launch(per_rank_args: list[list[str]], addr: str = "127.0.0.1", prefix=None, ifname=None, logs=None):
    """One process per rank, started as torchrun would (RANK, WORLD_SIZE, MASTER_ADDR/PORT set),
    but each on its own so that the test sees every rank's exit status. ``prefix`` (per rank)
    wraps a command (``ip netns exec NS``); with ``logs`` (a folder) stderr goes to ``logs/errN``."""
    port, world = free_port(), len(per_rank_args)
    procs = []
    for rank, args in enumerate(per_rank_args):
        env = make_env(RANK=rank, LOCAL_RANK=0 if prefix else rank, WORLD_SIZE=world, MASTER_ADDR=addr, MASTER_PORT=port)
        if ifname:
            env["GLOO_SOCKET_IFNAME"] = ifname[rank]
        cmd = (prefix[rank] if prefix else []) + [sys.executable, "-m", "dgl_fast", "train", "--distributed", *args]
        err = open(os.path.join(logs, f"err{rank}"), "w") if logs else subprocess.PIPE
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL if logs else subprocess.PIPE,
                                      stderr=err, text=True))
    return procs


def wait_all(procs, timeout=240):
    out = []
    for p in procs:
        o, e = p.communicate(timeout=timeout)
        out.append((p.returncode, o, e))
    return out


def test_torchrun_trains_checkpoints_and_resumes(tmp_path, uninterrupted_2_ranks):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "dgl_fast", "train", "--distributed", *SMALL, "--epochs", "2", "--out", str(tmp_path / "a")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=make_env(), cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "held-out accuracy (synthetic, 2 ranks)" in res.stdout
    assert res.stdout.count("held-out accuracy") == 1  # rank 0 alone prints
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert sorted(set(summary["placement"])) == [0, 1] and summary["epochs_done"] == 2
    assert all(n > 0 for n in summary["train"][-1]["stage_samples"])
    assert 0 <= summary["test_acc"] <= 1 and len(summary["test_acc_per_stage"]) == 3
    ckpt = tmp_path / "a" / "checkpoint"
    assert json.loads((ckpt / "manifest.json").read_text())["epoch"] == 2  # one DCP set for the whole grid
    # what a resume is checked against (refusals: tests/test_cli_errors.py, test_silent2.py)
    meta = json.loads((ckpt / "epoch-00002" / "meta.json").read_text())
    assert meta["lr_factors"] == [1.0, 1.0] and meta["run_options"]["--lr-step"] == 15
    assert meta["run_options"]["--batch-size"] == 64 and meta["run_options"]["--seed"] == 0
    # a resumed run continues the same training: 2 -> 3 epochs
    cmd2 = cmd[:-4] + ["--epochs", "3", "--out", str(tmp_path / "b"), "--resume", str(ckpt)]
    res = subprocess.run(cmd2, capture_output=True, text=True, timeout=300, env=make_env(), cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert resumed["epochs_done"] == 3 and resumed["this_run"] == 1
    assert resumed["train"][:2] == summary["train"][:2]
    (e, got), (e_ref, ref) = final_tensors(tmp_path / "b" / "checkpoint"), uninterrupted_2_ranks
    assert e == e_ref == 3 and got.keys() == ref.keys()
    for k in ref:  # 2 epochs + 1 resumed: the uninterrupted 3 epochs' parameters, bitwise
        assert torch_equal(got[k], ref[k]), k


def _image_tree(root, seed):
    import numpy as np  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in ("ant", "bee"):
            os.makedirs(root / split / c)
            for i in range(3):  # sizes differ between the seeds' trees, names and counts do not
                Image.fromarray(rng.integers(0, 256, (9, 10 + seed, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return str(root)


def test_mismatched_launches_refuse_on_every_rank(tmp_path):
    # two image folders of one shape (names, counts, classes) but other files: the content fingerprint differs
    trees = [_image_tree(tmp_path / f"tree{seed}", seed) for seed in range(2)]
    differ = {"--width": ("8", "12"), "--seed": ("0", "1"), "--epochs": ("2", "3"), "--data-dir": tuple(trees)}
    base = [x for x in SMALL if x not in ("--data", "synthetic")] + ["--data", "imagefolder"]
    per_rank = [base + [x for flag, v in differ.items() for x in (flag, v[rank])] for rank in range(2)]
    for rc, _, err in wait_all(launch(per_rank), timeout=120):
        assert rc == 2, err[-2000:]
        line = err.strip().splitlines()[-1]
        assert line.startswith("error: the 2 ranks were launched with different configurations and refuse to start")
        for flag, (a, b) in differ.items():
            if flag == "--data-dir":  # where the data lies may differ between machines; what it holds may not
                assert "training data (('imagefolder', " in line and "held-out data (('imagefolder', (6, 3, '" in line, line
                continue
            assert f"{flag} ({a!r} on rank 0; {b!r} on rank 1)" in line or f"{flag} ({a} on rank 0; {b} on rank 1)" \
                in line, (flag, line)


def test_a_rank_failing_its_start_up_is_named_by_every_rank(tmp_path):
    timeout = 20
    args = [x for x in SMALL if x not in ("--data", "synthetic")] + ["--data", "imagefolder", "--timeout", str(timeout)]
    per_rank = [args + ["--data-dir", _image_tree(tmp_path / "tree", 0)], args + ["--data-dir", str(tmp_path / "none")]]
    # a hang fails at wait_all's bound (10 x --timeout); no wall-clock assertion (machine noise): rank 0
    # naming rank 1's own reason shows it heard of the failure rather than timing out
    results = wait_all(launch(per_rank), timeout=10 * timeout)
    for rank, (rc, _, err) in enumerate(results):  # before: rank 0 waited, then a raw DistStoreError
        assert rc == 2, err[-2000:]
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"error: rank {rank}: rank 1 failed its start-up: imagefolder expects "
                               f"{tmp_path / 'none' / 'train'}/<class>/<image> folders"), line


def wait_for(proc_err_path, text, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if text in open(proc_err_path).read():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("fault", ["SIGSTOP", "SIGKILL"])
def test_a_stalled_or_dead_rank_stops_the_others_within_the_timeout(tmp_path, fault):
    timeout = 6
    args = [*SMALL, "--epochs", "500", "--timeout", str(timeout)]
    procs = launch([args] * 3, logs=tmp_path)
    errs = [tmp_path / f"err{rank}" for rank in range(3)]
    try:
        assert all(wait_for(e, " on cpu", 90) for e in errs), [open(e).read()[-1000:] for e in errs]
        time.sleep(1.5)  # training under way
        victim = procs[1]
        os.kill(victim.pid, getattr(signal, fault))
        for rank in (0, 2):  # a hang fails here; the message below says it was the timeout (no wall-clock bound)
            procs[rank].wait(timeout=10 * timeout)
        for rank in (0, 2):
            assert procs[rank].returncode == 4, open(errs[rank]).read()[-2000:]
            line = open(errs[rank]).read().strip().splitlines()[-1]
            assert line.startswith(f"error: rank {rank} (stage {rank + 1})"), line
            # wherever the fault lands (a link to the victim, or a gather of every rank after a roll call)
            assert "rank 1 (stage 2)" in line, line
            what = "no answer within the timeout" if fault == "SIGSTOP" else "the connection closed"
            assert what in line, line
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _workers(parent: int) -> dict:
    """RANK -> pid of torchrun's worker processes (its children with RANK in their environment)."""
    found = {}
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == parent:
                env = dict(e.split("=", 1) for e in open(f"/proc/{pid}/environ").read().split("\0") if "=" in e)
                if "RANK" in env:
                    found[int(env["RANK"])] = int(pid)
        except (OSError, ValueError, IndexError):
            continue
    return found


def final_tensors(ckpt):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save  # noqa: PLC0415

    epoch = json.loads((ckpt / "manifest.json").read_text())["epoch"]
    dcp_to_torch_save(str(ckpt / f"epoch-{epoch:05d}"), str(ckpt.parent / "final.pt"))
    import torch  # noqa: PLC0415

    return epoch, torch.load(ckpt.parent / "final.pt")


def test_a_rank_killed_under_max_restarts_resumes_and_finishes_as_uninterrupted(tmp_path, uninterrupted_2_ranks):
    """The uninterrupted run it is compared with has 2 ranks: in sync mode the grid's parameters do
    not depend on how the stages are placed, so 3 ranks end bitwise where 2 do (measured once
    by hand, and this test checks it each time)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3", "--max-restarts", "1",
           "--master-port", str(free_port()), "-m", "dgl_fast", "train", "--distributed", *SMALL, "--epochs", "3",
           "--timeout", "20", "--out", str(tmp_path / "b")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=make_env(), cwd=ROOT)
    try:
        metrics, end = tmp_path / "b" / "metrics.jsonl", time.monotonic() + 240
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and time.monotonic() < end:
            time.sleep(0.05)  # epoch 1 and its checkpoint are complete: kill rank 1 in epoch 2
        os.kill(_workers(proc.pid)[1], signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    restarts = [x for x in lines if x.get("event") == "restart"]
    assert len(restarts) == 1 and restarts[0]["restart"] == 1 and restarts[0]["resumed_from_epoch"] in (1, 2), lines
    assert "restart 1 (torchrun --max-restarts): a rank of the previous attempt failed" in err
    assert [x["epoch"] for x in lines if "epoch" in x] == [1, 2, 3] or restarts[0]["resumed_from_epoch"] == 2
    (ea, a), (eb, b) = uninterrupted_2_ranks, final_tensors(tmp_path / "b" / "checkpoint")
    assert ea == eb == 3 and a.keys() == b.keys()
    for k in a:  # sync mode: the restarted run's final parameters are the uninterrupted run's, bitwise
        assert torch_equal(a[k], b[k]), k


def test_a_rank_killed_under_max_restarts_0_stops_every_rank_with_exit_4(tmp_path):
    """No restart left: torchrun stops the other ranks (SIGTERM); each says so in one line naming
    itself and exits 4, as for a peer lost within --timeout, and torchrun fails the run."""
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3", "--max-restarts", "0",
           "--master-port", str(free_port()), "--log-dir", str(logs), "--redirects", "2", "-m", "dgl_fast", "train",
           "--distributed", *SMALL, "--epochs", "500", "--timeout", "60", "--out", str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=make_env(), cwd=ROOT)
    try:
        metrics, end = tmp_path / "run" / "metrics.jsonl", time.monotonic() + 240
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and time.monotonic() < end:
            time.sleep(0.05)
        os.kill(_workers(proc.pid)[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)  # well before --timeout: torchrun's stop, not the ranks' own wait
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, err[-3000:]
    for rank in (0, 2):
        (log,) = logs.glob(f"*/attempt_0/{rank}/stderr.log")
        line = log.read_text().strip().splitlines()[-1]
        # whichever comes first: torchrun's stop, or the rank's own finding that rank 1's connection closed
        assert line.startswith(f"error: rank {rank} (stage {rank + 1}): "), line
        assert ("stopped by torchrun (SIGTERM): another rank of this attempt failed" in line
                or ("rank 1 (stage 2)" in line and "the connection closed" in line)), line
    for rank in (0, 2):  # torchrun's failure summary: each survivor's exit status
        assert re.search(rf"rank\s*:\s*{rank} \(local_rank: {rank}\)\s*exitcode\s*:\s*4\b", err), err[-3000:]
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*exitcode\s*:\s*-9\b", err), err[-3000:]


def test_torchruns_stop_of_a_rank_is_one_line_and_exit_4(tmp_path):
    """The stop itself, without a race against the rank's own finding: torchrun's SIGTERM to a rank
    busy training (a one-rank run) is taken by the rank's watcher thread at once, even inside a
    C++ wait: one line naming the rank, exit 4 (not the default SIGTERM death, nor torchrun's
    SIGKILL 30 s later)."""
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", str(free_port()),
           "--log-dir", str(logs), "--redirects", "2", "-m", "dgl_fast", "train", "--distributed", *SMALL,
           "--epochs", "500", "--out", str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=make_env(), cwd=ROOT)
    try:
        metrics, end = tmp_path / "run" / "metrics.jsonl", time.monotonic() + 240
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and time.monotonic() < end:
            time.sleep(0.05)
        os.kill(_workers(proc.pid)[0], signal.SIGTERM)
        _, err = proc.communicate(timeout=25)  # before torchrun would SIGKILL it (30 s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (log,) = logs.glob("*/attempt_0/0/stderr.log")
    line = log.read_text().strip().splitlines()[-1]
    assert line == ("error: rank 0 (stages 1-3): stopped by torchrun (SIGTERM): another rank of this attempt failed; "
                    "torchrun restarts the run from the last checkpoint while --max-restarts allows"), line
    assert re.search(r"rank\s*:\s*0 \(local_rank: 0\)\s*exitcode\s*:\s*4\b", err), err[-3000:]


def torch_equal(x, y) -> bool:
    import torch  # noqa: PLC0415

    return torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


@pytest.mark.cuda
def test_nccl_one_rank_per_gpu(tmp_path):
    """The GPU machine: NCCL with one rank per visible GPU (one GPU: start-up, agreement, the gloo
    control group, training, evaluation and checkpoints on NCCL; two or more: the messages too)."""
    import torch

    n = torch.cuda.device_count()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port", str(free_port()),
           "-m", "dgl_fast", "train", "--distributed", "--device", "cuda", *SMALL, "--epochs", "2", "--timeout", "60",
           "--out", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=make_env(), cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["epochs_done"] == 2 and summary["ranks"] == n
    assert json.loads((tmp_path / "checkpoint" / "manifest.json").read_text())["epoch"] == 2
