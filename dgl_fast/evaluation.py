"""Accuracy of every head, and of the authors' ensemble of heads, over a loader (inference)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .model import DecoupledModel
from .utils import kept_modes

__all__ = ["accuracy"]


@torch.no_grad()
def accuracy(model: DecoupledModel, loader: Iterable, prepare: Callable, autocast: Callable, num_classes: Callable,
             device: torch.device) -> tuple[list[float], float]:
    """Per-head accuracy and the ensemble's (the heads' softmax weighted 2^j, stage j = 1..K) of
    ``model`` in eval mode (its modes are restored after). ``prepare(x, y)`` checks and moves a
    batch; ``num_classes()`` is known once a batch was checked. Labels already on a GPU are
    checked for range once, at the end (one host sync)."""
    K = model.num_stages
    hits = torch.zeros(K + 1, dtype=torch.long, device=device)  # K heads, then the ensemble
    bad_labels = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    with kept_modes(model):
        model.eval()
        for batch in loader:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                size = f" of length {len(batch)}" if hasattr(batch, "__len__") else ""
                raise ValueError(f"expected the evaluation loader to yield (input, labels) pairs, got "
                                 f"{type(batch).__name__}{size}")
            x, y = prepare(*batch)
            if batch[1].device.type != "cpu":
                bad_labels += ((y < 0) | (y >= num_classes())).sum()
            with autocast():
                all_logits = model.forward_all(x)
            ensemble = 0
            for j, logits in enumerate(all_logits):
                hits[j] += (logits.argmax(dim=1) == y).sum()
                ensemble = ensemble + 2.0 ** (j + 1) * torch.softmax(logits.float(), dim=1)
            hits[K] += (ensemble.argmax(dim=1) == y).sum()
            seen += x.shape[0]
    if seen == 0:
        raise ValueError("the evaluation loader yielded no batch")
    if int(bad_labels):
        raise ValueError(f"expected labels in [0, {num_classes()}), got {int(bad_labels)} outside that range")
    acc = (hits.double() / seen).tolist()
    return acc[:K], acc[K]
