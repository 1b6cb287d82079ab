"""Benchmarks stay runnable: a quick smoke run of each on this machine's device (no files written)."""

from dgl_fast import cli


def test_bench_replay_quick(capsys):
    assert cli.main(["bench", "replay", "--quick", "--no-write", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "Device copy ceiling measured in this run" in out and "stage-steps/s" in out


def test_bench_aux_head_quick(capsys):
    assert cli.main(["bench", "aux_head", "--quick", "--no-write", "--device", "cpu", "--kinds", "mlp-sr,last"]) == 0
    out = capsys.readouterr().out
    assert "fused eager" in out and out.count("| mlp-sr |") == 2 and out.count("| last |") == 2


def test_bench_overlap_quick(capsys):
    assert cli.main(["bench", "overlap", "--quick", "--no-write", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| aux-study-k3 | 3 | 8 | fp32 |" in out and "dgl_pipeline_cpu" in out


def test_bench_accuracy_quick(capsys):
    assert cli.main(["bench", "accuracy", "--quick", "--no-write"]) == 0
    out = capsys.readouterr().out
    assert "| dgl |" in out and "| backprop |" in out


def test_bench_memory_quick(capsys):
    assert cli.main(["bench", "memory", "--quick", "--no-write"]) == 0
    out = capsys.readouterr().out
    assert "| aux-study-k3 | 3 | 8 | fp32 |" in out and "| aux-study-k3 | 3 | 8 | bf16 |" in out


def test_bench_unknown(capsys):
    assert cli.main(["bench", "nosuch"]) == 2
    assert "no benchmark 'nosuch'; expected one of accuracy, aux_head, memory, overlap, replay" in capsys.readouterr().err


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
