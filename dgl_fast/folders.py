"""``--data imagefolder``: an ImageNet-style tree (``train/<class>/*``, ``val/<class>/*``) read with
torchvision, with the checks such a tree needs:

- the validation tree's classes are numbered by the **training** tree's class names (a validation
  tree that lacks a class keeps every other label right); a validation class the training tree
  does not have is refused by name;
- a class folder without any image file is refused, naming the folder;
- an image file that cannot be decoded raises :class:`UnreadableImage` naming the file (also from
  a DataLoader worker);
- :func:`fingerprint` digests a tree by content (relative file names, sizes, labels) for the
  distributed start-up agreement.
"""

from __future__ import annotations

import hashlib
import os

import torch
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader

__all__ = ["UnreadableImage", "load_imagefolder", "fingerprint"]


class UnreadableImage(ValueError):
    """An image file of the tree that cannot be read; the message names it."""

    def __init__(self, message: str):
        lines = str(message).strip().splitlines()
        if len(lines) > 1 and "Original Traceback" in str(message):  # re-raised by a DataLoader worker
            message = lines[-1].split(": ", 1)[-1]
        super().__init__(message)


def _read(path: str):
    try:
        return default_loader(path)
    except Exception as exc:  # noqa: BLE001 - PIL raises several types for a bad file
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise UnreadableImage(f"imagefolder: cannot read the image file {path} ({type(exc).__name__}"
                              f"{': ' + detail if detail else ''})") from None


class _Folder(ImageFolder):
    """ImageFolder numbering its classes by ``train_classes`` (name -> label) when given."""

    def __init__(self, root: str, transform, train_classes: dict[str, int] | None):
        self.train_classes = train_classes
        super().__init__(root, transform, loader=_read, allow_empty=True)

    def find_classes(self, directory):
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir())
        if not classes:
            raise FileNotFoundError(f"imagefolder: {directory} has no class folder; expected {directory}/<class>/<image>")
        known = self.train_classes
        if known is None:
            return classes, {c: i for i, c in enumerate(classes)}
        extra = [c for c in classes if c not in known]
        if extra:
            raise ValueError(f"imagefolder: the validation tree {directory} has the class folder"
                             f"{'s' if len(extra) > 1 else ''} {', '.join(extra)}, which the training tree does not "
                             f"have (its classes: {', '.join(known)})")
        return classes, {c: known[c] for c in classes}


def _dataset(root: str, transform, train_classes: dict[str, int] | None) -> _Folder:
    data = _Folder(root, transform, train_classes)
    found = {label for _, label in data.samples}
    empty = [c for c in data.classes if data.class_to_idx[c] not in found]
    if empty:
        raise FileNotFoundError(f"imagefolder: the class folder {os.path.join(root, empty[0])} holds no image file "
                                f"(expected files ending in {', '.join(IMG_EXTENSIONS)})")
    return data


def load_imagefolder(data_dir: str, batch_size: int, in_size: int, workers: int, seed: int):
    """``(train loader, test loader, number of classes)`` of the tree under ``data_dir``: random
    resized crop + flip for training (full batches only), resize + centre crop for test."""
    import torchvision.transforms as T  # noqa: PLC0415

    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train_tf = T.Compose([T.RandomResizedCrop(in_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    test_tf = T.Compose([T.Resize(int(round(in_size * 256 / 224))), T.CenterCrop(in_size), T.ToTensor(), norm])
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(data_dir, split)):
            raise FileNotFoundError(f"imagefolder expects {os.path.join(data_dir, split)}/<class>/<image> folders")
    train_set = _dataset(os.path.join(data_dir, "train"), train_tf, None)
    test_set = _dataset(os.path.join(data_dir, "val"), test_tf, train_set.class_to_idx)
    gen = torch.Generator().manual_seed(seed)
    train = torch.utils.data.DataLoader(train_set, batch_size, shuffle=True, num_workers=workers, drop_last=True,
                                        pin_memory=torch.cuda.is_available(), generator=gen)
    test = torch.utils.data.DataLoader(test_set, batch_size, num_workers=workers)
    return train, test, len(train_set.classes)


def fingerprint(dataset) -> tuple[int, int, str]:
    """``(samples, label sum, digest)`` of a folder dataset: the digest covers every file's path
    relative to the tree, its size and its label (not the pixels: cheap for any tree)."""
    h = hashlib.sha256()
    for path, label in dataset.samples:
        h.update(f"{os.path.relpath(path, dataset.root)}\0{os.path.getsize(path)}\0{label};".encode())
    return len(dataset.samples), sum(label for _, label in dataset.samples), h.hexdigest()[:16]
