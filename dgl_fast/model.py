"""DecoupledModel: a CNN cut into K stages, each with its own auxiliary head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from .heads import AuxHead

__all__ = ["DecoupledModel"]


def _probe_input(input_shape: Sequence[int], module: nn.Module) -> torch.Tensor:
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in input_shape):
        raise ValueError(f"input_shape must be positive ints per sample, e.g. (3, 32, 32), got {tuple(input_shape)!r}")
    try:
        ref = next(module.parameters())
        device, dtype = ref.device, ref.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    gen = torch.Generator().manual_seed(0)
    return torch.randn((2, *input_shape), generator=gen).to(device=device, dtype=dtype)


class DecoupledModel(nn.Module):
    """K stages ``f_1 .. f_K`` and their heads ``a_1 .. a_K``; ``heads[-1]`` is the classifier.

    It is an ordinary ``nn.Module``: ``forward(x)`` is plain inference through every stage and the
    last head, so a trained model deploys like any other (``state_dict``, ``.to()``, ``eval()``).
    Training happens in :class:`dgl_fast.Trainer`, which gives each stage (with its head) its own
    loss and optimizer.

    Args:
        stages: K modules, applied in order.
        heads: K modules mapping each stage's output to logits.
        input_shape: optional per-sample input shape, e.g. ``(3, 32, 32)``. When given, a shape
            probe (batch 2, eval mode, no gradient, nothing changes) checks at construction that
            every head accepts its stage's output.
    """

    def __init__(self, stages: Sequence[nn.Module], heads: Sequence[nn.Module], input_shape: Sequence[int] | None = None):
        super().__init__()
        stages, heads = list(stages), list(heads)
        if len(stages) == 0:
            raise ValueError("DecoupledModel needs at least one stage, got 0")
        if len(stages) != len(heads):
            raise ValueError(f"expected one head per stage: got {len(stages)} stages and {len(heads)} heads")
        for kind, mods in (("stage", stages), ("head", heads)):
            for j, m in enumerate(mods):
                if not isinstance(m, nn.Module):
                    raise TypeError(f"{kind} {j} must be an nn.Module, got {type(m).__name__}")
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)
        self.input_shape = tuple(int(s) for s in input_shape) if input_shape is not None else None
        if self.input_shape is not None:
            self.check_shapes(self.input_shape)

    @property
    def num_stages(self) -> int:
        """K, the number of stages."""
        return len(self.stages)

    @property
    def num_classes(self) -> int | None:
        """Classes of the last head when it is an :class:`AuxHead`, else None."""
        head = self.heads[-1]
        return head.num_classes if isinstance(head, AuxHead) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.heads[-1](x)

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every head (inference): entry j is head j applied to stage j's output."""
        out = []
        for stage, head in zip(self.stages, self.heads):
            x = stage(x)
            out.append(head(x))
        return out

    def stage_parameters(self, j: int) -> list[nn.Parameter]:
        """Parameters trained by stage j's optimizer: those of stage j and of head j."""
        return list(self.stages[j].parameters()) + list(self.heads[j].parameters())

    @torch.no_grad()
    def check_shapes(self, input_shape: Sequence[int]) -> list[tuple[tuple[int, ...], int]]:
        """Run a batch-2 probe through every stage and head.

        Returns, for each stage, its per-sample output shape and the number of logits of its head.

        Raises a ValueError naming the stage whose head rejects its output. Runs in eval mode
        without gradients, so neither parameters nor BatchNorm statistics change.
        """
        was_training = [m.training for m in self.modules()]
        self.eval()
        shapes = []
        try:
            x = _probe_input(input_shape, self)
            for j, (stage, head) in enumerate(zip(self.stages, self.heads)):
                try:
                    x = stage(x)
                except Exception as exc:
                    raise ValueError(f"stage {j} fails on input of shape {list(x.shape)}: {exc}") from exc
                try:
                    logits = head(x)
                except Exception as exc:
                    raise ValueError(f"head {j} does not accept stage {j}'s output "
                                     f"(shape {list(x.shape)}): {exc}") from exc
                if logits.dim() != 2:
                    raise ValueError(f"head {j} must return logits [B, classes], got shape {list(logits.shape)}")
                shapes.append((tuple(x.shape[1:]), int(logits.shape[1])))
        finally:
            for m, t in zip(self.modules(), was_training):
                m.training = t
        return shapes

    @classmethod
    def from_sequential(cls, seq: nn.Sequential, split: Sequence[int], aux: str = "mlp-sr", num_classes: int = 10,
                        input_shape: Sequence[int] = (3, 32, 32), last_head: str = "last",
                        hidden: int | None = None) -> DecoupledModel:
        """Cut ``seq`` before each index in ``split`` and give every piece an :class:`AuxHead`.

        ``split=[3, 7]`` makes stages ``seq[0:3]``, ``seq[3:7]``, ``seq[7:]``. Each head's channels
        and size are inferred by a shape probe at ``input_shape``; the last stage gets a
        ``last_head`` head. Modules are shared with ``seq``, not copied.
        """
        if not isinstance(seq, nn.Sequential):
            raise TypeError(f"from_sequential expects an nn.Sequential, got {type(seq).__name__}")
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in split):
            raise ValueError(f"split must be a list of int indices, got {list(split)!r}")
        split = list(split)
        n = len(seq)
        bounds = [0] + split + [n]
        for a, b in zip(bounds, bounds[1:]):
            if not a < b:
                raise ValueError(f"split must be strictly increasing indices in (0, {n}), got {split}")
        stages = [nn.Sequential(*[seq[i] for i in range(a, b)]) for a, b in zip(bounds, bounds[1:])]
        heads = []
        probe = DecoupledModel(stages, [nn.Identity() for _ in stages])
        was_training = [m.training for m in probe.modules()]
        probe.eval()
        try:
            with torch.no_grad():
                x = _probe_input(input_shape, probe)
                for j, stage in enumerate(stages):
                    try:
                        x = stage(x)
                    except (RuntimeError, ValueError) as exc:
                        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                        raise ValueError(f"stage {j} fails on input of shape {list(x.shape)} (input_shape="
                                         f"{tuple(input_shape)}): {first}") from exc
                    if x.dim() != 4:
                        raise ValueError(f"stage {j} outputs shape {list(x.shape)}; an AuxHead needs [B, C, H, W]")
                    kind = last_head if j == len(stages) - 1 else aux
                    heads.append(AuxHead(x.shape[1], tuple(x.shape[2:]), num_classes, kind=kind, hidden=hidden))
        finally:
            for m, t in zip(probe.modules(), was_training):
                m.training = t
        device = next(iter(seq.parameters()), torch.empty(0)).device
        heads = [h.to(device) for h in heads]
        return cls(stages, heads, input_shape=input_shape)
