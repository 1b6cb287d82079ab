"""Cut a user's ``nn.Module`` into DGL stages before named submodules, size the heads by a probe,
and map the stages' parameters back to the user's names.

Why ``torch.fx.symbolic_trace`` and not ``torch.export`` (or ``torch.distributed.pipelining``,
which traces with it): an exported graph records BatchNorm and dropout as aten ops whose mode is
fixed when it is traced: its ``eval()`` raises ``NotImplementedError``, and a pipelining stage
switched to eval still normalises with batch statistics and still drops units (measured with torch
2.14: its eval output differs from the model's and from call to call), a silent wrong result at
evaluation. ``symbolic_trace`` keeps every ``torch.nn`` layer as a ``call_module`` of the user's
own module object, so ``train()`` / ``eval()`` switch it as in the original, the parameters are
shared with the user's model (not copied), and each stage's parameter names are the original
model's (``layer2.0.conv1.weight``). What fx cannot keep is Python in a custom ``forward`` that
reads ``self.training``: the model is traced in both modes and refused when the two graphs differ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .heads import AuxHead, LogitsHead

__all__ = ["cut_module", "probe_heads", "export_names"]


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _trace(model: nn.Module) -> fx.GraphModule:
    """``symbolic_trace`` of ``model`` in train mode, refused when eval mode traces differently."""
    modes = [m.training for m in model.modules()]
    traced = []
    try:
        for training in (True, False):
            model.train(training)
            try:
                traced.append(fx.symbolic_trace(model))
            except Exception as exc:
                raise ValueError(f"from_module traces the model with torch.fx.symbolic_trace, which fails on "
                                 f"{type(model).__name__}: {_first_line(exc)}") from exc
    finally:
        for m, t in zip(model.modules(), modes):
            m.training = t
    if traced[0].code != traced[1].code:
        raise ValueError(f"{type(model).__name__}.forward computes differently in train and eval mode outside torch.nn "
                         "layers (it reads self.training); a traced graph would freeze one mode: use nn.Dropout / "
                         "nn.BatchNorm modules for what depends on the mode")
    return traced[0]


def _module_of(node: fx.Node) -> dict:
    return node.meta.get("nn_module_stack") or {}


def cut_module(model: nn.Module, split: Sequence[str]) -> list[fx.GraphModule]:
    """``model`` cut before each submodule named in ``split`` (in the order ``forward`` calls
    them): K = len(split) + 1 ``GraphModule`` stages sharing ``model``'s layers, stage j's output
    the one tensor stage j+1 reads. Raises a ValueError naming the split when more than one value
    (a skip connection) or a parameter or buffer (a layer called on both sides, tied weights)
    spans it."""
    if isinstance(split, str) or not all(isinstance(s, str) and s for s in split) or len(split) == 0:
        raise ValueError(f"split must be a non-empty list of submodule names, e.g. ['layer2', 'layer3'], got {split!r}")
    names = dict(model.named_modules())
    for s in split:
        if s not in names or s == "":
            near = [n for n in names if n and "." not in n][:8]
            raise ValueError(f"split names {s!r}, not a submodule of {type(model).__name__} (its children: "
                             f"{', '.join(near)})")
    if len(set(split)) != len(split):
        raise ValueError(f"split names a submodule twice: {list(split)}")
    gm = _trace(model)
    nodes = list(gm.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise ValueError(f"from_module cuts a model whose forward takes one input, {type(model).__name__}.forward "
                         f"takes {len(inputs)} ({', '.join(n.name for n in inputs)})")
    body = [n for n in nodes if n.op not in ("placeholder", "output")]
    starts = []
    for s in split:
        at = next((i for i, n in enumerate(body) if s in _module_of(n)), None)
        if at is None:
            raise ValueError(f"split {s!r}: forward never calls that submodule")
        if starts and at <= starts[-1][1]:
            raise ValueError(f"split must name submodules in the order forward calls them: {s!r} runs before "
                             f"{starts[-1][0]!r}")
        if at == 0:
            raise ValueError(f"split {s!r}: it is the first thing forward calls, so the stage before it would be empty")
        starts.append((s, at))
    bounds = [0] + [at for _, at in starts] + [len(body)]
    seg = {inputs[0]: -1}
    for j, (a, b) in enumerate(zip(bounds, bounds[1:])):
        for n in body[a:b]:
            seg[n] = j
    out_node = nodes[-1]
    seg[out_node] = len(bounds) - 2
    if not isinstance(out_node.args[0], fx.Node):
        raise ValueError(f"from_module needs a forward that returns one tensor, {type(model).__name__}.forward "
                         f"returns {type(out_node.args[0]).__name__}")
    crossing = []
    for b, (s, _) in enumerate(starts, start=1):
        live = [n for n in [inputs[0], *body] if seg[n] < b and any(seg[u] >= b for u in n.users)]
        if len(live) != 1 or live[0].op == "get_attr":
            raise ValueError(f"split {s!r}: {len(live)} values cross it ({', '.join(n.name for n in live)}): a skip "
                             "connection (or a parameter) spans the split; cut where one tensor flows from one stage "
                             "to the next")
        crossing.append(live[0])
    stages = []
    for j in range(len(bounds) - 1):
        g = fx.Graph()
        src = inputs[0] if j == 0 else crossing[j - 1]
        env = {src: g.placeholder("x")}
        for n in body[bounds[j]:bounds[j + 1]]:
            env[n] = g.node_copy(n, env.__getitem__)
        g.output(env[crossing[j]] if j < len(crossing) else env[out_node.args[0]])
        g.lint()
        stages.append(fx.GraphModule(gm, g, class_name=f"{type(model).__name__}Stage{j}"))
    _check_disjoint(stages, split)
    return stages


def _check_disjoint(stages: list[nn.Module], split: Sequence[str]) -> None:
    """Refuse a tensor (a parameter, a buffer: a layer called twice, tied weights) that two stages
    would hold: two optimizers would step it, two devices would want it."""
    first: dict[int, tuple[int, str]] = {}
    for j, stage in enumerate(stages):
        for name, t in [*stage.named_parameters(remove_duplicate=False), *stage.named_buffers(remove_duplicate=False)]:
            i, was = first.setdefault(id(t), (j, name))
            if i != j:
                also = f" (as {name!r} after it)" if name != was else ""
                raise ValueError(f"split {split[i]!r}: {was!r} is used on both sides of it{also}: weights shared across "
                                 "a split; cut elsewhere")


def probe_heads(stages: Sequence[nn.Module], x: torch.Tensor, aux: str, num_classes: int | None, last_head: str,
                hidden: int | None, where: str = "") -> list[nn.Module]:
    """A head per stage, sized by running ``x`` through the stages (eval mode, no gradient; the
    modes are restored): an :class:`AuxHead` of kind ``aux`` on stages 1..K-1 (outputs [B, C, H,
    W]); on the last, a :class:`LogitsHead` when it ends in logits [B, num_classes] (``num_classes``
    None: the width of that output), else an :class:`AuxHead` of kind ``last_head``. ``where``
    follows the input shape in a failing stage's message."""
    mods = [m for s in stages for m in s.modules()]
    modes = [m.training for m in mods]
    shapes = []
    try:
        with torch.no_grad():
            for m in mods:
                m.training = False
            for j, stage in enumerate(stages):
                try:
                    x = stage(x)
                except (RuntimeError, ValueError) as exc:
                    raise ValueError(f"stage {j} fails on input of shape {list(x.shape)}{where}: {_first_line(exc)}") from exc
                if not isinstance(x, torch.Tensor):
                    raise ValueError(f"stage {j} returns {type(x).__name__}; a stage must return one tensor")
                shapes.append(tuple(x.shape))
    finally:
        for m, t in zip(mods, modes):
            m.training = t
    K, last = len(stages), shapes[-1]
    if len(last) == 2:
        if num_classes is not None and last[1] != num_classes:
            raise ValueError(f"the last stage outputs shape {list(last)}, not logits [B, num_classes={num_classes}]; "
                             f"give num_classes={last[1]}, or end the model in a feature map [B, C, H, W] for a head "
                             "to be added")
        num_classes = int(last[1])
    elif num_classes is None:
        raise ValueError(f"num_classes is needed: the last stage outputs shape {list(last)}, not logits [B, classes]")
    heads: list[nn.Module] = []
    for j, shape in enumerate(shapes):
        if j == K - 1 and len(shape) == 2:
            heads.append(LogitsHead(num_classes))
        elif len(shape) != 4:
            where = "the last stage" if j == K - 1 else f"stage {j}"
            raise ValueError(f"{where} outputs shape {list(shape)}; an AuxHead needs [B, C, H, W]"
                             f"{' (the last stage may end in logits [B, classes])' if j < K - 1 else ' or logits'}")
        else:
            heads.append(AuxHead(shape[1], shape[2:], num_classes, kind=last_head if j == K - 1 else aux, hidden=hidden))
    return [h.to(device=x.device, dtype=x.dtype if x.is_floating_point() else None) for h in heads]


def export_names(original: nn.Module, stages: Sequence[nn.Module]) -> tuple[list[tuple[str, str]], dict]:
    """Which ``stages.<j>.<key>`` entry is which of ``original``'s state-dict names (matched by
    tensor identity, so tied weights get every name), and a copy of the entries no stage holds
    (never trained: layers forward does not call)."""
    by_id: dict[int, list[str]] = {}
    orig = original.state_dict(keep_vars=True)
    for name, t in orig.items():
        by_id.setdefault(id(t), []).append(name)
    pairs, seen = [], set()
    for j, stage in enumerate(stages):
        for key, t in stage.state_dict(keep_vars=True).items():
            for name in by_id.get(id(t), []):
                if name not in seen:
                    pairs.append((f"stages.{j}.{key}", name))
                    seen.add(name)
    extra = {name: t.detach().clone() for name, t in orig.items() if name not in seen}
    return pairs, extra
