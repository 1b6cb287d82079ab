"""The ``train`` command's local-learning options: ``--rule``, ``--local-modules`` and each rule's
options, spelled as the harness spells them (``--aux_net_depth``) or with hyphens
(``--aux-net-depth``); see :mod:`dgl_fast.rules`. Given only when set: the rule's own defaults
(the harness's) apply otherwise, and an option the chosen rule does not take is refused."""

from __future__ import annotations

import argparse

import torch

from .cli_checks import nonnegative_float, positive_float, positive_int
from .local_nets import SPLIT_TABLES
from .rules import RULES

__all__ = ["add_arguments", "uses_rule", "build_kwargs", "restore_constants", "harness_cosine", "run_isolation_check"]

# (harness name, type, help); None type: a flag
_OPTIONS = [
    ("aux_net_config", str, "classifier: DGL or a dgl_fast head kind (dgl); 0c1f..2c2f (infopro)"),
    ("aux_net_config_aux_loss", str, "infopro's decoder: 2c or 4c"),
    ("aux_net_widen", positive_float, "width factor of the auxiliary classifier (infopro, auglocal)"),
    ("aux_net_widen_aux_loss", positive_float, "width factor of infopro's decoder"),
    ("aux_net_feature_dim", positive_int, "hidden features of infopro's classifier"),
    ("hidden_dim", positive_int, "at most this many pooled features before predsim's classifier"),
    ("interpolate_mode", str, "infopro's up-sampling: bilinear or nearest"),
    ("ixx_1", float, "weight of the second loss term (reconstruction, similarity) at module 1"),
    ("ixy_1", float, "weight of the cross-entropy at module 1"),
    ("ixx_2", float, "weight of the second loss term at module K-1 (linear in between)"),
    ("ixy_2", float, "weight of the cross-entropy at module K-1"),
    ("aux_net_depth", positive_int, "auglocal: layers sampled per auxiliary network (subtracted from K)"),
    ("pyramid", None, "auglocal: depths shrink along the network"),
    ("pyramid_coeff", float, "auglocal: the pyramid's coefficient"),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the local-learning argument group (and ``--check-isolation``) to the ``train`` parser."""
    p.add_argument("--check-isolation", action="store_true",
                   help="before training, run dgl_fast.check_isolation on the first batch (on a copy: the run is "
                        "unchanged) and print its table: no module's loss reaches another module's parameters and "
                        "nothing handed on requires grad; exit 2 with one line on a leak (any model, any rule)")
    g = p.add_argument_group("local-learning rules (--model resnet32 or resnet110: the InfoPro/AugLocal harness's "
                             "network; options spelled as the harness does, e.g. --aux_net_depth, or with hyphens)")
    g.add_argument("--rule", default=None, choices=list(RULES),
                   help="local loss of every module (default: dgl's heads when --local-modules is given)")
    g.add_argument("--local-modules", "--local_module_num", dest="local_modules", type=positive_int, default=None,
                   help="K local modules, cut where the harness cuts (default 16 / 55; 1 for backprop)")
    g.add_argument("--split-table", default=None, choices=SPLIT_TABLES, help="whose split table (default auglocal)")
    g.add_argument("--droprate", type=nonnegative_float, default=None, help="dropout inside the blocks")
    r = p.add_argument_group("the harness's recipe (AugLocal's run.sh: --nesterov --cos_lr --lr 0.8 --batch-size 1024 "
                             "--weight-decay 1e-4, --data cifar10 with crop + flip)")
    r.add_argument("--nesterov", action="store_true", help="SGD with Nesterov momentum (the harness's optimizer)")
    r.add_argument("--cos-lr", "--cos_lr", dest="cos_lr", action="store_true",
                   help="the harness's cosine learning rate: warm-up from 0.01 over the first 10 epochs, then "
                        "0.5 lr (1 + cos(pi e / epochs)); replaces --lr-step/--lr-decay")
    for name, kind, text in _OPTIONS:
        flags = [f"--{name.replace('_', '-')}", f"--{name}"] if "_" in name else [f"--{name}"]
        if kind is None:
            g.add_argument(*flags, dest=name, action="store_true", default=None, help=text)
        else:
            g.add_argument(*flags, dest=name, type=kind, default=None, help=text)


def uses_rule(args) -> bool:
    """Whether this run builds the harness network (``--rule`` or ``--local-modules`` given)."""
    return args.rule is not None or args.local_modules is not None


def build_kwargs(args, spec) -> dict:
    """The keyword arguments of :func:`dgl_fast.models.build` for a ``--rule`` run; a ValueError
    names a flag that does not fit (the rule's own checks name its options)."""
    for flag, value, default in (("--aux", args.aux, "mlp-sr"), ("--stages", args.stages, None),
                                 ("--block-size", args.block_size, None), ("--depth", args.depth, None),
                                 ("--hidden", args.hidden, None)):
        if value != default:
            raise ValueError(f"argument {flag}: applies to --stages/--block-size networks; with --rule the harness "
                             "cuts by --local-modules and the rule builds the heads (--aux-net-config)")
    if (args.rule == "backprop") != (args.mode == "backprop"):
        raise ValueError(f"argument --rule: --rule backprop goes with --mode backprop (end-to-end), got --rule "
                         f"{args.rule} --mode {args.mode}")
    opts = {name: getattr(args, name) for name, _, _ in _OPTIONS if getattr(args, name) is not None}
    kw = dict(rule=args.rule, local_modules=args.local_modules, width=args.width, **opts)
    if args.split_table is not None:
        kw["split_table"] = args.split_table
    if args.droprate is not None:
        kw["droprate"] = args.droprate
    if (args.rule or "dgl") == "infopro":
        kw["image_mean"], kw["image_std"] = restore_constants(spec.train, spec.in_channels)
    return kw


def restore_constants(loader, channels: int) -> tuple[tuple, tuple]:
    """InfoPro's un-normalisation for ``loader``'s batches: ``x * std + mean`` is the loader's raw
    image rescaled to [0, 1] (CIFAR's uint8 images: the image itself, the harness's target; the
    harness's own constants assume CIFAR normalised its way, dgl_fast's loaders use others)."""
    mean, std, raw = getattr(loader, "mean", None), getattr(loader, "std", None), getattr(loader, "x", None)
    m = mean.flatten().tolist() if mean is not None else [0.0] * channels
    s = std.flatten().tolist() if std is not None else [1.0] * channels
    lo, hi = 0.0, 1.0
    if raw is not None and raw.dtype != torch.uint8 and raw.numel():
        lo, hi = float(raw.min()), float(raw.max())
    span = hi - lo if hi > lo else 1.0
    return tuple((v - lo) / span for v in m), tuple(v / span for v in s)


def harness_cosine(lr: float, epochs: int):
    """The harness's ``adjust_learning_rate`` with ``--cos_lr`` as an ``epoch -> factor`` schedule
    (epoch counted from 0; the harness calls it with ``epoch + 1``): for e = epoch + 1 <= 10,
    ``0.5 lr (1 + cos(pi e / E)) (e - 1) / 10 + 0.01 (11 - e) / 10``, then ``0.5 lr (1 + cos(pi e / E))``."""
    import math  # noqa: PLC0415

    def factor(epoch: int) -> float:
        e = epoch + 1
        value = 0.5 * lr * (1 + math.cos(math.pi * e / epochs))
        if e <= 10:
            value = value * (e - 1) / 10 + 0.01 * (11 - e) / 10
        return value / lr

    return factor


def run_isolation_check(args, trainer, loader) -> None:
    """``--check-isolation``: :func:`dgl_fast.check_isolation` on ``loader``'s first batch, its
    table printed; a leak raises :class:`~dgl_fast.isolation.IsolationError` (a ValueError: exit 2)."""
    from .isolation import check_isolation  # noqa: PLC0415

    if args.distributed:
        raise ValueError("argument --check-isolation: checks the stage steps in one process; drop --distributed "
                         "(the check is the same for the stages a rank runs)")
    x, y = next(iter(loader))
    report = check_isolation(trainer, x, y, strict=False)
    print(f"isolation check on the first batch ({x.shape[0]} images):\n{report}")
    report.raise_if_leaks()
