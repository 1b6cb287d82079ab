import subprocess
import sys

import pytest
import simt_background
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_configure(config):
    # Every CUDA test compares with a reference: no TF32 products (cuBLAS, cuDNN), no cuDNN
    # algorithm search, deterministic cuDNN kernels, so results differ only for real reasons.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)


def pytest_collection_finish(session):
    # test_simt.py's builds and its AddressSanitizer run start now, beside the other files
    simt_background.start_for([item.nodeid for item in session.items])


def pytest_sessionfinish(session, exitstatus):
    simt_background.stop_all()


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    return torch.device(request.param)


@pytest.fixture(scope="session")
def uninterrupted_2_ranks(tmp_path_factory):
    """``(epoch, final tensors)`` of an uninterrupted torchrun run of 2 ranks, 3 epochs of SMALL:
    what runs resumed or restarted with these arguments must end with, bitwise (sync mode)."""
    from test_distributed_cli import ROOT, SMALL, final_tensors, free_port, make_env  # noqa: PLC0415

    out = tmp_path_factory.mktemp("uninterrupted")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "dgl_fast", "train", "--distributed", *SMALL, "--epochs", "3", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=make_env(), cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return final_tensors(out / "checkpoint")
