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


_MASK64 = (1 << 64) - 1


def replay_hash(seed: int, counter: int) -> int:
    """splitmix64 of (seed, counter): the draw of the ``uniform`` replay policy (as in the kernels)."""
    z = (seed + 0x9E3779B97F4A7C15 * (counter + 1)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def replay_select(uses: list[int], stamps: list[int], count: int, policy: str, max_reuse: int | None,
                  seed: int = 0, sample_index: int = 0) -> int:
    """Reference of the replay buffer's slot choice; -1 when nothing is available.

    Filled slots are ``0 .. count-1``. A slot used ``max_reuse`` times is skipped.
    ``priority_lifo``: the fewest uses, then the newest (largest stamp). ``fifo``: the fewest
    uses, then the oldest. ``uniform``: the ``replay_hash(seed, sample_index) % n``-th available slot.
    """
    avail = [s for s in range(count) if max_reuse is None or max_reuse <= 0 or uses[s] < max_reuse]
    if not avail:
        return -1
    if policy == "uniform":
        return avail[replay_hash(seed & _MASK64, sample_index) % len(avail)]
    least = min(uses[s] for s in avail)
    ties = [s for s in avail if uses[s] == least]
    pick = max if policy == "priority_lifo" else min
    return pick(ties, key=lambda s: stamps[s])


class ReplayRing:
    """Reference of the whole replay ring (``replay_push`` / ``replay_sample`` on a
    :class:`~dgl_fast.ReplayBuffer`): plain Python state, any items, the same slot choices."""

    def __init__(self, capacity: int, policy: str, max_reuse: int | None = None, seed: int = 0):
        self.M, self.policy, self.max_reuse, self.seed = capacity, policy, max_reuse, seed
        self.head = self.count = self.pushes = self.samples = 0
        self.uses, self.stamps, self.data = [0] * capacity, [0] * capacity, [None] * capacity

    def push(self, item) -> int:
        """Store ``item`` at the head; returns its slot."""
        s = self.head
        self.data[s], self.uses[s], self.stamps[s] = item, 0, self.pushes + 1
        self.head, self.count, self.pushes = (s + 1) % self.M, min(self.count + 1, self.M), self.pushes + 1
        return s

    def sample(self) -> int:
        """The slot the policy picks (its use counted), or -1 when ``max_reuse`` left none."""
        s = replay_select(self.uses, self.stamps, self.count, self.policy, self.max_reuse, self.seed, self.samples)
        self.samples += 1
        if s >= 0:
            self.uses[s] += 1
        return s


def aux_pool(x: torch.Tensor, out_size: tuple[int, int], channels_last_out: bool = False) -> torch.Tensor:
    """Reference of ``torch.ops.dgl_fast.aux_pool``: ``F.adaptive_avg_pool2d``."""
    fmt = torch.channels_last if channels_last_out else torch.contiguous_format
    return F.adaptive_avg_pool2d(x, out_size).contiguous(memory_format=fmt)


def linear_bn_relu(x, weight, bias, gamma, beta, running_mean, running_var, training, eps=1e-5):
    """Reference of ``torch.ops.dgl_fast.linear_bn_relu``: returns ``(out, mean, var)``, running
    statistics untouched (var is the biased batch variance in training)."""
    z = F.linear(x, weight, bias)
    zs = z.to(gamma.dtype)
    if training:
        mean, var = zs.mean(0), zs.var(0, unbiased=False)
    else:
        mean, var = running_mean.clone(), running_var.clone()
    out = torch.relu((zs - mean) / torch.sqrt(var + eps) * gamma + beta)
    return out.to(z.dtype), mean, var
