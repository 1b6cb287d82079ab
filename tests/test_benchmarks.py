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
