"""Benchmarks stay runnable: a quick smoke run of each on this machine's device (no files written),
from the package (dgl_fast.bench), with their results under the current directory or --out-dir."""

import importlib
import json
import os
import pkgutil

import pytest

from dgl_fast import bench, cli
from dgl_fast.bench.common import md_table


def test_bench_replay_buffer_quick(capsys):
    assert cli.main(["bench", "replay_buffer", "--quick", "--no-write", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "Device copy ceiling measured in this run" in out and "stage-steps/s" in out


def test_bench_aux_head_quick(capsys):
    assert cli.main(["bench", "aux_head", "--quick", "--no-write", "--device", "cpu", "--kinds", "mlp-sr,last"]) == 0
    out = capsys.readouterr().out
    assert "fused eager" in out and out.count("| mlp-sr |") == 2 and out.count("| last |") == 2


def test_bench_aux_head_sets_and_states_tf32(tmp_path, monkeypatch):
    import torch  # noqa: PLC0415

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert cli.main(["bench", "aux_head", "--quick", "--device", "cpu", "--out-dir", str(tmp_path)]) == 0
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    payload = json.loads((tmp_path / "aux_head-cpu.json").read_text())
    assert payload["tf32"] == {"cuda.matmul.allow_tf32": False, "cudnn.allow_tf32": False}
    assert "TF32: torch.backends.cuda.matmul.allow_tf32 = False, torch.backends.cudnn.allow_tf32 = False" in (
        tmp_path / "aux_head-cpu.md").read_text()


def test_bench_overlap_quick(capsys):
    assert cli.main(["bench", "overlap", "--quick", "--no-write", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| aux-study-k3 | 3 | 8 | fp32 |" in out and "dgl_pipeline_cpu" in out


def test_bench_accuracy_quick(capsys):
    assert cli.main(["bench", "accuracy", "--quick", "--no-write"]) == 0
    out = capsys.readouterr().out
    assert "| dgl |" in out and "| backprop |" in out and "| dgl-nchw |" in out and "| dgl-bf16 |" in out
    # the default layout is channels_last on an x86 CPU with oneDNN, and the NCHW variant is NCHW
    import dgl_fast

    cpu = dgl_fast.cpu_features()
    fast = cpu["onednn"] and cpu["arch"] in ("x86_64", "AMD64")
    assert ("| dgl | --mode dgl | channels_last |" in out) == fast
    assert "| dgl-nchw | --mode dgl --no-channels-last | NCHW |" in out


def test_bench_step_quick(capsys):
    assert cli.main(["bench", "step", "--quick", "--no-write", "--variants", "DGL fp32 NCHW,DGL bf16 + channels_last"]) == 0
    out = capsys.readouterr().out
    assert "| authors' way (DGL, NCHW fp32) |" in out and "| DGL fp32 NCHW |" in out
    assert "| DGL bf16 + channels_last |" in out and "| backprop fp32 NCHW |" not in out
    assert cli.main(["bench", "step", "--quick", "--no-write", "--variants", "nosuch"]) == 2


def test_bench_memory_quick(capsys):
    assert cli.main(["bench", "memory", "--quick", "--no-write"]) == 0
    out = capsys.readouterr().out
    assert "| aux-study-k3 | 3 | 8 | fp32 |" in out and "| aux-study-k3 | 3 | 8 | bf16 |" in out


def test_bench_scaling_quick(capsys):
    assert cli.main(["bench", "scaling", "--quick", "--no-write", "--world", "2"]) == 0
    out = capsys.readouterr().out
    assert "## Stage profile (measured)" in out and "| 2 | [0, 0, 1, 1] |" in out
    assert "## gloo processes on the CPU" in out and "Not measured: this machine has" in out
    assert "## Replicas on gloo (measured)" in out and "| DDP, bucketed (this run) |" in out


def test_bench_scaling_replicas_counts_buckets_not_tensors(tmp_path, capsys):
    """The replicas section counts what DDP sends: per step one all-reduce per bucket (the quick
    net's 4 stages, one bucket each, against its 68 parameter tensors), every gradient byte once,
    and one all-gather of the rows' batch sizes."""
    assert cli.main(["bench", "scaling", "--quick", "--replicas-only", "--out-dir", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "scaling_replicas-cpu.json").read_text())
    rep = saved["replicas"]
    assert rep["averaging"] == "DDP, bucketed" and rep["world"] == 2 and rep["tensors"] == 68, rep
    assert rep["all_reduce_per_step"] == 4 and rep["all_gather_per_step"] == 1, rep
    assert rep["mib_per_step"] * 2**20 == pytest.approx(4 * rep["parameters"], rel=1e-12), rep
    assert saved["header"]["command"].endswith("--quick --replicas-only --out-dir " + str(tmp_path))


def test_bench_unknown(capsys):
    assert cli.main(["bench", "nosuch"]) == 2
    assert "no benchmark 'nosuch'; expected one of accuracy, aux_head, memory, overlap, replay" in capsys.readouterr().err


def test_bench_names_are_the_package_modules():
    """`bench NAME` runs dgl_fast.bench.NAME.main: the list of names is every module of the package with a main."""
    found = {m.name for m in pkgutil.iter_modules(bench.__path__)}
    assert set(bench.NAMES) <= found
    assert {n for n in found if hasattr(importlib.import_module(f"dgl_fast.bench.{n}"), "main")} == set(bench.NAMES)


def test_bench_results_go_under_the_current_directory_or_out_dir(tmp_path, monkeypatch, capsys):
    """No checkout needed: benchmarks/results/ relative to where it runs, or --out-dir; same names and format."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "memory", "--quick", "--precisions", "fp32"]) == 0
    results = tmp_path / "benchmarks" / "results"
    assert sorted(os.listdir(results)) == ["memory-cpu.json", "memory-cpu.md"]
    payload = json.loads((results / "memory-cpu.json").read_text())
    assert set(payload) == {"header", "rows"}
    assert set(payload["header"]) == {"device", "torch", "cuda", "dgl_fast", "build", "python", "command", "date"}
    assert payload["header"]["command"] == "python -m dgl_fast bench memory --quick --precisions fp32"
    md = (results / "memory-cpu.md").read_text()
    assert md.startswith("# Memory of a training step") and "| aux-study-k3 | 3 | 8 | fp32 |" in md
    assert cli.main(["bench", "memory", "--quick", "--precisions", "fp32", "--out-dir", "elsewhere/r"]) == 0
    assert sorted(os.listdir(tmp_path / "elsewhere" / "r")) == ["memory-cpu.json", "memory-cpu.md"]
    assert "wrote elsewhere/r/memory-cpu.json elsewhere/r/memory-cpu.md" in capsys.readouterr().out


def test_md_table():
    assert md_table(["a", "b"], [[1, "x"], [2.5, [4, 8]]]) == ["| a | b |", "|---|---|", "| 1 | x |", "| 2.5 | [4, 8] |"]
    assert md_table(["only"], []) == ["| only |", "|---|"]


def test_bench_size_options_are_checked(capsys):
    """The options gpu_check.sh passes: a typo fails at once, and --quick checks them, then runs tiny."""
    assert cli.main(["bench", "aux_head", "--quick", "--no-write", "--device", "cpu", "--shapes", "256x8x8"]) == 2
    assert "--shapes takes CxS" in capsys.readouterr().err
    assert cli.main(["bench", "overlap", "--quick", "--no-write", "--device", "cpu", "--cases", "vgg13-k4:128"]) == 2
    assert "bad --cases entry 'vgg13-k4:128'" in capsys.readouterr().err
    assert cli.main(["bench", "aux_head", "--quick", "--no-write", "--device", "cpu", "--shapes", "256x8",
                     "--batches", "128", "--dtypes", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "--shapes / --batches checked" in out and out.count("| mlp-sr | [4, 8, 4, 4] | fp32 |") == 1


def test_gpu_check_script_parses():
    """benchmarks/gpu_check.sh is valid bash and documents itself (CI also runs its --cpu-dry-run)."""
    import os
    import subprocess

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    out = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, check=True).stdout
    assert "--cpu-dry-run" in out and "memcheck" in out
    assert subprocess.run(["bash", script, "--bogus"], capture_output=True).returncode == 2


def _gpu_check_script():
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_check.sh")


def test_gpu_check_budget_fits_eight_minutes():
    """The header's step table and the PLAN array agree, and the expected wall time (the tests and the
    sanitizer lane side by side, everything else in turn) is at most 8 minutes."""
    import re

    text = open(_gpu_check_script()).read()
    header = {m[1]: (int(m[2]), int(m[3])) for m in re.finditer(r"^#   (\w+) +(\d+) s / +(\d+) s", text, re.M)}
    plan = {m[1]: (int(m[2]), int(m[3])) for m in re.finditer(r'\[(\w+)\]="(\d+) (\d+)"', text)}
    assert header == plan and "selfcheck" in plan
    lane = sum(plan[s][1] for s in ("sanitizer_check", "memcheck", "racecheck", "memcheck_graphs"))
    side_by_side = max(plan["tests_ops"][1], plan["tests_engines"][1], lane)
    rest = sum(e for s, (_, e) in plan.items() if s not in ("tests_ops", "tests_engines", "sanitizer_check", "memcheck",
                                                             "racecheck", "memcheck_graphs"))
    assert rest + side_by_side <= 480


def test_gpu_check_sanitizer_refusing_the_device_is_one_note(tmp_path):
    """A compute-sanitizer that refuses the device ("Device not supported", error 999): exit 3 (SKIP), one note."""
    import subprocess

    fake = tmp_path / "compute-sanitizer"
    fake.write_text('#!/bin/bash\n[ "$1" = --version ] && { echo "Version 2025.1"; exit 0; }\n'
                    'echo "========= Error: Device not supported"; echo "CUDA error: unknown error (999)"; exit 1\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    res = subprocess.run(["bash", _gpu_check_script(), "__sanitizer_check"], capture_output=True, text=True, env=env)
    notes = [line for line in res.stdout.splitlines() if line.startswith("note: ")]
    assert res.returncode == 3 and len(notes) == 1 and "refuses this device" in notes[0], res.stdout


def test_bench_rules_tiny(tmp_path, capsys):
    """`bench rules` at a tiny size (K = 3, width 2, digits, one epoch; infopro: the rule whose loss reads
    the image): its results files hold the header, the sizes, and per rule and backprop the step time,
    memory and held-out accuracy; the table puts each figure next to backprop's."""
    argv = ["bench", "rules", "--rules", "infopro", "--local-modules", "3", "--width", "2", "--in-size", "8",
            "--batch", "4", "--warmup", "1", "--steps", "3", "--train-width", "2", "--train-batch", "256",
            "--epochs", "1", "--data", "digits", "--out-dir", str(tmp_path)]
    assert cli.main(argv) == 0
    payload = json.loads((tmp_path / "rules-cpu.json").read_text())
    assert set(payload) == {"header", "config", "speed", "accuracy"}
    assert {"device", "torch", "command", "date"} <= set(payload["header"])
    assert payload["config"]["batch"] == 4 and payload["config"]["epochs"] == 1 and payload["config"]["data"] == "digits"
    assert list(payload["speed"]) == list(payload["accuracy"]) == ["infopro", "backprop"]
    for name, K in (("infopro", 3), ("backprop", 1)):
        s, a = payload["speed"][name], payload["accuracy"][name]
        assert s["K"] == K == a["stages"] and len(s["step_ms_all"]) == 3 and s["step_ms"] > 0 and s["memory_bytes"] > 0
        assert 0.0 <= a["test_acc"] <= 1.0 and len(a["test_acc_per_stage"]) == K
    assert payload["speed"]["backprop"]["memory_pipelined_bytes"] is None
    assert payload["speed"]["infopro"]["aux_params"] > 0
    md = (tmp_path / "rules-cpu.md").read_text()
    assert md.startswith("# Local-learning rules against backprop: ResNet-32, K = 3")
    assert "| infopro | 3 |" in md and "| backprop | 1 |" in md and "| 1.00 |" in md and "+0.00 |" in md
    capsys.readouterr()
    assert cli.main(["bench", "rules", "--no-write", "--rules", "nosuch"]) == 2
    assert "argument --rules: expected some of dgl, infopro, predsim, auglocal" in capsys.readouterr().err
    assert cli.main(["bench", "rules", "--no-write", "--rules", "dgl", "--engine", "streams", "--local-modules", "3",
                     "--width", "2", "--in-size", "8", "--batch", "4"]) == 2  # on the CPU: a one-line refusal
    assert "engine='streams' needs a CUDA device" in capsys.readouterr().err
