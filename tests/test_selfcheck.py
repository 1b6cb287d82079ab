"""``python -m dgl_fast check``: the self-check passes on this build, and fails loudly when an op is broken."""

import json
import os
import subprocess
import sys

import pytest
import torch

import dgl_fast
from dgl_fast import ops, selfcheck

ROWS = [*selfcheck.CHECKS, "bench"]


def _row(out: str, name: str) -> list[str]:
    """The table row of check ``name``: [name, status, ...]."""
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == [name]]
    assert len(rows) == 1, f"expected one row for {name} in:\n{out}"
    return rows[0]


def test_check_command_on_cpu_passes(tmp_path):
    # the process users run (CI: the CPU paths), with a short benchmark
    report = tmp_path / "selfcheck.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(dgl_fast.__file__)), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-m", "dgl_fast", "check", "--device", "cpu", "--bench-seconds", "0.5",
                          "--json", str(report)], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    for name in ROWS:
        assert _row(res.stdout, name)[1] == "ok", res.stdout
    assert f"{len(ROWS)} ok, 0 FAIL, 0 skipped" in res.stdout
    assert res.stdout.strip().splitlines()[-1] == "self-check passed"
    rep = json.loads(report.read_text())
    assert [c["name"] for c in rep["checks"]] == ROWS and {c["status"] for c in rep["checks"]} == {"ok"}
    assert rep["exit_status"] == 0 and rep["counts"] == {"ok": len(ROWS), "FAIL": 0, "skipped": 0}
    assert rep["environment"]["torch"] == torch.__version__ and rep["environment"]["build"] == dgl_fast.build_config()
    assert rep["environment"]["tf32_matmul"] is False and rep["environment"]["tf32_cudnn"] is False
    by_name = {c["name"]: c for c in rep["checks"]}
    assert "emulated" in by_name["graph"]["detail"] and "pipeline engine" in by_name["streams"]["detail"]
    assert "recorded streams" in by_name["async_buffer"]["detail"]
    step, head = by_name["bench"]["data"]["step"], by_name["bench"]["data"]["head"]
    assert step["dgl_ms"] > 0 and step["backprop_ms"] > 0 and head["fused_us"] > 0 and head["reference_us"] > 0


def test_a_broken_op_fails_the_check(monkeypatch, tmp_path, capsys):
    # a softmax_xent whose loss is off by one part in 1e8: far below float32 noise, far above float64's
    real = ops.softmax_xent

    def broken(logits, labels):
        loss, correct = real(logits, labels)
        return loss * (1 + 1e-8), correct

    monkeypatch.setattr(ops, "softmax_xent", broken)
    report = tmp_path / "r.json"
    code = selfcheck.main(["--device", "cpu", "--no-bench", "--only", "env,op", "--json", str(report)])
    out = capsys.readouterr().out
    assert code == 1
    row = _row(out, "op:softmax_xent")
    assert row[1] == "FAIL" and "loss [7, 13]: max |difference|" in " ".join(row), out
    for name in ("env", "op:aux_pool", "op:replay_sample", "op:linear_bn_relu", "op:bn_update_stats"):
        assert _row(out, name)[1] == "ok"
    assert _row(out, "graph")[1] == "skipped" and _row(out, "bench")[1] == "skipped"
    assert out.strip().splitlines()[-1] == "self-check FAILED: op:softmax_xent"
    rep = json.loads(report.read_text())
    assert rep["exit_status"] == 1 and rep["counts"]["FAIL"] == 1


def test_an_exception_in_one_check_does_not_stop_the_others(monkeypatch):
    def raising(*args, **kwargs):
        raise RuntimeError("kernel launch failed\nsecond line")

    monkeypatch.setattr(ops, "aux_pool", raising)
    seen = []
    results = selfcheck.run_checks("cpu", only=["op"], bench_seconds=None, on_result=seen.append)
    assert seen == results and [r.name for r in results] == ROWS
    bad = [r for r in results if r.status == "FAIL"]
    assert [r.name for r in bad] == ["op:aux_pool"]
    assert bad[0].detail.startswith("RuntimeError at test_selfcheck.py:")
    assert "kernel launch failed second line" in bad[0].detail
    assert all(r.status == "ok" for r in results if r.name.startswith("op:") and r.name != "op:aux_pool")
    assert "\n" not in bad[0].detail  # one line in the table


@pytest.mark.parametrize("argv,message", [
    (["--only", "nope"], "error: argument --only: unknown checks ['nope']"),
    (["--device", "tpu"], "error: argument --device: expected cpu, cuda or cuda:N, got 'tpu'"),
    (["--bench-seconds", "0"], "error: argument --bench-seconds: expected a number > 0 (or --no-bench), got 0.0"),
])
def test_bad_options(argv, message, capsys):
    assert selfcheck.main(argv) == 2
    assert capsys.readouterr().err.startswith(message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report of a machine without a GPU")
def test_cuda_without_a_gpu_fails_with_the_reason(capsys):
    assert selfcheck.main(["--device", "cuda", "--no-bench"]) == 1
    out = capsys.readouterr().out
    assert _row(out, "env")[1] == "FAIL" and "torch.cuda.is_available() is False" in out
    assert _row(out, "op:softmax_xent")[1] == "skipped" and "no CUDA device visible" in out


@pytest.mark.cuda
def test_check_on_gpu_passes():
    results = selfcheck.run_checks("cuda", bench_seconds=1.0)
    assert [r.status for r in results] == ["ok"] * len(ROWS), selfcheck.format_table(results)
