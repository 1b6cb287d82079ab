"""Two "machines": network namespaces joined by a veth pair, gloo over TCP between them.

The test creates the namespaces (root and ``ip`` needed; skipped with the reason otherwise), runs
a rank in each, and checks the distributed result across "hosts", then cuts the link or stops a
rank mid-run: every live rank must exit non-zero within the timeout with one line naming it."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from test_distributed import one_thread
from test_distributed_cli import ROOT, SMALL, launch, wait_all, wait_for

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
    from test_distributed_cli import free_port, make_env

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


@pytest.mark.parametrize("fault", ["link down", "SIGSTOP"])
def test_cut_link_or_stopped_rank_stops_every_host(hosts, tmp_path, fault):
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
        if fault == "link down":
            _ip("-n", a, "link", "set", va, "down")
            live = [0, 1]
        else:
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
