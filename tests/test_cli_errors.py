"""The command line under bad input: every refusal is exit code 2 and one line ``error: ...`` on
stderr naming the option, what it expects and what it got (no traceback); a diverged run is exit
code 3 with a message naming the stage, the steps and the last good checkpoint, left untouched."""

import json
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dgl_fast import cli

TINY = ["train", "--model", "aux-study", "--depth", "2", "--width", "8", "--data", "digits", "--epochs", "1",
        "--batch-size", "64", "--no-progress"]
SYNTH = ["train", "--model", "aux-study", "--depth", "2", "--width", "8", "--aux", "mlp", "--data", "synthetic",
         "--epochs", "1", "--batch-size", "64", "--no-progress"]


def _run(argv, capsys):
    """(exit code, stderr lines) of ``python -m dgl_fast`` run in-process."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    return code, capsys.readouterr().err.strip().splitlines()


def _refused(argv, capsys, *expected):
    code, err = _run(argv, capsys)
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    for text in expected:
        assert text in err[0], err[0]
    return err[0]


@pytest.mark.parametrize("extra, expected", [
    # the reference example (exit 0 at 10 % accuracy before) and its kin
    (["--lr", "nan"], "error: argument --lr: expected a finite number > 0, got 'nan'"),
    (["--lr", "inf"], "error: argument --lr: expected a finite number > 0, got 'inf'"),
    (["--lr", "0"], "error: argument --lr: expected a finite number > 0, got '0'"),
    (["--weight-decay", "nan"], "error: argument --weight-decay: expected a finite number >= 0, got 'nan'"),
    (["--momentum", "-0.5"], "error: argument --momentum: expected a finite number >= 0, got '-0.5'"),
    (["--lr-decay", "nan"], "error: argument --lr-decay: expected a finite number > 0, got 'nan'"),
    (["--lr-decay", "-0.2"], "error: argument --lr-decay: expected a finite number > 0, got '-0.2'"),
    (["--lr-step", "-1"], "error: argument --lr-step: expected an integer >= 1, got '-1'"),  # grew the lr 5x/epoch
    (["--lr-step", "0"], "error: argument --lr-step: expected an integer >= 1, got '0'"),  # ZeroDivisionError
    (["--epochs", "40", "--lr-step", "1", "--lr-decay", "1e300"],
     "error: argument --lr-decay: --lr 0.1 x --lr-decay 1e+300 ** 39 (epoch 40 of --epochs 40, --lr-step 1) is inf"),
    (["--seed", "-1"], "error: argument --seed: expected an integer >= 0 and < 4294967296, got '-1'"),
    (["--depth", "0"], "error: argument --depth: expected an integer >= 1, got '0'"),
    (["--batch-size", "0"], "error: argument --batch-size: expected an integer >= 1, got '0'"),
    (["--in-size", "5"], "error: argument --in-size: --in-size applies to --data synthetic and imagefolder only; "
                         "--data digits has a fixed input size of 8, got --in-size 5"),
    (["--data", "mnist5k", "--in-size", "32"], "--data mnist5k has a fixed input size of 28, got --in-size 32"),
    (["--data", "cifar10", "--in-size", "64"], "--data cifar10 has a fixed input size of 32, got --in-size 64"),
    (["--download"], "error: argument --download: applies to --data cifar10 only, this run uses --data digits"),
    (["--stages", "5"], "error: argument --model: cannot build --model aux-study --aux mlp-sr --depth 2 --width 8 "
                        "--stages 5 for 1x8x8 inputs (--data digits): cannot cut 2 layers into 5 stages"),
    (["--model", "vgg11"], "error: argument --data: --model vgg11 max-pools 4 times (2x2), so it needs inputs of at "
                           "least 16x16, got 8x8 (--data digits)"),
])
def test_bad_option_values(extra, expected, capsys):
    _refused(TINY + extra, capsys, expected)


@pytest.mark.parametrize("extra, expected", [
    (["--in-size", "-4"], "error: argument --in-size: expected an integer >= 1, got '-4'"),  # was a raw RuntimeError
    (["--in-size", "0"], "error: argument --in-size: expected an integer >= 1, got '0'"),  # silently became 32
    (["--in-size", "2", "--depth", "4"],  # failed deep inside the shape probe
     "error: argument --in-size: --model aux-study --depth 4 max-pools 2 times (2x2), so it needs inputs of at least "
     "4x4, got 2x2 (--in-size 2)"),
])
def test_bad_in_size(extra, expected, capsys):
    _refused(SYNTH + extra, capsys, expected)


@pytest.mark.parametrize("extra, named", [
    (["--slowdown", "2:0.1"], "--slowdown applies"),
    (["--buffer-capacity", "5"], "--buffer-capacity applies"),
    (["--policy", "fifo"], "--policy applies"),
    (["--max-reuse", "2"], "--max-reuse applies"),
    (["--schedule", "round_robin"], "--schedule applies"),
    (["--buffer-dtype", "float16"], "--buffer-dtype applies"),
    (["--policy", "fifo", "--slowdown", "3:0.1"], "--policy, --slowdown apply"),
])
@pytest.mark.parametrize("mode", ["dgl", "sequential", "backprop"])
def test_async_options_outside_async_mode(extra, named, mode, capsys):
    flag = named.split(",")[0].split(" ")[0]
    _refused(TINY + ["--mode", mode] + extra, capsys, f"error: argument {flag}: {named} to --mode async only, this "
             f"run uses --mode {mode}; drop")


def test_bad_slowdown_in_async_mode(capsys):
    base = SYNTH + ["--in-size", "8", "--mode", "async"]
    _refused(base + ["--slowdown", "2:1.5"], capsys, "error: argument --slowdown: expected STAGE:NOISE with a stage "
             "number >= 1 and 0 <= NOISE < 1, such as 3:0.1, got '2:1.5'")
    _refused(base + ["--slowdown", "5:0.1"], capsys, "error: argument --slowdown: expected stage numbers 1..2 (the "
             "model has 2 stages), got stage 5")


def test_out_naming_an_existing_file(tmp_path, capsys):
    f = tmp_path / "results.txt"
    f.write_text("keep me")
    _refused(TINY + ["--out", str(f)], capsys,
             f"error: argument --out: expected a folder (created when missing), got the existing file {f}")
    assert f.read_text() == "keep me"


def test_device_and_engine_errors_name_the_option(capsys):
    _refused(TINY + ["--device", "cuda:9"], capsys, "error: device 'cuda:9'", "(--device cuda:9)")
    _refused(TINY + ["--engine", "streams"], capsys, "engine='streams' needs a CUDA device",
             "(options --mode dgl --engine streams --device cpu)")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished one-epoch run (digits, tiny net): its --out folder."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert cli.main(TINY + ["--out", str(out)]) == 0
    return out


def test_resume_of_random_or_truncated_file(trained, tmp_path, capsys):
    noise = tmp_path / "noise.pt"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _refused(TINY + ["--resume", str(noise)], capsys,
             f"error: argument --resume: {noise} is not a dgl_fast checkpoint (4096 bytes without the dgl_fast "
             "checkpoint header)")
    cut = tmp_path / "cut.pt"
    cut.write_bytes((trained / "checkpoint.pt").read_bytes()[:3000])
    _refused(TINY + ["--resume", str(cut)], capsys, f"error: argument --resume: {cut} is damaged: its SHA-256 does not "
             "match")
    _refused(TINY + ["--resume", str(tmp_path / "missing.pt")], capsys,
             "error: argument --resume: expected a checkpoint file written by a previous run")


def test_resume_of_another_model(trained, capsys):
    ck = trained / "checkpoint.pt"
    before = ck.read_bytes()
    line = _refused(TINY + ["--width", "16", "--epochs", "2", "--resume", str(ck)], capsys,
                    f"error: argument --resume: {ck} does not fit this run's options",
                    "differs at 'stages.0.0.0.weight': saved [8, 1, 3, 3]")
    assert "Traceback" not in line
    _refused(TINY + ["--mode", "backprop", "--epochs", "2", "--resume", str(ck)], capsys,
             "error: argument --resume:", "mode 'dgl'")
    assert ck.read_bytes() == before


def test_resume_with_other_optimizer_options_or_fewer_epochs(trained, capsys):
    ck = str(trained / "checkpoint.pt")
    _refused(TINY + ["--epochs", "2", "--lr", "0.5", "--resume", ck], capsys,
             f"error: argument --lr: {ck} was trained with --lr 0.1, got --lr 0.5")
    _refused(TINY + ["--epochs", "2", "--weight-decay", "0", "--resume", ck], capsys,
             f"error: argument --weight-decay: {ck} was trained with --weight-decay 0.0005, got --weight-decay 0")


def test_resume_of_a_sequential_run_with_other_epochs(tmp_path, capsys):
    out = tmp_path / "seq"
    assert cli.main(TINY + ["--mode", "sequential", "--out", str(out)]) == 0
    capsys.readouterr()
    ck = out / "checkpoint.pt"
    _refused(TINY + ["--mode", "sequential", "--epochs", "2", "--resume", str(ck)], capsys,
             f"error: argument --epochs: {ck} is a --mode sequential run planned with --epochs 1 per stage; resume "
             "with --epochs 1, got --epochs 2")


def _finite_records(path):
    def refuse(name):
        raise AssertionError(f"non-finite value {name} in {path}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_divergence_after_a_good_epoch_keeps_its_checkpoint(tmp_path, capsys):
    # epoch 1 at lr 0.05 is saved; epoch 2 runs at lr 0.05 x 1e7 and diverges
    out = tmp_path / "run"
    code, err = _run(TINY + ["--epochs", "2", "--lr", "0.05", "--lr-step", "1", "--lr-decay", "1e7",
                             "--out", str(out)], capsys)
    assert code == 3, err
    assert err[-1].startswith("error: training diverged: stage "), err
    assert "between steps 24 and" in err[-1] and "(epoch 2)" in err[-1]
    assert f"the last checkpoint, {out / 'checkpoint.pt'} (step 23), was written before it and is left untouched" \
        in err[-1]
    assert not any(line.startswith("Traceback") for line in err)
    records = _finite_records(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1]
    assert not (out / "summary.json").exists()


def test_divergence_on_resume_leaves_the_checkpoint_untouched(tmp_path, capsys):
    # a learning-rate plan that diverges in its second epoch (a resume keeps the plan it was trained with)
    plan = ["--lr-step", "1", "--lr-decay", "1e7"]
    out = tmp_path / "run"
    assert cli.main(TINY + plan + ["--out", str(out)]) == 0
    capsys.readouterr()
    ck = out / "checkpoint.pt"
    before, metrics = ck.read_bytes(), (out / "metrics.jsonl").read_text()
    code, err = _run(TINY + plan + ["--epochs", "2", "--resume", str(ck), "--out", str(out)], capsys)
    assert code == 3, err
    assert err[-1].startswith("error: training diverged: stage ") and "(epoch 2)" in err[-1]
    assert f"the last checkpoint, {ck} (step 23), was written before it and is left untouched" in err[-1]
    assert ck.read_bytes() == before and (out / "metrics.jsonl").read_text() == metrics
    _finite_records(out / "metrics.jsonl")


def test_divergence_from_the_start(trained, tmp_path, capsys):
    # an earlier run's files in --out stay as they were; no NaN record is written
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    before, metrics = (out / "checkpoint.pt").read_bytes(), (out / "metrics.jsonl").read_text()
    code, err = _run(TINY + ["--lr", "1e6", "--out", str(out)], capsys)
    assert code == 3, err
    assert err[-1].startswith("error: training diverged: stage 1's loss became nan") and "(epoch 1)" in err[-1]
    assert "no checkpoint was saved before it" in err[-1]
    assert (out / "checkpoint.pt").read_bytes() == before and (out / "metrics.jsonl").read_text() == metrics


def test_exit_codes_of_the_process(tmp_path):
    """The real process: exit 2 / 3, the one error line last on stderr, no traceback."""
    cmd = [sys.executable, "-m", "dgl_fast", *TINY]
    res = subprocess.run(cmd + ["--lr", "nan", "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "error: argument --lr: expected a finite number > 0, got 'nan'"]
    assert not (tmp_path / "x").exists()
    res = subprocess.run(cmd + ["--lr", "1e6", "--out", str(tmp_path / "y")], capture_output=True, text=True)
    assert res.returncode == 3, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: training diverged: stage 1")
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "y" / "checkpoint.pt").exists() and not (tmp_path / "y" / "metrics.jsonl").exists()


def test_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "2 for a bad option or input file" in text and "3 when training diverged" in text


def test_a_bug_still_shows_its_traceback(monkeypatch, capsys):
    """Only bad input is turned into one line: any other exception propagates."""
    import dgl_fast.trainer

    def broken(self, *a, **k):
        raise RuntimeError("a real bug")

    monkeypatch.setattr(dgl_fast.trainer.Trainer, "fit", broken)
    with pytest.raises(RuntimeError, match="a real bug"):
        cli.main(TINY)


def test_cifar_files_that_are_not_the_official_release(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}, f)
    argv = ["train", "--model", "aux-study", "--depth", "2", "--width", "8", "--data", "cifar10", "--data-dir",
            str(tmp_path), "--epochs", "1", "--batch-size", "2", "--no-progress"]
    _refused(argv, capsys, f"error: argument --data-dir: {folder / 'data_batch_1'}: its MD5 checksum",
             "does not match the official CIFAR-10 release (c99cafc152244af753f735de768cd75f)")



@pytest.mark.parametrize("extra, flag, saved, given", [
    (["--lr-step", "1"], "--lr-step", "15", "1"), (["--lr-decay", "0.5"], "--lr-decay", "0.2", "0.5"),
    (["--batch-size", "32"], "--batch-size", "64", "32"), (["--seed", "1"], "--seed", "0", "1")])
def test_resume_with_another_plan_names_the_flag(trained, extra, flag, saved, given, capsys):
    # each of these trained on at another learning rate, batches or order before (exit 0)
    ck = str(trained / "checkpoint.pt")
    _refused(TINY + ["--epochs", "2", *extra, "--resume", ck], capsys,
             f"error: argument {flag}: {ck} was trained with {flag} {saved}, got {flag} {given}; resume with the options")


def test_resume_of_an_async_run_with_other_buffer_options_names_the_flag(tmp_path, capsys):
    run = TINY + ["--mode", "async", "--buffer-capacity", "3", "--slowdown", "2:0.1"]
    out = tmp_path / "async"
    assert cli.main(run + ["--out", str(out)]) == 0
    capsys.readouterr()
    ck = str(out / "checkpoint.pt")
    for extra, flag, saved, given in ((["--buffer-capacity", "4"], "--buffer-capacity", "3", "4"),
                                      (["--policy", "fifo"], "--policy", "priority_lifo", "fifo"),
                                      (["--buffer-dtype", "bfloat16"], "--buffer-dtype", "(default)", "bfloat16"),
                                      (["--slowdown", "1:0.2"], "--slowdown", "2:0.1", "2:0.1 1:0.2")):
        _refused(run + ["--epochs", "2", *extra, "--resume", ck], capsys,
                 f"error: argument {flag}: {ck} was trained with {flag} {saved}, got {flag} {given};")


def test_batch_sizes_batchnorm_cannot_train_name_the_flag(monkeypatch, capsys):
    _refused(TINY + ["--batch-size", "1"], capsys, "error: argument --batch-size: the networks' BatchNorm layers "
             "cannot train on batches of 1 sample: expected --batch-size >= 2, got 1")
    monkeypatch.setenv("RANK", "0")  # as torchrun sets it; the checks come before any process group
    monkeypatch.setenv("WORLD_SIZE", "2")
    _refused(SYNTH + ["--distributed", "--replicas", "2", "--batch-size", "3"], capsys,
             "error: argument --batch-size: --batch-size 3 split over --replicas 2 leaves a replica row 1 sample(s), "
             "BatchNorm needs 2 a row: expected --batch-size >= 4")
    _refused(SYNTH + ["--distributed", "--replicas", "2", "--sync-bn", "--device", "cpu"], capsys,
             "error: argument --sync-bn: PyTorch's SyncBatchNorm needs CUDA devices, got --device cpu")
    _refused(SYNTH + ["--distributed", "--timeout", "0.001"], capsys,
             "error: argument --timeout: expected seconds from 1 to 1e7, got 0.001")


def test_bench_checks_its_output_folder_first(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("x")
    code = cli.main(["bench", "step", "--out-dir", str(target)])
    err = capsys.readouterr().err
    assert code == 2 and f"argument --out-dir: expected a folder (created when missing), got the existing file {target}" in err
