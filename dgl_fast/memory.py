"""What a DGL training step keeps in memory, stage by stage, against end-to-end backprop.

DGL's memory argument (PAPER.md section 1): a stage's backward needs only its own activations,
so the sequential engine holds one stage's activations at a time, where backprop holds every
stage's until its backward. :func:`memory_report` measures the parts exactly, on any device, by
running each stage's forward, head and loss once with ``torch.autograd.graph.saved_tensors_hooks``
and adding up the distinct storages autograd keeps for the backward:

- resident: parameters and the optimizer's state (momentum buffers, Adam moments; before the
  first step, the state the optimizer will create);
- gradients: allocated by a stage's backward; the trainer frees them after each optimizer step
  (``zero_grad(set_to_none=True)``), except in CUDA graphs, which keep them in graph memory;
- per step: the stage's input (the hand-off from the previous stage), the tensors the stage and
  its head save for the backward (activations; parameters excluded, they are resident), and the
  stage's output.

Totals, at the granularity of a stage (an upper bound inside it: its activations are freed while
its gradients are allocated): ``dgl_sequential`` = resident + the largest (stage step + that
stage's gradients); ``dgl_pipelined`` = resident + every gradient + every stage step at once, with
double-buffered hand-offs (the streams engine); ``backprop`` (the stages and the last head, one
optimizer) = resident + the largest, over the backward's position j, of the activations of stages
1..j (inputs included) + the gradients of stages j..K (+ the last head's activations at j = K).
Workspaces of cuDNN / cuBLAS and allocator fragmentation are not included: on a GPU,
``python -m dgl_fast bench overlap`` reports the allocator's measured peaks beside these figures.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch

from .model import DecoupledModel

__all__ = ["StageMemory", "MemoryReport", "memory_report"]


@dataclass
class StageMemory:
    """Bytes of one stage (with its head) in a training step."""

    params: int
    grads: int
    optimizer_state: int
    input: int
    saved_stage: int  # activations the stage's layers keep for their backward
    saved_head: int  # activations its auxiliary head (and loss) keep
    output: int
    backprop_grads: int = 0  # its gradients in end-to-end backprop (the stage; the last adds its head)

    @property
    def resident(self) -> int:
        """Always allocated: parameters and optimizer state."""
        return self.params + self.optimizer_state

    @property
    def step(self) -> int:
        """Activations alive during this stage's step."""
        return self.input + self.saved_stage + self.saved_head + self.output


@dataclass
class MemoryReport:
    """Per-stage bytes and the totals of each way of training (see the module docstring)."""

    batch_size: int
    stages: list[StageMemory]
    backprop_resident: int  # stages and last head: parameters and optimizer state
    backprop_last_head_saved: int

    @property
    def dgl_sequential(self) -> int:
        return sum(s.resident for s in self.stages) + max(s.step + s.grads for s in self.stages)

    @property
    def dgl_pipelined(self) -> int:
        # every stage's step at once; each hand-off counted as an output and as an input: two buffers
        return (sum(s.resident + s.grads for s in self.stages) + sum(s.step for s in self.stages)
                + self.stages[0].input)

    @property
    def backprop_activations(self) -> int:
        """What backprop's forward keeps: every stage's input and saved tensors, the last head's."""
        return sum(s.input + s.saved_stage for s in self.stages) + self.backprop_last_head_saved

    @property
    def backprop(self) -> int:
        K = len(self.stages)
        peak = 0
        for j in reversed(range(K)):  # the backward at stage j: activations of 1..j, gradients of j..K
            acts = sum(s.input + s.saved_stage for s in self.stages[:j + 1])
            acts += self.backprop_last_head_saved if j == K - 1 else 0
            peak = max(peak, acts + sum(s.backprop_grads for s in self.stages[j:]))
        return self.backprop_resident + peak

    def as_dict(self) -> dict:
        return {"batch_size": self.batch_size, "stages": [asdict(s) for s in self.stages],
                "backprop_activations": self.backprop_activations,
                "dgl_sequential": self.dgl_sequential, "dgl_pipelined": self.dgl_pipelined, "backprop": self.backprop}

    def table(self) -> str:
        """A markdown table in MiB."""
        def mib(n):
            return f"{n / 2**20:.1f}"

        lines = ["| stage | params | grads | optimizer | input | saved (stage) | saved (head) | output | step |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for j, s in enumerate(self.stages):
            lines.append(f"| {j + 1} | {mib(s.params)} | {mib(s.grads)} | {mib(s.optimizer_state)} | {mib(s.input)} | "
                         f"{mib(s.saved_stage)} | {mib(s.saved_head)} | {mib(s.output)} | {mib(s.step)} |")
        lines += ["", "Gradients live during their stage's step only (sequential engine) or always (pipelined).",
                  f"Totals (MiB): DGL sequential {mib(self.dgl_sequential)}, DGL pipelined "
                      f"{mib(self.dgl_pipelined)}, end-to-end backprop {mib(self.backprop)}."]
        return "\n".join(lines)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _optimizer_state_bytes(opt: torch.optim.Optimizer | None, params: list[torch.Tensor]) -> int:
    """Bytes of ``opt``'s state for ``params``; before its first step, what it will allocate."""
    if opt is None:
        return 0
    ids = {id(p) for p in params}
    existing = [v for p, st in opt.state.items() if id(p) in ids for v in st.values()
                if isinstance(v, torch.Tensor) and v.dim() > 0]
    if existing:
        return _nbytes(existing)
    per_param = 0
    group = opt.param_groups[0]
    if isinstance(opt, torch.optim.SGD):
        per_param = 1 if group.get("momentum", 0) else 0
    elif isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
        per_param = 3 if group.get("amsgrad", False) else 2
    elif isinstance(opt, torch.optim.RMSprop):
        per_param = 1 + bool(group.get("momentum", 0)) + bool(group.get("centered", False))
    return per_param * _nbytes(p for p in params if p.requires_grad)


class _SavedTensors:
    """Distinct storages autograd saves while active, excluding some (parameters, the input)."""

    def __init__(self, exclude):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.seen: dict[int, int] = {}

    def _pack(self, t: torch.Tensor):
        if t.device.type != "meta":
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self.exclude and ptr != 0:
                self.seen[ptr] = storage.nbytes()
        return t

    @contextlib.contextmanager
    def recording(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield

    @property
    def nbytes(self) -> int:
        return sum(self.seen.values())


def memory_report(model: DecoupledModel, x: torch.Tensor, y: torch.Tensor,
                  optimizers: list[torch.optim.Optimizer] | None = None, autocast=None) -> MemoryReport:
    """Measure a training step's memory on batch ``(x, y)`` (see the module docstring).

    Runs each stage's forward, head and loss once (no backward, no parameter change; BatchNorm
    running statistics are restored). ``optimizers``: one per stage (DGL), to count their state;
    ``autocast``: a context manager factory (e.g. ``Trainer._autocast``) for mixed precision.
    """
    if not isinstance(model, DecoupledModel):
        raise TypeError(f"memory_report expects a dgl_fast.DecoupledModel, got {type(model).__name__}")
    K = model.num_stages
    if optimizers is not None and len(optimizers) != K:
        raise ValueError(f"expected one optimizer per stage ({K}), got {len(optimizers)}")
    autocast = autocast or contextlib.nullcontext
    buffers = [b.detach().clone() for b in model.buffers()]
    was_training = [m.training for m in model.modules()]
    model.train()
    stages = []
    last_head_saved = 0
    try:
        h = x
        for j in range(K):
            stage, head = model.stages[j], model.heads[j]
            params = list(stage.parameters()) + list(head.parameters())
            trainable = [p for p in params if p.requires_grad]
            h_in = h.detach()
            saved_stage = _SavedTensors(params + [h_in])
            with torch.enable_grad(), autocast():
                with saved_stage.recording():
                    out = stage(h_in)
                out_ptr = out.untyped_storage().data_ptr()
                handoff = j < K - 1  # a hand-off is counted once, as the output
                if handoff:
                    saved_stage.seen.pop(out_ptr, None)
                saved_head = _SavedTensors(params + [h_in])
                saved_head.exclude |= set(saved_stage.seen) | ({out_ptr} if handoff else set())
                with saved_head.recording():
                    if getattr(head, "needs_image", False):  # InfoPro reconstructs the input
                        loss, _ = head.loss(out, y, x)
                    elif hasattr(head, "loss"):
                        loss, _ = head.loss(out, y)
                    else:
                        loss = torch.nn.functional.cross_entropy(head(out), y)
            stages.append(StageMemory(
                params=_nbytes(params), grads=_nbytes(trainable),
                optimizer_state=_optimizer_state_bytes(optimizers[j] if optimizers else None, trainable),
                input=_nbytes([h_in]), saved_stage=saved_stage.nbytes, saved_head=saved_head.nbytes,
                output=_nbytes([out]) if handoff else 0))
            if j == K - 1:
                last_head_saved = saved_head.nbytes
            del loss
            h = out.detach()
    finally:
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
        for m, t in zip(model.modules(), was_training):
            m.training = t
    # backprop trains the stages and the last head, with an optimizer of the same kind
    for j, st in enumerate(stages):
        mods = [model.stages[j]] + ([model.heads[j]] if j == K - 1 else [])
        st.backprop_grads = _nbytes([p for m in mods for p in m.parameters() if p.requires_grad])
    bp_params = [p for st in model.stages for p in st.parameters()] + list(model.heads[-1].parameters())
    grads = sum(st.grads for st in stages)
    state_per_grad_byte = sum(st.optimizer_state for st in stages) / grads if grads else 0.0
    backprop_resident = _nbytes(bp_params) + round(state_per_grad_byte * sum(st.backprop_grads for st in stages))
    return MemoryReport(batch_size=int(x.shape[0]), stages=stages, backprop_resident=backprop_resident,
                        backprop_last_head_saved=last_head_saved)
