"""DecoupledModel: a CNN cut into K stages, each with its own auxiliary head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from .cutting import cut_module, export_names, probe_heads
from .heads import AuxHead, LogitsHead

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
        """Classes of the last head when it is an :class:`AuxHead` or a :class:`LogitsHead`, else None."""
        head = self.heads[-1]
        return head.num_classes if isinstance(head, AuxHead | LogitsHead) else None

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

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The stages' weights under the names of the model they were cut from
        (:meth:`from_module`, :meth:`from_sequential`): ``original.load_state_dict(net.export_state_dict())``
        loads with ``strict=True``. Heads are not included (the original has none; a
        :class:`LogitsHead` is the original's own classifier, inside the last stage)."""
        names = getattr(self, "_export_names", None)
        if names is None:
            raise ValueError("export_state_dict needs a model made by DecoupledModel.from_module or from_sequential, "
                             "which know the original names")
        pairs, extra = names
        state = self.state_dict()
        out = {orig: state[key] for key, orig in pairs}
        out.update({k: v.clone() for k, v in extra.items()})
        return out

    @classmethod
    def _cut(cls, original: nn.Module, stages: list[nn.Module], x: torch.Tensor, aux: str, num_classes: int | None,
             last_head: str, hidden: int | None, where: str = "") -> DecoupledModel:
        heads = probe_heads(stages, x, aux, num_classes, last_head, hidden, where)
        net = cls(stages, heads, input_shape=tuple(x.shape[1:]))
        net._export_names = export_names(original, stages)
        return net

    @classmethod
    def from_module(cls, model: nn.Module, split: Sequence[str], example_input: torch.Tensor, aux: str = "mlp-sr",
                    num_classes: int | None = None, last_head: str = "last", hidden: int | None = None) -> DecoupledModel:
        """Cut ``model`` (any module ``torch.fx.symbolic_trace`` can trace: torchvision's, timm's,
        one with its own ``forward``) before each submodule named in ``split``, e.g.
        ``split=["layer2", "layer3", "layer4"]`` for a torchvision ResNet: K = len(split) + 1 stages.

        The stages share ``model``'s layers (the same module objects, so ``train()``/``eval()``
        switch BatchNorm and dropout as in the original, and in eval mode ``net(x)`` equals
        ``model(x)`` bitwise); :meth:`export_state_dict` gives the weights under ``model``'s names.
        Stages 1..K-1 get an :class:`AuxHead` of kind ``aux`` sized by a probe on ``example_input``
        (a batch, eval mode, no gradient). When the last stage ends in logits ``[B, num_classes]``
        (the model's own classifier) its head is a :class:`LogitsHead` (cross-entropy on that
        output, nothing added; ``num_classes=None`` takes that width); otherwise it gets an
        ``AuxHead`` of kind ``last_head``. Refused, with a message naming the split: a value other
        than the one hand-off tensor crossing a split (a skip connection), a parameterised layer
        used on both sides of one, a ``forward`` that computes differently in eval mode outside
        ``torch.nn`` layers (it reads ``self.training``; a traced graph would freeze it). Why fx
        and not ``torch.export``: see :mod:`dgl_fast.cutting`.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"from_module expects an nn.Module, got {type(model).__name__}")
        if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
            given = list(example_input.shape) if isinstance(example_input, torch.Tensor) else type(example_input).__name__
            raise ValueError(f"example_input must be a batch tensor [B, ...], e.g. torch.randn(2, 3, 32, 32), got {given}")
        return cls._cut(model, cut_module(model, split), example_input, aux, num_classes, last_head, hidden)

    @classmethod
    def from_sequential(cls, seq: nn.Sequential, split: Sequence[int], aux: str = "mlp-sr", num_classes: int = 10,
                        input_shape: Sequence[int] = (3, 32, 32), last_head: str = "last",
                        hidden: int | None = None) -> DecoupledModel:
        """Cut ``seq`` before each index in ``split`` and give every piece an :class:`AuxHead`.

        ``split=[3, 7]`` makes stages ``seq[0:3]``, ``seq[3:7]``, ``seq[7:]``. Each head's channels
        and size are inferred by a shape probe at ``input_shape``. A ``seq`` that ends in its own
        classifier (logits ``[B, num_classes]``, e.g. ``..., AdaptiveAvgPool2d(1), Flatten(),
        Linear(C, 10)``) keeps it as the final head (a :class:`LogitsHead`: cross-entropy on its
        output, nothing added); otherwise the last stage gets a ``last_head`` head. Modules are
        shared with ``seq``, not copied; :meth:`export_state_dict` gives ``seq``'s names back.
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
        x = _probe_input(input_shape, seq)
        return cls._cut(seq, stages, x, aux, num_classes, last_head, hidden, f" (input_shape={tuple(input_shape)})")
