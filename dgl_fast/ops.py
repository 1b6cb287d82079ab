"""Typed Python wrappers of the native ``torch.ops.dgl_fast`` operators.

Each op is defined once in C++ (``csrc/dgl_fast.cpp``) with CPU and CUDA kernels; this module
adds what the dispatcher needs from Python: a fake (meta) kernel for tracing and
``torch.compile``, and autograd. Plain-PyTorch equivalents live in :mod:`dgl_fast.reference`.
"""

from __future__ import annotations

import torch

from . import _native  # noqa: F401  (loads the library before the registrations below)

__all__ = ["softmax_cross_entropy", "replay_push", "replay_sample", "REPLAY_POLICIES"]


# --- softmax_xent ---------------------------------------------------------------------------


@torch.library.register_fake("dgl_fast::softmax_xent")
def _softmax_xent_fake(logits: torch.Tensor, labels: torch.Tensor):
    torch._check(logits.dim() == 2, lambda: f"expected logits of shape [batch, classes], got {list(logits.shape)}")
    torch._check(
        labels.dim() == 1 and labels.shape[0] == logits.shape[0],
        lambda: f"expected labels of shape [{logits.shape[0]}], got {list(labels.shape)}",
    )
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = logits.new_empty((), dtype=acc)
    return loss, torch.empty_like(logits, memory_format=torch.contiguous_format), logits.new_empty((), dtype=torch.long)


def _softmax_xent_setup_context(ctx, inputs, output):
    _, dlogits, correct = output
    ctx.save_for_backward(dlogits)
    ctx.mark_non_differentiable(dlogits, correct)


def _softmax_xent_backward(ctx, grad_loss, grad_dlogits, grad_correct):
    (dlogits,) = ctx.saved_tensors
    return grad_loss * dlogits, None


torch.library.register_autograd(
    "dgl_fast::softmax_xent", _softmax_xent_backward, setup_context=_softmax_xent_setup_context
)


def softmax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of ``logits`` [B, C] against int64 ``labels`` [B], and the number of
    correct arg-max predictions, in one fused pass.

    Equivalent to ``(F.cross_entropy(logits, labels), (logits.argmax(1) == labels).sum())``; the
    loss is float32 (float64 for float64 logits) and differentiable with respect to ``logits``;
    the count is an int64 scalar tensor on the same device (no host synchronisation).

    Labels must lie in ``[0, C)``: on CPU a label outside raises; on CUDA (where raising would
    need a host sync) that row's loss is NaN and it never counts as correct.
    """
    loss, _, correct = torch.ops.dgl_fast.softmax_xent(logits, labels)
    return loss, correct


# --- replay_push / replay_sample ---------------------------------------------------------------

#: Sampling policies of the ring replay buffer and their codes in the native ops.
REPLAY_POLICIES = {"priority_lifo": 0, "fifo": 1, "uniform": 2}


@torch.library.register_fake("dgl_fast::replay_push")
def _replay_push_fake(storage, label_store, state, uses, stamps, x, y) -> None:
    torch._check(tuple(x.shape) == tuple(storage.shape[1:]),
                 lambda: f"expected activations of shape {list(storage.shape[1:])}, got {list(x.shape)}")
    return None


@torch.library.register_fake("dgl_fast::replay_sample")
def _replay_sample_fake(state, uses, stamps, storage, label_store, out, out_labels, info, policy, max_reuse, seed) -> None:
    return None


def replay_push(storage: torch.Tensor, label_store: torch.Tensor, state: torch.Tensor, uses: torch.Tensor,
                stamps: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
    """Write mini-batch ``x`` (converted to ``storage.dtype``) and labels ``y`` at the ring's head.

    Equivalent to ``slot = state[0]; storage[slot] = x; label_store[slot] = y; uses[slot] = 0;
    stamps[slot] = state[2] + 1; state[0] = (slot + 1) % M; state[1] = min(state[1] + 1, M);
    state[2] += 1``, done on the tensors' device without a host synchronisation.
    """
    torch.ops.dgl_fast.replay_push(storage, label_store, state, uses, stamps, x, y)


def replay_sample(state: torch.Tensor, uses: torch.Tensor, stamps: torch.Tensor, storage: torch.Tensor,
                  label_store: torch.Tensor, out: torch.Tensor, out_labels: torch.Tensor, info: torch.Tensor,
                  policy: str = "priority_lifo", max_reuse: int | None = None, seed: int = 0) -> None:
    """Pick a stored slot by ``policy`` and gather it into ``out`` / ``out_labels``.

    ``info`` receives ``[slot, 1]``, or ``[-1, 0]`` when no slot is available (empty ring, or every
    slot used ``max_reuse`` times); then ``out`` is left unchanged. See
    :func:`dgl_fast.reference.replay_select` for the policies.
    """
    if policy not in REPLAY_POLICIES:
        raise ValueError(f"unknown replay policy {policy!r}; expected one of {', '.join(REPLAY_POLICIES)}")
    torch.ops.dgl_fast.replay_sample(state, uses, stamps, storage, label_store, out, out_labels, info,
                                     REPLAY_POLICIES[policy], 0 if max_reuse is None else int(max_reuse), int(seed))
