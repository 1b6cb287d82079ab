"""Typed Python wrappers of the native ``torch.ops.dgl_fast`` operators.

Each op is defined once in C++ (``csrc/dgl_fast.cpp``) with CPU and CUDA kernels; this module
adds what the dispatcher needs from Python: a fake (meta) kernel for tracing and
``torch.compile``, and autograd. Plain-PyTorch equivalents live in :mod:`dgl_fast.reference`.
"""

from __future__ import annotations

import torch

from . import _native  # noqa: F401  (loads the library before the registrations below)

__all__ = ["softmax_xent", "replay_push", "replay_sample", "REPLAY_POLICIES", "aux_pool", "linear_bn_relu",
           "bn_update_stats"]


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


def softmax_xent(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


# --- aux_pool / aux_pool_bwd -----------------------------------------------------------------


def _fmt(channels_last: bool):
    return torch.channels_last if channels_last else torch.contiguous_format


@torch.library.register_fake("dgl_fast::aux_pool")
def _aux_pool_fake(x, out_h, out_w, channels_last_out):
    torch._check(x.dim() == 4, lambda: f"expected features of shape [B, C, H, W], got {list(x.shape)}")
    return torch.empty((x.shape[0], x.shape[1], out_h, out_w), dtype=x.dtype, device=x.device,
                       memory_format=_fmt(channels_last_out))


@torch.library.register_fake("dgl_fast::aux_pool_bwd")
def _aux_pool_bwd_fake(grad_out, in_h, in_w, channels_last_in):
    return torch.empty((grad_out.shape[0], grad_out.shape[1], in_h, in_w), dtype=grad_out.dtype, device=grad_out.device,
                       memory_format=_fmt(channels_last_in))


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _aux_pool_setup_context(ctx, inputs, output):
    x = inputs[0]
    ctx.in_hw = (x.shape[2], x.shape[3])
    ctx.channels_last = _is_channels_last(x)


def _aux_pool_backward(ctx, grad):
    return torch.ops.dgl_fast.aux_pool_bwd(grad, ctx.in_hw[0], ctx.in_hw[1], ctx.channels_last), None, None, None


torch.library.register_autograd("dgl_fast::aux_pool", _aux_pool_backward, setup_context=_aux_pool_setup_context)


def aux_pool(x: torch.Tensor, out_size: tuple[int, int], channels_last_out: bool = False) -> torch.Tensor:
    """Adaptive average pooling of ``x`` [B, C, H, W] (NCHW, channels_last or any view) to ``out_size``.

    Equivalent to ``F.adaptive_avg_pool2d(x, out_size)``; reads ``x`` once, writes the result
    NCHW- or channels_last-contiguous, and its backward writes the input gradient once, in the
    input's layout. Accumulates in float32 for half-precision inputs.
    """
    return torch.ops.dgl_fast.aux_pool(x, int(out_size[0]), int(out_size[1]), bool(channels_last_out))


# --- linear_bn_relu / linear_bn_relu_bwd / bn_update_stats -------------------------------------


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("dgl_fast::linear_bn_relu")
def _linear_bn_relu_fake(x, weight, bias, gamma, beta, running_mean, running_var, training, eps):
    torch._check(x.dim() == 2 and weight.dim() == 2 and weight.shape[1] == x.shape[1],
                 lambda: f"expected rows [N, K] and weight [M, K], got {list(x.shape)} and {list(weight.shape)}")
    N, M = x.shape[0], weight.shape[0]
    z = x.new_empty((N, M))
    stat = x.new_empty((M,), dtype=_stat_dtype(x.dtype))
    return x.new_empty((N, M)), z, stat, stat.clone()


@torch.library.register_fake("dgl_fast::linear_bn_relu_bwd")
def _linear_bn_relu_bwd_fake(grad_out, x, weight, z, mean, var, gamma, beta, training, eps):
    M = weight.shape[0]
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight),
            z.new_empty((M,)), torch.empty_like(gamma), torch.empty_like(beta))


def _linear_bn_relu_setup_context(ctx, inputs, output):
    x, weight, bias, gamma, beta, _, _, training, eps = inputs
    _, z, mean, var = output
    ctx.save_for_backward(x, weight, z, mean, var, gamma, beta)
    ctx.training, ctx.eps, ctx.has_bias = training, eps, bias is not None
    ctx.mark_non_differentiable(z, mean, var)


def _linear_bn_relu_backward(ctx, grad_out, grad_z, grad_mean, grad_var):
    x, weight, z, mean, var, gamma, beta = ctx.saved_tensors
    gx, gw, gb, gg, gbeta = torch.ops.dgl_fast.linear_bn_relu_bwd(grad_out, x, weight, z, mean, var, gamma, beta,
                                                                  ctx.training, ctx.eps)
    return gx, gw, gb if ctx.has_bias else None, gg, gbeta, None, None, None, None


torch.library.register_autograd("dgl_fast::linear_bn_relu", _linear_bn_relu_backward,
                               setup_context=_linear_bn_relu_setup_context)


@torch.library.register_fake("dgl_fast::bn_update_stats")
def _bn_update_stats_fake(running_means, running_vars, num_batches_tracked, means, vars, counts, momentums) -> None:
    return None


def linear_bn_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor,
                   beta: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, training: bool,
                   eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear + BatchNorm + ReLU on rows ``x`` [N, K]; returns ``(out, mean, var)``.

    Equivalent to ``F.relu(F.batch_norm(F.linear(x, weight, bias), running_mean, running_var, gamma,
    beta, training, momentum=0.0, eps))`` except that the running statistics are *not* updated:
    ``mean`` and ``var`` (the batch mean and biased variance in training, the running ones in
    eval) go to :func:`bn_update_stats`. Differentiable in ``x``, ``weight``, ``bias``, ``gamma``
    and ``beta``; statistics in float32 (float64 for float64 inputs).
    """
    out, _, mean, var = torch.ops.dgl_fast.linear_bn_relu(x, weight, bias, gamma, beta, running_mean, running_var,
                                                          bool(training), float(eps))
    return out, mean, var


def bn_update_stats(running_means: list[torch.Tensor], running_vars: list[torch.Tensor],
                    num_batches_tracked: list[torch.Tensor], means: list[torch.Tensor], vars: list[torch.Tensor],
                    counts: list[int], momentums: list[float]) -> None:
    """Update several BatchNorm layers' running statistics in place, as ``nn.BatchNorm`` does in
    training: ``running = (1 - m) * running + m * batch`` with the variance unbiased by
    ``n / (n - 1)``, and ``num_batches_tracked += 1``. One launch for up to 16 layers."""
    torch.ops.dgl_fast.bn_update_stats(running_means, running_vars, num_batches_tracked, means, vars,
                                       [int(c) for c in counts], [float(m) for m in momentums])
