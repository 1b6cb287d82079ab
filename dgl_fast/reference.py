"""Plain-PyTorch references of every dgl_fast op: test oracle, documentation and baseline."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def softmax_xent(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of ``torch.ops.dgl_fast.softmax_xent``.

    Equivalent to ``(F.cross_entropy(logits, labels), (softmax(logits) - onehot(labels)) / B,
    (logits.argmax(1) == labels).sum())`` with the loss accumulated in float32 (float64 for
    float64 logits).
    """
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(acc)
    loss = F.cross_entropy(x, labels)
    grad = (torch.softmax(x, dim=1) - F.one_hot(labels, logits.shape[1]).to(acc)) / logits.shape[0]
    correct = (logits.argmax(dim=1) == labels).sum()
    return loss, grad.to(logits.dtype), correct
