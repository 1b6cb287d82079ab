"""The CIFAR ResNets of the local-learning harness and where it cuts them into local modules.

The harness is InfoPro's CIFAR code (Wang et al., ICLR 2021, ``blackfeather-wang/InfoPro-Pytorch``,
``Experiments on CIFAR-SVHN-STL10``) and its fork AugLocal (Ma et al., ICLR 2024,
``ChenxiangMA/AugLocal``, whose ``train.py --rule DGL|InfoPro|PredSim|AugLocal|BP`` runs every
rule). Both build the same network:

- a stem ``conv3x3(3, w0), BN, ReLU`` (layer ``(0, 0)``), then three groups of ``n`` BasicBlocks of
  widths ``w1, w2, w3`` (layers ``(g, i)``, g = 1..3, i = 0..n-1); the first block of groups 2 and 3
  has stride 2. ``widths=(16, 16, 32, 64)``; ResNet-32 has n = 5, ResNet-110 n = 18;
- **option-B shortcuts**: a block changing shape adds ``Conv1x1(stride) + BN`` (not the parameter-
  free option-A shortcut of :func:`dgl_fast.models.build`'s ``resnet32`` without a rule);
- each block ``conv3x3, BN, ReLU, Dropout(droprate), conv3x3, BN, + shortcut, ReLU``;
- the classifier of the last module: global average pool, Linear (PyTorch's default init);
- initialisation (:func:`harness_init`), applied by the harness to **every** ``Conv2d`` and
  ``BatchNorm2d`` of the model, its auxiliary networks and decoders included: conv weights
  ``N(0, sqrt(2 / (k*k*out_channels)))``, BatchNorm2d weight 1 and bias 0; Linear and BatchNorm1d
  layers keep PyTorch's defaults.

Split tables (:func:`cuts`): a local module ends after the layers its table lists; the last
module holds the remaining blocks and the classifier.

- ``"auglocal"`` (the default: AugLocal's ``networks/configs.py``, used by every rule of its
  ``train.py``): the first K-1 layers (the stem, then one block each) are modules 1..K-1, the rest
  is module K. AugLocal's table lists K = 2..13 and 16 for ResNet-32 and K = 47..55 for ResNet-110
  (other K raise a KeyError there except for rule AugLocal, which slices the full list); every
  listed K is this prefix, so dgl_fast takes any K from 2 to the number of layers (16 and 55).
- ``"infopro"``: InfoPro's own table (``InfoPro`` in its ``configs.py``), K in {2, 3, 4, 8, 16}.
- ``"infopro-balanced"``: InfoPro* (``InfoPro_balanced_memory``, CIFAR-10), ResNet-110, K in {2, 3, 4}.
"""

from __future__ import annotations

import math

import torch.nn as nn

__all__ = ["HARNESS_NETS", "SPLIT_TABLES", "BasicBlock", "harness_layers", "layer_ids", "net_dim", "cuts",
           "module_layers", "harness_init"]

#: blocks per group of the harness's networks
HARNESS_NETS = {"resnet32": 5, "resnet110": 18}
SPLIT_TABLES = ("auglocal", "infopro", "infopro-balanced")

# (group, block) after which InfoPro's modules 1..K-1 end
_INFOPRO = {
    "resnet32": {2: [(2, 1)], 3: [(1, 4), (2, 4)], 4: [(1, 2), (2, 1), (3, 0)],
                 8: [(1, 0), (1, 2), (1, 4), (2, 1), (2, 3), (3, 0), (3, 2)],
                 16: [(0, 0), (1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (2, 0), (2, 1), (2, 2), (2, 3), (2, 4),
                      (3, 0), (3, 1), (3, 2), (3, 3)]},
    "resnet110": {2: [(2, 8)], 3: [(1, 17), (2, 17)], 4: [(1, 11), (2, 7), (3, 3)],
                  8: [(1, 4), (1, 11), (2, 0), (2, 7), (2, 14), (3, 3), (3, 10)],
                  16: [(1, 1), (1, 4), (1, 7), (1, 10), (1, 13), (1, 16), (2, 1), (2, 4), (2, 7), (2, 11), (2, 15),
                       (3, 1), (3, 5), (3, 9), (3, 13)]},
}
_INFOPRO_BALANCED = {"resnet110": {2: [(1, 14)], 3: [(1, 9), (2, 2)], 4: [(1, 6), (1, 14), (2, 8)]}}


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """The harness's BasicBlock (option-B shortcut ``downsample`` when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dropout_rate: float = 0.0):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)
        self.dropout = nn.Dropout(p=dropout_rate)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(self.dropout(out)))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


def _check_name(name: str) -> int:
    if name not in HARNESS_NETS:
        raise ValueError(f"the local-learning harness builds {', '.join(HARNESS_NETS)}; got {name!r}")
    return HARNESS_NETS[name]


def layer_ids(name: str) -> list[tuple[int, int]]:
    """The harness's layers in order: ``(0, 0)`` the stem, ``(g, i)`` block i of group g."""
    n = _check_name(name)
    return [(0, 0)] + [(g, i) for g in (1, 2, 3) for i in range(n)]


def net_dim(name: str, widths=(16, 16, 32, 64)) -> list[int]:
    """Output channels of every layer (AugLocal's ``net_dim``: ``[16]*6 + [32]*5 + [64]*5`` for ResNet-32)."""
    n = _check_name(name)
    return [widths[0]] + [w for w in widths[1:] for _ in range(n)]


def harness_layers(name: str, in_channels: int = 3, widths=(16, 16, 32, 64), droprate: float = 0.0) -> list[nn.Module]:
    """The network's layers in :func:`layer_ids` order (the stem as one ``nn.Sequential``)."""
    n = _check_name(name)
    if len(widths) != 4 or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths):
        raise ValueError(f"widths must be 4 positive ints (stem, group 1, 2, 3), got {widths!r}")
    layers: list[nn.Module] = [nn.Sequential(_conv3x3(in_channels, widths[0]), nn.BatchNorm2d(widths[0]),
                                             nn.ReLU(inplace=True))]
    c = widths[0]
    for g, w in enumerate(widths[1:]):
        for i in range(n):
            layers.append(BasicBlock(c, w, 2 if (g > 0 and i == 0) else 1, droprate))
            c = w
    return layers


def cuts(name: str, K: int, table: str = "auglocal") -> list[tuple[int, int]]:
    """The layers after which local modules 1..K-1 end (K-1 ``(group, block)`` pairs, in order)."""
    ids = layer_ids(name)
    if table not in SPLIT_TABLES:
        raise ValueError(f"unknown split table {table!r}; expected one of {', '.join(SPLIT_TABLES)}")
    if not isinstance(K, int) or isinstance(K, bool) or K < 1:
        raise ValueError(f"local_modules must be a positive int, got {K!r}")
    if K == 1:
        return []
    if table == "auglocal":
        if K > len(ids):
            raise ValueError(f"{name} has {len(ids)} layers: local_modules must be in 1..{len(ids)}, got {K}")
        return ids[:K - 1]
    tables = (_INFOPRO if table == "infopro" else _INFOPRO_BALANCED).get(name, {})
    if K not in tables:
        raise ValueError(f"split table {table!r} has local_modules in {sorted([1, *tables])} for {name}, got {K}")
    return list(tables[K])


def module_layers(name: str, K: int, table: str = "auglocal") -> list[list[tuple[int, int]]]:
    """Each local module's layers (the last module's classifier not listed)."""
    ids, ends = layer_ids(name), cuts(name, K, table)
    out, start = [], 0
    for end in ends:
        stop = ids.index(end) + 1
        out.append(ids[start:stop])
        start = stop
    out.append(ids[start:])
    return out


def harness_init(model: nn.Module) -> None:
    """The harness's initialisation of every ``Conv2d`` and ``BatchNorm2d`` in ``model`` (in place)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2.0 / n))
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()
