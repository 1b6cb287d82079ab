"""Nothing silent, round 2 (issue 19): resumes keep their whole plan, data is fingerprinted by
content, an image folder's validation classes keep the training tree's numbers, and the messages
of the remaining raw tracebacks name what was asked."""

import json
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from dgl_fast import Trainer, checkpoint, data, folders
from dgl_fast.distributed import Layout, files
from helpers import batches, sgd, small_model


def _loader(n=4, B=5):
    return batches(n, B=B, seed=3)


# ---------------------------------------------------------------------- the learning-rate plan

def test_a_resumed_fit_with_another_learning_rate_plan_is_refused(tmp_path):
    plan = lambda e: 0.5 ** (e // 2)  # noqa: E731
    tr = Trainer(small_model(2), optimizer=sgd)

    def save_then_stop(record):  # a run planned for 3 epochs, stopped after its first
        tr.save(tmp_path / "ck.pt")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tr.fit(_loader(), epochs=3, lr_schedule=plan, progress=False, callback=save_then_stop)
    assert tr.lr_factors == [1.0, 1.0, 0.5]
    for other, where in ((lambda e: 0.5 ** e, "factor 1 at epoch 2, this fit's lr_schedule gives 0.5"),
                         (lambda e: 1.0, "factor 0.5 at epoch 3, this fit's lr_schedule gives 1")):
        again = Trainer(small_model(2), optimizer=sgd)
        again.load(tmp_path / "ck.pt")
        state = {k: v.clone() for k, v in again.model.state_dict().items()}
        with pytest.raises(ValueError, match=where):
            again.fit(_loader(), epochs=3, lr_schedule=other, progress=False)
        assert all(torch.equal(v, state[k]) for k, v in again.model.state_dict().items())  # refused before a step
    same = Trainer(small_model(2), optimizer=sgd)
    same.load(tmp_path / "ck.pt")
    same.fit(_loader(), epochs=2, lr_schedule=plan, progress=False)  # a shorter or longer plan with the same factors
    assert same.epoch == 2
    replanned = Trainer(small_model(2), optimizer=sgd)
    replanned.load(tmp_path / "ck.pt")
    replanned.lr_factors = None  # re-planning on purpose
    replanned.fit(_loader(), epochs=2, lr_schedule=lambda e: 0.1, progress=False)
    assert replanned.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 * 0.1, rel=1e-15)


def test_no_batch_says_why():
    x, y = batches(1, B=18, seed=5)[0]
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, drop_last=True)
    with pytest.raises(ValueError, match="its 18 samples are fewer than its batch size 64 and it drops a last partial "
                                         r"batch \(drop_last\)"):
        Trainer(small_model(2), optimizer=sgd).fit(dl, epochs=1, progress=False)


# ---------------------------------------------------------------------- checkpoint paths and sets

def test_save_names_the_path_asked_for(tmp_path, monkeypatch):
    tr = Trainer(small_model(2), optimizer=sgd)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(ValueError, match="cannot save a checkpoint to an empty path"):
        tr.save("")
    assert os.listdir(tmp_path) == ["work"] and os.listdir(work) == []  # nothing written, not even a temporary
    with pytest.raises(OSError, match="cannot write the checkpoint /proc/x.pt: "):
        tr.save("/proc/x.pt")
    with pytest.raises(IsADirectoryError, match=f"cannot write the checkpoint {work}: Is a directory"):
        tr.save(work)


def test_manifest_mode_epoch_and_grid_are_checked(tmp_path):
    tr = Trainer(small_model(2), optimizer=sgd)
    tr.fit(_loader(), epochs=1, progress=False)
    lay = Layout((0, 0), 1)
    d = str(tmp_path)
    digest = files.save_rank(tr, d, 0, 1)
    files.write_manifest(d, lay, 1, [digest], "dgl")
    mode = lambda name: stat.S_IMODE(os.stat(os.path.join(d, name)).st_mode)  # noqa: E731
    assert mode(files.MANIFEST) == mode("rank-00000-epoch-00001.pt")
    assert files.load_rank(d, lay, 0, "dgl")["epoch"] == 1
    with pytest.raises(ValueError, match=r"made on 1 stage groups x 1 replicas \(1 ranks, placement \[0, 0\]\), this "
                                         r"launch has 1 stage groups x 2 replicas \(2 ranks"):
        files.load_rank(d, Layout((0, 0), 2), 0, "dgl")
    with pytest.raises(ValueError, match="made on 1 stage groups .* this launch has 2 stage groups x 1 replicas"):
        files.load_rank(d, Layout((0, 1), 1), 0, "dgl")
    path = os.path.join(d, files.MANIFEST)
    manifest = json.load(open(path))
    json.dump({**manifest, "epoch": 2}, open(path, "w"))  # an edited epoch no longer names its files
    with pytest.raises(checkpoint.CheckpointError, match="names epoch 2 and files that do not all belong to it"):
        files.load_rank(d, lay, 0, "dgl")
    # a rank file of another epoch under the manifest's name and digest
    tr.epoch = 5
    digest = files.save_rank(tr, d, 0, 1)
    files.write_manifest(d, lay, 1, [digest], "dgl")
    with pytest.raises(checkpoint.CheckpointError, match="holds the state of epoch 5, the manifest .* names epoch 1"):
        files.load_rank(d, lay, 0, "dgl")


# ---------------------------------------------------------------------- data by content, image folders

def _tree(root, classes, n=3, seed=0, size=(9, 11)):
    rng = np.random.default_rng(seed)
    for split, names in classes.items():
        for c in names:
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def _load(root, workers=0):
    return data.load("imagefolder", data_dir=str(root), batch_size=2, in_size=7, workers=workers)


def test_imagefolder_validation_classes_keep_the_training_numbers(tmp_path):
    root = _tree(tmp_path / "t", {"train": ["ant", "bee", "cat"], "val": ["ant", "cat"]})
    spec = _load(root)
    assert spec.num_classes == 3
    assert sorted({label for _, label in spec.test.dataset.samples}) == [0, 2]  # cat stays 2 (was renumbered 1)
    ys = torch.cat([y for _, y in spec.test])
    assert ys.tolist() == [0, 0, 0, 2, 2, 2]
    _tree(root, {"val": ["dog"]})
    with pytest.raises(ValueError, match=r"the validation tree .*/val has the class folder dog, which the training "
                                         "tree does not have"):
        _load(root)


def test_imagefolder_empty_class_folder_and_unreadable_image_are_named(tmp_path):
    root = _tree(tmp_path / "t", {"train": ["ant", "bee"], "val": ["ant", "bee"]})
    os.makedirs(root / "train" / "cow")
    (root / "train" / "cow" / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match=r"the class folder .*/train/cow holds no image file"):
        _load(root)
    (root / "train" / "cow" / "notes.txt").unlink()
    os.rmdir(root / "train" / "cow")
    bad = root / "train" / "bee" / "1.png"
    bad.write_bytes(np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes())
    for workers in (0, 1):  # in this process, and re-raised from a DataLoader worker: one line naming the file
        spec = _load(root, workers)
        with pytest.raises(folders.UnreadableImage) as info:
            list(spec.train)
        assert str(info.value).startswith(f"imagefolder: cannot read the image file {bad} (UnidentifiedImageError")
        assert "\n" not in str(info.value)


def test_fingerprints_follow_the_content(tmp_path):
    a = _tree(tmp_path / "a", {"train": ["ant", "bee"], "val": ["ant", "bee"]}, seed=0)
    b = _tree(tmp_path / "b", {"train": ["ant", "bee"], "val": ["ant", "bee"]}, seed=0)
    fa, fb = data.fingerprint(_load(a).train), data.fingerprint(_load(b).train)
    assert fa == fb and fa[:2] == (6, 3)  # a copy elsewhere: the same
    os.rename(b / "train" / "bee" / "2.png", b / "train" / "bee" / "9.png")
    assert data.fingerprint(_load(b).train) != fa  # same shape and count, another file
    Image.fromarray(np.zeros((9, 11, 3), np.uint8)).save(b / "train" / "bee" / "9.png")  # another size
    assert data.fingerprint(_load(b).train)[:2] == fa[:2] and data.fingerprint(_load(b).train) != fa
    x, y = batches(1, B=7, seed=1)[0]
    one = data.TensorLoader(x, y, 3)
    flipped = x.clone()
    flipped[3, 1, 2, 4] += 1
    assert data.fingerprint(one) == data.fingerprint(data.TensorLoader(x.clone(), y.clone(), 5))
    assert data.fingerprint(one) != data.fingerprint(data.TensorLoader(flipped, y, 3))
    assert data.fingerprint([(x, y)]) is None
