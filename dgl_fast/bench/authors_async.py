"""Asynchronous DGL the way the authors' code runs it: the baseline of ``bench replay_buffer``.

One stage step at a time, eager, a replay buffer in host memory (every push copies activations
to the host, every sample copies them back, through pageable memory), and a host sync per step
for metrics (``loss.item()``). The slot choice is dgl_fast's ``priority_lifo`` (reference.py), so
both sides train the same way; only where the buffer lives and how the host waits differ.
"""

from __future__ import annotations

import torch

from dgl_fast import reference
from dgl_fast.ops import softmax_xent


class HostReplayBuffer:
    """A ring of (activations, labels) pairs held as CPU tensors in a Python list."""

    def __init__(self, capacity: int):
        self.capacity, self.head, self.count, self.pushes = capacity, 0, 0, 0
        self.slots: list = [None] * capacity
        self.uses, self.stamps = [0] * capacity, [0] * capacity

    def push(self, h: torch.Tensor, y: torch.Tensor) -> None:
        s = self.head
        self.slots[s] = (h.detach().cpu(), y.cpu())  # device -> pageable host copy, synchronous
        self.uses[s], self.stamps[s] = 0, self.pushes + 1
        self.head, self.count, self.pushes = (s + 1) % self.capacity, min(self.count + 1, self.capacity), self.pushes + 1

    def sample(self, device):
        s = reference.replay_select(self.uses, self.stamps, self.count, "priority_lifo", None)
        self.uses[s] += 1
        h, y = self.slots[s]
        return h.to(device), y.to(device)  # pageable host -> device copy


class AuthorsAsyncDGL:
    """Async DGL simulation as in the authors' code, on a dgl_fast DecoupledModel."""

    def __init__(self, model, optimizer, capacity: int, slowdown: dict, device, seed: int = 0):
        self.model, self.device = model.to(device), device
        K = model.num_stages
        self.opts = [optimizer(model.stage_parameters(j)) for j in range(K)]
        self.buffers = [HostReplayBuffer(capacity) for _ in range(K - 1)]
        self.weights = torch.tensor([1.0 - slowdown.get(j + 1, 0.0) for j in range(K)], dtype=torch.float64)
        self.gen = torch.Generator().manual_seed(seed)
        self.stage_steps = [0] * K
        self.last_loss = [0.0] * K

    def run_stage(self, j: int, x=None, y=None) -> None:
        if j > 0:
            x, y = self.buffers[j - 1].sample(self.device)
        h = self.model.stages[j](x)
        loss, correct = softmax_xent(self.model.heads[j](h), y)
        loss.backward()
        self.opts[j].step()
        self.opts[j].zero_grad(set_to_none=True)
        if j < len(self.buffers):
            self.buffers[j].push(h, y)
        self.last_loss[j] = loss.item()  # metrics read on the host every step
        self.stage_steps[j] += 1

    def warm_up(self, batches) -> None:
        """Fill the buffers in stage order."""
        it = iter(batches)
        for _ in range(self.buffers[0].capacity if self.buffers else 0):
            self.run_stage(0, *next(it))
        for j in range(1, len(self.buffers)):
            for _ in range(self.buffers[j].capacity):
                self.run_stage(j)

    def tick(self, fresh) -> None:
        j = int(torch.multinomial(self.weights, 1, generator=self.gen))
        if j == 0:
            self.run_stage(0, *fresh())
        else:
            self.run_stage(j)
