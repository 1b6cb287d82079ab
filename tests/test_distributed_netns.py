"""Two "machines": network namespaces joined by a veth pair, gloo over TCP between them.

The test creates the namespaces (root and ``ip`` needed; skipped with the reason otherwise), runs
a rank in each, and checks the distributed result across "hosts"; stops a rank mid-run (every
live rank must exit 4 within the timeout with one line naming it); and cuts the link for longer
than the timeout, then restores it, under ``torchrun --max-restarts 1`` on each host: the ranks name
each other, torchrun's agents re-form the group, and the run resumes from its last checkpoint and
ends bitwise where an uninterrupted run ends."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from test_distributed import one_thread
from test_distributed_cli import ROOT, SMALL, final_tensors, free_port, launch, make_env, torch_equal, wait_all, wait_for

import dgl_fast
from helpers import sgd, small_model

_ADDR = ("10.77.0.1", "10.77.0.2")


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@pytest.fixture
def hosts():
    """Two namespaces ``(a, b)`` with veth ends ``va`` (10.77.0.1) and ``vb`` (10.77.0.2)."""
    tag = f"{os.getpid() % 100000}"
    a, b, va, vb = f"dgla{tag}", f"dglb{tag}", f"dgva{tag}", f"dgvb{tag}"
    try:
        _ip("netns", "add", a)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot create network namespaces here: {getattr(exc, 'stderr', exc)}")
    try:
        _ip("netns", "add", b)
        _ip("link", "add", va, "type", "veth", "peer", "name", vb)
        for ns, dev, addr in ((a, va, _ADDR[0]), (b, vb, _ADDR[1])):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield a, b, va, vb
    finally:
        _ip("netns", "del", a, check=False)
        _ip("netns", "del", b, check=False)


_SCRIPT = textwrap.dedent("""
    import datetime, os, sys, torch, torch.distributed as dist
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from helpers import batches, sgd, small_model
    from dgl_fast.distributed import DistributedDGL
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    ddgl = DistributedDGL(small_model(4, seed=3), optimizer=sgd, placement=[0, 0, 1, 1], timeout=30)
    data = batches(4, seed=2) if ddgl.feeds else None
    ddgl.fit(data, epochs=2, lr_schedule=lambda e: 0.5 ** e)
    state = ddgl.full_state_dict()
    if dist.get_rank() == 0:
        torch.save(state, {out!r})
    dist.destroy_process_group()
""")


def test_two_hosts_equal_one_process(hosts, tmp_path):
    a, b, va, vb = hosts
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT.format(tests=os.path.join(ROOT, "tests"), out=str(tmp_path / "state.pt")))
    port = free_port()
    procs = []
    for rank, (ns, dev) in enumerate(((a, va), (b, vb))):
        env = make_env(RANK=rank, WORLD_SIZE=2, MASTER_ADDR=_ADDR[0], MASTER_PORT=port, GLOO_SOCKET_IFNAME=dev)
        procs.append(subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(script)], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for rc, _, err in wait_all(procs, timeout=240):
        assert rc == 0, err[-3000:]
    from helpers import batches

    ref = dgl_fast.Trainer(small_model(4, seed=3), optimizer=sgd, engine="sequential", channels_last=False)
    with one_thread():
        ref.fit(batches(4, seed=2), epochs=2, lr_schedule=lambda e: 0.5 ** e, progress=False)
    got = torch.load(tmp_path / "state.pt")
    for k, v in ref.model.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)


def test_a_stopped_rank_on_the_other_host_stops_rank_0_within_the_timeout(hosts, tmp_path):
    a, b, va, vb = hosts
    timeout = 6
    args = [*SMALL, "--epochs", "500", "--timeout", str(timeout)]
    procs = launch([args, args], addr=_ADDR[0], prefix=[["ip", "netns", "exec", a], ["ip", "netns", "exec", b]],
                   ifname=[va, vb], logs=tmp_path)
    errs = [tmp_path / f"err{r}" for r in range(2)]
    try:
        assert all(wait_for(e, " on cpu", 90) for e in errs), [open(e).read()[-1000:] for e in errs]
        time.sleep(1.5)  # training under way
        assert all(p.poll() is None for p in procs), [open(e).read()[-2000:] for e in errs]
        os.kill(procs[1].pid, signal.SIGSTOP)  # ip netns exec execs python: this is rank 1
        live = [0]
        for r in live:
            procs[r].wait(timeout=10 * timeout)  # a hang fails here; the message says it was the timeout
        for r in live:
            err = open(errs[r]).read()
            assert procs[r].returncode == 4, err[-2000:]
            line = err.strip().splitlines()[-1]
            assert line.startswith(f"error: rank {r} (stage") and f"rank {1 - r} (stage" in line, line
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_link_cut_longer_than_the_timeout_restarts_and_finishes_as_uninterrupted(hosts, tmp_path,
                                                                                    uninterrupted_2_ranks):
    """One torchrun agent per host (c10d rendezvous hosted on host a), ``--max-restarts 1``; the
    link goes down right after epoch 1 for 10 s (timeout 6 s), then up again. Both ranks name each
    other and exit 4; the agents re-form the group once the link is back (host b's agent restarts its
    rank as a re-join, with torchrun's restart count unchanged: dgl_fast numbers the attempts itself),
    and the run resumes from epoch 1's checkpoint and ends bitwise where the uninterrupted run ends."""
    a, b, va, vb = hosts
    timeout, port, out = 6, free_port(), tmp_path / "run"
    procs = []
    for host, (ns, dev, addr) in enumerate(((a, va, _ADDR[0]), (b, vb, _ADDR[1]))):
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{_ADDR[0]}:{port}",
               "--rdzv-id", "cut", "--rdzv-conf", f"is_host={host == 0}", "--local-addr", addr, "--max-restarts", "1",
               "--log-dir", str(tmp_path / f"logs{host}"), "--redirects", "2", "--tee", "2",
               "-m", "dgl_fast", "train", "--distributed", *SMALL, "--epochs", "3", "--timeout", str(timeout),
               "--out", str(out)]
        procs.append(subprocess.Popen(cmd, env=make_env(GLOO_SOCKET_IFNAME=dev), cwd=ROOT, text=True,
                                      stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"agent{host}", "w")))
    agents = [tmp_path / f"agent{h}" for h in range(2)]
    try:
        metrics, end = out / "metrics.jsonl", time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and time.monotonic() < end:
            time.sleep(0.05)
        assert all(p.poll() is None for p in procs), [x.read_text()[-2000:] for x in agents]
        _ip("-n", b, "link", "set", vb, "down")  # epoch 2 under way: every exchange stops here
        time.sleep(10)  # longer than the timeout: both ranks give up on the other
        _ip("-n", b, "link", "set", vb, "up")
        for p in procs:
            p.wait(timeout=180)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = [x.read_text() for x in agents]
    assert [p.returncode for p in procs] == [0, 0], [x[-3000:] for x in logs]
    for log in logs:  # each rank's line names the other (the first attempt's, kept by --tee)
        named = re.findall(r"error: rank (\d) \(stages? [\d-]+\): .*rank (\d) \(stages? [\d-]+\).*timeout", log)
        assert len(named) == 1 and {int(x) for x in named[0]} == {0, 1}, log[-3000:]
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    restarts = [x for x in lines if x.get("event") == "restart"]
    assert len(restarts) == 1 and restarts[0]["restart"] == 1 and restarts[0]["resumed_from_epoch"] in (1, 2), lines
    (e, got), (e_ref, ref) = final_tensors(out / "checkpoint"), uninterrupted_2_ranks
    assert e == e_ref == 3 and got.keys() == ref.keys()
    for k in ref:  # sync mode: the restarted run's final parameters are the uninterrupted run's, bitwise
        assert torch_equal(got[k], ref[k]), k
