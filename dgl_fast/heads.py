"""Auxiliary classifiers ("heads") of DGL stages, as in the authors' code (PAPER.md section 2)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops

__all__ = ["AuxHead", "LogitsHead", "HEAD_KINDS"]

#: Kinds computed by the fused ops (aux_pool, linear_bn_relu, bn_update_stats); the others run as
#: plain PyTorch modules.
FUSED_KINDS = ("mlp-sr", "mlp", "last")

#: Head kinds: ``mlp-sr``, ``mlp`` and ``cnn`` are the auxiliary heads of the paper's study, ``last``
#: is the classifier of the last stage, ``linear`` is a global-average-pool + linear head
#: (InfoPro's ``0c1f``, torchvision ResNet's own classifier).
HEAD_KINDS = ("mlp-sr", "mlp", "cnn", "last", "linear")


def _pair(size) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, (tuple, list, torch.Size)) else None
    if pair is None or len(pair) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in pair):
        raise ValueError(f"in_size must be an int or (height, width) of ints, got {size!r}")
    return pair


def _mlp(in_features: int, hidden: int, depth: int, num_classes: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return layers


class AuxHead(nn.Module):
    """The auxiliary classifier of one DGL stage.

    Args:
        in_channels: channels C of the stage output it reads ([B, C, H, W]).
        in_size: spatial size of that output, ``s`` or ``(H, W)``.
        num_classes: number of classes.
        kind: ``"mlp-sr"`` (pool to ceil(s/4), 3 x [1x1 conv, BN, ReLU], pool to 2x2, 3 x [Linear,
            BN1d, ReLU], Linear), ``"mlp"`` (pool to ceil(s/4), pool to 2x2, 3 x [Linear, BN1d,
            ReLU], Linear), ``"cnn"`` (2 x [3x3 conv, BN, ReLU], pool to 2x2, BN, Linear),
            ``"last"`` (pool to ceil(s/4), pool to 2x2, 2 x [Linear, BN1d, ReLU], Linear) or
            ``"linear"`` (global average pool, Linear). ``mlp`` and ``last`` pool twice as the
            authors' code does: the same as one 2x2 pool when s is a multiple of 8, not otherwise
            (MNIST's 28: 28 -> 7 -> 2x2 windows of 4 rows that overlap by one).
        hidden: width of the hidden linear layers (default 4C, as in the paper; the asynchronous
            experiments use 256). For ``cnn`` it is the width of the convolutions (default C).
        fused: ``"auto"`` (default): compute ``mlp-sr``, ``mlp`` and ``last`` heads with dgl_fast's
            fused ops on CUDA, and with the plain PyTorch modules elsewhere (on the CPU PyTorch's
            own vectorised kernels are faster than the fused ops' CPU kernels); ``True``: the fused
            ops on every device (their CPU kernels are the reference the CUDA kernels are tested
            against); ``False``: never. ``cnn`` and ``linear`` heads always run as plain PyTorch.

    ``forward(x)`` returns logits; :meth:`loss` returns the mean cross-entropy and the number of
    correct predictions (fused softmax + cross-entropy op). The fused path computes the same
    function as :meth:`to_reference`, a plain ``nn.Sequential`` sharing this head's parameters
    (the oracle of the fused ops): one pooling pass over the stage output, one Linear + BatchNorm
    + ReLU op per layer (1x1 convolutions are Linear layers on pixels), one launch for all running
    statistics. Under ``torch.autocast`` the matrix products run in the autocast dtype while
    BatchNorm statistics and parameters stay float32.
    """

    def __init__(self, in_channels: int, in_size, num_classes: int, kind: str = "mlp-sr", hidden: int | None = None,
                 fused: bool | str = "auto"):
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ValueError(f"unknown aux head kind {kind!r}; expected one of {', '.join(HEAD_KINDS)}")
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        h, w = _pair(in_size)
        if h < 1 or w < 1:
            raise ValueError(f"in_size must be positive, got {(h, w)}")
        if hidden is not None and (not isinstance(hidden, int) or hidden < 1):
            raise ValueError(f"hidden must be a positive int or None, got {hidden!r}")
        self.in_channels, self.in_size, self.num_classes, self.kind = in_channels, (h, w), num_classes, kind
        C = in_channels
        layers: list[nn.Module]
        if kind == "mlp-sr":
            hid = hidden or 4 * C
            layers = [nn.AdaptiveAvgPool2d((math.ceil(h / 4), math.ceil(w / 4)))]
            for _ in range(3):
                layers += [nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C), nn.ReLU()]
            layers += [nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten()] + _mlp(4 * C, hid, 3, num_classes)
        elif kind in ("mlp", "last"):
            hid = hidden or 4 * C
            layers = [nn.AdaptiveAvgPool2d((math.ceil(h / 4), math.ceil(w / 4))), nn.AdaptiveAvgPool2d((2, 2)),
                      nn.Flatten()] + _mlp(4 * C, hid, 3 if kind == "mlp" else 2, num_classes)
        elif kind == "cnn":
            hid = hidden or C
            layers = [nn.Conv2d(C, hid, 3, padding=1, bias=False), nn.BatchNorm2d(hid), nn.ReLU(),
                      nn.Conv2d(hid, hid, 3, padding=1, bias=False), nn.BatchNorm2d(hid), nn.ReLU(),
                      nn.AdaptiveAvgPool2d((2, 2)), nn.BatchNorm2d(hid), nn.Flatten(), nn.Linear(4 * hid, num_classes)]
        else:  # linear
            hid = C
            layers = [nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(C, num_classes)]
        if fused not in (True, False, "auto"):
            raise ValueError(f"fused must be True, False or 'auto', got {fused!r}")
        self.hidden = hid
        self.fused = fused
        self.layers = nn.Sequential(*layers)
        # the fused path's view of the layers, computed once (forward is on the hot path)
        self._linears = [m for m in layers if isinstance(m, nn.Linear | nn.Conv2d)]
        self._bns = [m for m in layers if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        # mlp / last: pooling to ceil(s/4) then to 2x2 is one 2x2 pool when both steps tile exactly
        # (s a multiple of 8); the fused path then skips the intermediate pass
        self._two_pools = kind in ("mlp", "last") and not (h % 8 == 0 and w % 8 == 0)

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, in_channels={self.in_channels}, in_size={self.in_size}, "
                f"num_classes={self.num_classes}, hidden={self.hidden}")

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError unless ``x`` has shape [B, in_channels, *in_size]."""
        expected = f"[B, {self.in_channels}, {self.in_size[0]}, {self.in_size[1]}]"
        if x.dim() != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != self.in_size:
            raise ValueError(f"AuxHead({self.kind}) expected features of shape {expected}, got {list(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if self.uses_fused_ops():
            return self._fused_forward(x)
        return self.layers(x)

    def uses_fused_ops(self) -> bool:
        """Whether :meth:`forward` runs dgl_fast's fused ops (kind, device, settings and BatchNorm
        options allow)."""
        if self.fused is False or self.kind not in FUSED_KINDS:
            return False
        if self.fused == "auto" and self._linears[0].weight.device.type != "cuda":
            return False
        return all(m.affine and m.track_running_stats and m.momentum is not None and m.running_mean is not None
                   for m in self._bns)

    def _check_params(self, x: torch.Tensor, weight: torch.Tensor, autocast: bool) -> None:
        if x.device != weight.device:
            raise ValueError(f"AuxHead({self.kind}) expected features on {weight.device} like its parameters, "
                             f"got {x.device}")
        if not autocast and x.dtype != weight.dtype:
            raise ValueError(f"AuxHead({self.kind}) expected features of dtype {weight.dtype} like its parameters, "
                             f"got {x.dtype}")

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        linears, bns = self._linears, self._bns
        dev = x.device.type
        autocast = torch.is_autocast_enabled(dev) if dev in ("cuda", "cpu") else False
        self._check_params(x, linears[0].weight, autocast)
        cdt = torch.get_autocast_dtype(dev) if autocast else x.dtype
        if autocast and x.dtype != cdt:
            x = x.to(cdt)

        def cast(t):
            return None if t is None else (t.to(cdt) if t.dtype != cdt else t)

        stats = []  # (bn, mean, var, rows) of the layers trained in this pass

        def block(h, lin, bn):
            w = lin.weight.view(lin.weight.shape[0], -1)
            out, mean, var = ops.linear_bn_relu(h, cast(w), cast(lin.bias), bn.weight, bn.bias, bn.running_mean,
                                                bn.running_var, bn.training, bn.eps)
            if bn.training:
                stats.append((bn, mean, var, h.shape[0]))
            return out

        B, C = x.shape[:2]
        k = 0
        if self.kind == "mlp-sr":
            ph, pw = self.layers[0].output_size
            h = ops.aux_pool(x, (ph, pw), channels_last_out=True)  # [B, C, ph, pw], pixels as rows
            rows = h.permute(0, 2, 3, 1).reshape(B * ph * pw, C)
            for _ in range(3):
                rows = block(rows, linears[k], bns[k])
                k += 1
            h = rows.view(B, ph, pw, C).permute(0, 3, 1, 2)
            h = ops.aux_pool(h, (2, 2)).reshape(B, 4 * C)
        else:
            h = ops.aux_pool(x, self.layers[0].output_size) if self._two_pools else x
            h = ops.aux_pool(h, (2, 2)).reshape(B, 4 * C)
        while k < len(bns):
            h = block(h, linears[k], bns[k])
            k += 1
        logits = F.linear(h, cast(linears[-1].weight), cast(linears[-1].bias))
        if stats:
            ops.bn_update_stats([bn.running_mean for bn, *_ in stats], [bn.running_var for bn, *_ in stats],
                                [bn.num_batches_tracked for bn, *_ in stats], [m for _, m, _, _ in stats],
                                [v for _, _, v, _ in stats], [n for *_, n in stats], [bn.momentum for bn, *_ in stats])
        return logits

    def loss(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy of this head on ``x`` and the number of correct predictions."""
        return ops.softmax_xent(self(x), labels)

    def to_reference(self) -> nn.Sequential:
        """A plain ``nn.Sequential`` computing the same function with the same (shared) modules."""
        return nn.Sequential(*self.layers)


class LogitsHead(nn.Module):
    """The last head of a stage that ends in the model's own classifier: the stage's output is
    already the logits ``[B, num_classes]``, so the head adds nothing (it returns its input, after
    checking its shape) and its loss is the fused cross-entropy on that output. It has no
    parameters: the classifier is trained as part of the last stage, by that stage's optimizer,
    under every engine, in end-to-end backprop and in evaluation alike."""

    def __init__(self, num_classes: int):
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        self.num_classes = num_classes

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.num_classes:
            raise ValueError(f"LogitsHead expected logits of shape [B, {self.num_classes}], got {list(x.shape)}")
        return x

    def loss(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy of the logits ``x`` and the number of correct predictions."""
        return ops.softmax_xent(self(x), labels)

    def to_reference(self) -> nn.Module:
        """The plain-PyTorch head computing the same function: ``nn.Identity()``."""
        return nn.Identity()
