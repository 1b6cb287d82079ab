"""The networks of the DGL paper (PAPER.md section 3), built as :class:`DecoupledModel`.

``build(name, ...)`` knows:

- ``"aux-study"``: the paper's CIFAR net of the auxiliary-head study (``depth`` layers, first
  ``width`` channels; layers 2 and 4 start with a 2x2 max-pool and double the width);
- ``"vgg11"``, ``"vgg13"``, ``"vgg16"``, ``"vgg19"`` with BatchNorm, for CIFAR (``in_size=32``) or
  ImageNet (``in_size=224``) inputs; a max-pool goes with the conv that follows it;
- ``"resnet20"``, ``"resnet32"``, ``"resnet56"``, ``"resnet110"``: CIFAR ResNets (He et al., option
  A shortcuts); the stem goes with stage 1 and the block list is cut in K equal parts (K=2 puts
  the boundary at 32 channels, 16x16, as in the paper);
- ``"resnet18"`` .. ``"resnet152"``: torchvision's ImageNet ResNets, stem with stage 1, blocks cut
  in K equal parts (ResNet-152, K=2: 25 bottlenecks in stage 1, output 1024 x 14 x 14).

Layer-based nets are grouped ``block_size`` layers a stage (VGG-13 b=3 gives K=4) or cut into
``stages`` parts; ResNets take ``stages`` (default 2). When ``block_size`` does not divide the
number of layers, the last stage holds the remaining layers (the authors' code drops them).

The ``aux-study`` convolutions carry a bias, as in the authors' code (PyTorch's default there);
the VGG and ResNet convolutions, followed by BatchNorm as well, have none.

With ``rule=`` or ``local_modules=`` (``resnet32``, ``resnet110`` only), ``build`` makes the network
of the local-learning harness instead (:mod:`dgl_fast.local_nets`: option-B shortcuts, the
harness's initialisation, its split tables) with each local module's auxiliary network(s) built
by the rule (:mod:`dgl_fast.rules`); the last module ends in global average pool + Linear.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from . import local_nets, rules
from .heads import HEAD_KINDS, AuxHead
from .model import DecoupledModel

__all__ = ["build", "available"]

#: the VGG layer plans: channel counts, "M" for a 2x2 max-pool
VGG_CONFIGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}
_CIFAR_RESNET = {"resnet20": 20, "resnet32": 32, "resnet56": 56, "resnet110": 110}
_TV_RESNET = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def available() -> list[str]:
    """Names accepted by :func:`build`."""
    return ["aux-study", *VGG_CONFIGS, *_CIFAR_RESNET, *_TV_RESNET]


def _conv_bn_relu(cin: int, cout: int, bias: bool = False) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=bias), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _aux_study_layers(depth: int, width: int, in_channels: int) -> list[nn.Module]:
    # The authors' block_conv keeps PyTorch's default conv bias (trained and weight-decayed with the
    # rest); it changes BatchNorm's running means, hence every eval-mode output.
    if depth < 1:
        raise ValueError(f"aux-study depth must be >= 1, got {depth}")
    layers = [nn.Sequential(*_conv_bn_relu(in_channels, width, bias=True))]
    c = width
    for i in range(2, depth + 1):
        mods: list[nn.Module] = []
        cout = c
        if i in (2, 4):
            mods.append(nn.MaxPool2d(2))
            cout = 2 * c
        layers.append(nn.Sequential(*mods, *_conv_bn_relu(c, cout, bias=True)))
        c = cout
    return layers


def _vgg_layers(cfg: list, in_channels: int, width_mult: float) -> list[nn.Module]:
    layers, pending, c = [], [], in_channels
    for v in cfg:
        if v == "M":
            pending.append(nn.MaxPool2d(2))
            continue
        cout = max(1, int(round(v * width_mult)))
        layers.append(nn.Sequential(*pending, *_conv_bn_relu(c, cout)))
        pending, c = [], cout
    return layers


class _ShortcutA(nn.Module):
    """Option-A ResNet shortcut: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = _ShortcutA((cout - cin) // 2) if (stride != 1 or cin != cout) else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _cifar_resnet(depth: int, in_channels: int, width: int):
    if (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    stem = [nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    blocks, c = [], width
    for g, cout in enumerate((width, 2 * width, 4 * width)):
        for i in range(n):
            stride = 2 if (g > 0 and i == 0) else 1
            blocks.append(_BasicBlock(c, cout, stride))
            c = cout
    return stem, blocks


def _tv_resnet(name: str, num_classes: int, in_channels: int):
    import torchvision  # noqa: PLC0415  (heavy import, only for these models)

    net = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    stem = [net.conv1, net.bn1, net.relu, net.maxpool]
    blocks = [b for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer]
    return stem, blocks


def _chunks(n: int, k: int, what: str) -> list[tuple[int, int]]:
    if not 1 <= k <= n:
        raise ValueError(f"cannot cut {n} {what} into {k} stages; expected 1 <= stages <= {n}")
    bounds = [round(i * n / k) for i in range(k + 1)]
    return list(zip(bounds, bounds[1:]))


def build(name: str, num_classes: int = 10, *, block_size: int | None = None, stages: int | None = None,
          aux: str | None = None, in_size: int = 32, in_channels: int = 3, width: int | None = None,
          depth: int | None = None, hidden: int | None = None, last_head: str | None = None,
          local_modules: int | None = None, rule: str | None = None, split_table: str = "auglocal",
          widths: tuple | None = None, droprate: float = 0.0, **rule_options) -> DecoupledModel:
    """Build a paper network split into DGL stages, each with an :class:`AuxHead`.

    Args:
        name: one of :func:`available`.
        num_classes: classes of every head.
        block_size: layers per stage for ``aux-study`` and VGG (default 1); exclusive with ``stages``.
        stages: number of stages K (ResNets default to 2).
        aux: head kind of stages 1..K-1 (``mlp-sr``, ``mlp``, ``cnn``, ``last``, ``linear``).
        in_size: input height and width (32 for CIFAR, 224 for ImageNet).
        in_channels: input channels (3 for colour, 1 for MNIST).
        width: first-layer channels (aux-study default 128, CIFAR ResNets 16); VGG reads it as the
            width of its first conv (64) and scales every layer alike.
        depth: number of layers of ``aux-study`` (default 6).
        hidden: hidden width of the heads (default 4C as in the paper).
        last_head: head kind of the last stage (default ``last``; ``linear`` for ResNets).
        local_modules: K of the harness network (``resnet32``/``resnet110``; default 16 / 55 as in
            AugLocal's run.sh, 1 for ``backprop``); ``auglocal`` subtracts ``aux_net_depth``.
        rule: ``dgl``, ``infopro``, ``predsim``, ``auglocal`` or ``backprop`` (default ``dgl``
            when ``local_modules`` is given): builds the harness network.
        split_table: ``auglocal`` (default), ``infopro`` or ``infopro-balanced``
            (:func:`dgl_fast.local_nets.cuts`).
        widths: the harness network's (stem, group 1, 2, 3) widths (default (16, 16, 32, 64);
            ``width=w`` gives (w, w, 2w, 4w)).
        droprate: dropout inside the harness's blocks (default 0).
        rule_options: the rule's options, named as the harness names them (``ixx_1``,
            ``aux_net_config``, ``aux_net_depth``, ...; see each rule's module).
    """
    if rule is not None or local_modules is not None or rule_options:
        given = [k for k, v in (("block_size", block_size), ("stages", stages), ("aux", aux), ("depth", depth),
                                ("last_head", last_head)) if v is not None]
        if given:
            raise ValueError(f"the harness network (rule=, local_modules=) is cut by local_modules and its heads are "
                             f"the rule's; drop {', '.join(given)} (rule 'dgl' takes aux_net_config=)")
        if hidden is not None:  # rule 'dgl' with a dgl_fast head kind
            rule_options = {**rule_options, "hidden": hidden}
        if widths is None:
            widths = (width, width, 2 * width, 4 * width) if width is not None else (16, 16, 32, 64)
        elif width is not None:
            raise ValueError("give either width or widths, not both")
        return _build_local(name, num_classes, local_modules, rule or "dgl", split_table, in_size, in_channels,
                            tuple(widths), droprate, rule_options)
    aux = aux or "mlp-sr"
    if name not in available():
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(available())}")
    if aux not in HEAD_KINDS:
        raise ValueError(f"unknown aux head kind {aux!r}; expected one of {', '.join(HEAD_KINDS)}")
    if block_size is not None and stages is not None:
        raise ValueError("give either block_size or stages, not both")
    for arg, val in (("block_size", block_size), ("stages", stages), ("in_size", in_size),
                     ("in_channels", in_channels), ("width", width), ("depth", depth)):
        if val is not None and (not isinstance(val, int) or val < 1):
            raise ValueError(f"{arg} must be a positive int, got {val!r}")

    if name == "aux-study" or name in VGG_CONFIGS:
        if name == "aux-study":
            layers = _aux_study_layers(depth or 6, width or 128, in_channels)
        else:
            if depth is not None:
                raise ValueError(f"{name} has a fixed depth; drop depth={depth}")
            layers = _vgg_layers(VGG_CONFIGS[name], in_channels, (width or 64) / 64)
        if stages is not None:
            groups = _chunks(len(layers), stages, "layers")
        else:
            b = block_size or 1
            groups = [(i, min(i + b, len(layers))) for i in range(0, len(layers), b)]
        stage_mods = [nn.Sequential(*layers[a:b]) for a, b in groups]
        default_last = "last"
    else:
        if block_size is not None:
            raise ValueError(f"{name} is cut by stages=K, not block_size")
        if name in _CIFAR_RESNET:
            stem, blocks = _cifar_resnet(_CIFAR_RESNET[name], in_channels, width or 16)
        else:
            stem, blocks = _tv_resnet(name, num_classes, in_channels)
        groups = _chunks(len(blocks), stages or 2, "residual blocks")
        stage_mods = [nn.Sequential(*(stem if j == 0 else []), *blocks[a:b]) for j, (a, b) in enumerate(groups)]
        default_last = "linear"

    seq = nn.Sequential(*stage_mods)
    split = list(range(1, len(stage_mods)))
    model = DecoupledModel.from_sequential(seq, split, aux=aux, num_classes=num_classes,
                                           input_shape=(in_channels, in_size, in_size),
                                           last_head=last_head or default_last, hidden=hidden)
    # from_sequential wrapped each stage in one more Sequential; unwrap for clean state_dict keys.
    model.stages = nn.ModuleList([s[0] for s in model.stages])
    return model



def _side(in_size: int, group: int) -> int:
    for _ in range(max(0, group - 1)):  # groups 2 and 3 start with a stride-2 conv: ceil(s / 2)
        in_size = (in_size + 1) // 2
    return in_size


def _build_local(name, num_classes, local_modules, rule_name, split_table, in_size, in_channels, widths, droprate,
                 rule_options) -> DecoupledModel:
    if name not in local_nets.HARNESS_NETS:
        raise ValueError(f"rule=/local_modules= build the harness's {', '.join(local_nets.HARNESS_NETS)}; got {name!r}")
    rule = rules.get_rule(rule_name)
    opts = rule.resolve(dict(rule_options), name)
    if rule_name == "auglocal" and split_table != "auglocal":
        raise ValueError(f"rule 'auglocal' samples its layers along the 'auglocal' split table, got {split_table!r}")
    if local_modules is None:
        local_modules = 1 if rule_name == "backprop" else {"resnet32": 16, "resnet110": 55}[name]
    if not isinstance(local_modules, int) or isinstance(local_modules, bool) or local_modules < 1:
        raise ValueError(f"local_modules must be a positive int, got {local_modules!r}")
    if not isinstance(droprate, (int, float)) or not 0 <= droprate < 1:
        raise ValueError(f"droprate must be in [0, 1), got {droprate!r}")
    K = rule.local_modules(local_modules, opts)
    layers = local_nets.harness_layers(name, in_channels, widths, float(droprate))
    ids = local_nets.layer_ids(name)
    groups = local_nets.module_layers(name, K, split_table)
    dims = tuple(local_nets.net_dim(name, widths))
    stages = [nn.Sequential(*[layers[ids.index(layer)] for layer in grp]) for grp in groups]
    heads = []
    for j, grp in enumerate(groups):
        last = ids.index(grp[-1])
        g = grp[-1][0]
        side = _side(in_size, g)
        if j == K - 1:
            heads.append(AuxHead(dims[last], (side, side), num_classes, kind="linear"))
            continue
        info = rules.ModuleInfo(j, K - 1, dims[last], (side, side), last, g, dims, widths,
                                (in_channels, in_size, in_size), num_classes)
        heads.append(rule.make_head(info, opts))
    local_nets.harness_init(nn.ModuleList([*stages, *heads]))
    model = DecoupledModel(stages, heads, input_shape=(in_channels, in_size, in_size))
    #: the rule, its resolved options, each module's harness layers
    model.rule, model.rule_options, model.module_layers = rule_name, opts, groups
    return model
