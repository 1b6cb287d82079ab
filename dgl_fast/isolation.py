"""Proof that no gradient crosses a local module: :func:`check_isolation`.

Local learning promises that module j's loss trains module j (its stage and its auxiliary
networks) and nothing else, and that what module j hands on to module j + 1 carries no graph.
:func:`check_isolation` shows both for one batch, per module, from the autograd graph itself:

- it deep-copies the trainer's model with its stage steps and optimizers (one
  ``copy.deepcopy``, so the copies keep sharing what the originals share) and runs each copied
  stage step (:class:`~dgl_fast.stage.StageStep`, the unit every engine calls: forward, local
  loss, backward, optimizer step, hand-off) on the batch in turn, module by module as the
  sequential engine feeds them (``mode="backprop"``: the one end-to-end step). **The trainer
  itself is not changed**: its parameters, optimizer state, BatchNorm statistics, step counters
  and RNG state are as before (the copy trains one step and is dropped);
- before the backward, it walks the loss's graph (``loss.grad_fn`` and every
  ``next_functions``) to the ``AccumulateGrad`` nodes, i.e. exactly the leaf tensors a
  backward of that loss writes a gradient to (the tensors ``torch.autograd.grad(loss, params,
  allow_unused=True)`` returns non-None for);
- a reached tensor that is not a parameter of this module alone (another module's, one shared
  with another module, or no module's) is a **leak**; so is a handed-on activation that
  requires grad or has a ``grad_fn`` (the next module's loss could reach back through it).

``mode="backprop"`` is one module: the stages and the last head (the intermediate heads are
not trained, and reaching one is a leak).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .utils import hand_off

__all__ = ["check_isolation", "IsolationReport", "ModuleIsolation", "IsolationError"]


class IsolationError(ValueError):
    """A gradient crosses a local module (:func:`check_isolation`); the message lists every leak
    on one line. A ValueError, so that ``train --check-isolation`` ends with exit status 2."""


@dataclass(frozen=True)
class ModuleIsolation:
    """One module's result: ``index`` (0-based), ``name``; ``reached``: the parameter names the
    loss's graph reaches; ``owned``: how many parameters the module owns (its stage's and its
    auxiliary networks'); ``leaks``: one text per leak; ``hands_on_grad``: whether the activation
    it hands on requires grad (None for the last module, which hands nothing on)."""

    index: int
    name: str
    reached: tuple[str, ...]
    owned: int
    leaks: tuple[str, ...]
    hands_on_grad: bool | None

    @property
    def ok(self) -> bool:
        """No leak."""
        return not self.leaks


@dataclass(frozen=True)
class IsolationReport:
    """What :func:`check_isolation` found: ``modules`` (one :class:`ModuleIsolation` each)."""

    modules: tuple[ModuleIsolation, ...]

    @property
    def ok(self) -> bool:
        """True when no module leaks."""
        return all(m.ok for m in self.modules)

    @property
    def leaks(self) -> list[str]:
        """Every leak, ``"module j: ..."``."""
        return [f"{m.name}: {leak}" for m in self.modules for leak in m.leaks]

    def raise_if_leaks(self) -> None:
        """Raise :class:`IsolationError` listing every leak (nothing when there is none)."""
        if not self.ok:
            leaks = self.leaks
            shown = "; ".join(leaks[:8]) + (f"; ... {len(leaks) - 8} more" if len(leaks) > 8 else "")
            raise IsolationError(f"a gradient crosses local modules ({len(leaks)} leaks): {shown}")

    def __str__(self) -> str:
        rows = [("module", "params reached / owned", "leaks", "hands on requires_grad")]
        for m in self.modules:
            hands = "-" if m.hands_on_grad is None else ("YES" if m.hands_on_grad else "no")
            rows.append((m.name, f"{len(m.reached)} / {m.owned}", str(len(m.leaks)) if m.leaks else "none", hands))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        verdict = ("isolated: every module's loss reaches only its own parameters, nothing handed on requires grad"
                   if self.ok else "NOT isolated:\n  " + "\n  ".join(self.leaks))
        return "\n".join(lines + [verdict])


def reached_leaves(loss: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors a backward of ``loss`` writes gradients to (its graph's ``AccumulateGrad``
    nodes), in the order the walk meets them."""
    if loss.grad_fn is None:
        return [loss] if loss.requires_grad else []
    seen, stack, found = set(), [loss.grad_fn], {}
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)  # AccumulateGrad: the leaf it accumulates into
        if var is not None:
            found.setdefault(id(var), var)
            continue
        stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
    return list(found.values())


def _grad_attached(t: torch.Tensor) -> bool:
    return bool(t.requires_grad or t.grad_fn is not None)


def _module_name(model, j: int, K: int) -> str:
    layers = getattr(model, "module_layers", None)
    where = f" {layers[j][0]}..{layers[j][-1]}" if layers is not None and j < len(layers) else ""
    return f"module {j + 1}/{K}{where}"


class _Recorder:
    """Wraps a step's ``forward_loss``: the loss's reached leaves, taken before the backward."""

    def __init__(self, step):
        self.original, self.reached = step.forward_loss, None
        step.forward_loss = self

    def __call__(self, *args, **kwargs):
        out = self.original(*args, **kwargs)
        # StageStep: (h, loss, correct); BackpropStep: (loss, correct): the 0-dim floating tensor
        loss = next(t for t in out if isinstance(t, torch.Tensor) and t.dim() == 0 and t.is_floating_point())
        self.reached = reached_leaves(loss)
        return out

    def result(self) -> list[torch.Tensor]:
        if self.reached is None:
            raise RuntimeError("the stage step never called its forward_loss: check_isolation cannot see its loss")
        return self.reached


def _verdict(j, name, reached, own, owners, names, handed) -> ModuleIsolation:
    leaks = []
    for t in reached:
        who = owners.get(id(t), [])
        label = names.get(id(t), f"a tensor of shape {list(t.shape)} that is no module's parameter")
        if not who:
            leaks.append(f"reaches {label}")
        elif who != [j]:
            others = ", ".join(f"module {i + 1}" for i in who if i != j)
            leaks.append(f"reaches {label} ({'shared with ' if j in who else 'owned by '}{others})")
    hands_on = None if handed is None else _grad_attached(handed)
    if hands_on:
        leaks.append(f"hands on an activation that requires grad (grad_fn {type(handed.grad_fn).__name__})")
    reached_names = tuple(names.get(id(t), f"<tensor {list(t.shape)}>") for t in reached)
    return ModuleIsolation(j, name, reached_names, len({id(p) for p in own}), tuple(leaks), hands_on)


def check_isolation(trainer, x: torch.Tensor, y: torch.Tensor, strict: bool = True) -> IsolationReport:
    """Show, for one batch ``(x, y)``, that each local module's loss reaches only its own
    parameters (its stage's and its auxiliary networks') and that nothing it hands on requires
    a gradient (see the module docstring for how).

    Runs on a deep copy of ``trainer``'s model, stage steps and optimizers (for a moment, twice
    the trainer's memory): the trainer's parameters, optimizer state, BatchNorm statistics,
    counters and RNG state do not change (batches inside a pipeline stay there).
    ``strict=True`` (default) raises :class:`IsolationError` listing every leak; ``strict=False``
    returns the :class:`IsolationReport` either way (``report.ok``, ``report.raise_if_leaks()``;
    ``print(report)`` shows the table)."""
    if not all(hasattr(trainer, a) for a in ("steps", "backprop_step", "prepare_batch")):
        raise TypeError(f"check_isolation expects a dgl_fast.Trainer, got {type(trainer).__name__}")
    x, y = trainer.prepare_batch(x, y)
    devices = sorted({p.device for p in trainer.model.parameters() if p.device.type == "cuda"}, key=str)
    for d in devices:  # stage streams may still write parameters: copy what they wrote (no flush: no change)
        torch.cuda.synchronize(d)
    model, steps, bp_step = copy.deepcopy((trainer.model, trainer.steps, trainer.backprop_step))
    names = {id(p): n for n, p in model.named_parameters()}
    K = model.num_stages
    results = []
    with torch.random.fork_rng(devices=devices):
        model.train()
        if steps:
            units = [[p for m in (s.stage, s.head) for p in m.parameters()] for s in steps]
            owners: dict[int, list[int]] = {}
            for j, params in enumerate(units):
                for p in params:
                    if j not in owners.setdefault(id(p), []):
                        owners[id(p)].append(j)
            h = x
            for j, step in enumerate(steps):
                rec = _Recorder(step)
                image = hand_off(x, step.device) if step.needs_image else None
                h, _, _ = step.step(hand_off(h, step.device), hand_off(y, step.device), image)
                handed = h if j < K - 1 else None
                results.append(_verdict(j, _module_name(model, j, K), rec.result(), units[j], owners, names, handed))
        else:  # backprop: the stages and the last head are one module
            own = [p for s in model.stages for p in s.parameters()] + list(model.heads[-1].parameters())
            owners = {id(p): [0] for p in own}
            for n, p in model.heads[:-1].named_parameters(prefix="heads"):
                if id(p) not in owners:  # no module trains an intermediate head
                    names[id(p)] = f"{n} (an intermediate head, not trained)"
            rec = _Recorder(bp_step)
            bp_step.step(x, y)
            results.append(_verdict(0, f"backprop: stages 1..{K} + head {K}", rec.result(), own, owners, names, None))
    report = IsolationReport(tuple(results))
    if strict:
        report.raise_if_leaks()
    return report
