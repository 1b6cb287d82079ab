"""Rule ``infopro``: InfoPro (Wang et al., ICLR 2021), as its CIFAR harness and AugLocal's build it.

Local module i has an auxiliary classifier and a decoder; its loss is
``ixx_r * BCE(decoder(up(h)), restore(x)) + ixy_r * CE(classifier(h), y)`` (weights interpolated
from module 1 to K-1, :func:`~dgl_fast.rules.base.interpolate`).

- Classifier ``aux_net_config`` (InfoPro's ``AuxClassifier``, its cross-entropy mode): ``0c1f``,
  ``0c2f``, ``1c1f``, ``1c2f`` (default), ``1c3f``, ``2c2f``: X convolutions (the first 3x3 stride
  2 to twice the width, except in the last group: stride 1, same width; times ``aux_net_widen``),
  BN, ReLU, global average pool, then Y Linear layers of ``aux_net_feature_dim * aux_net_widen``
  hidden units with ReLU between. AugLocal's rule InfoPro uses its ``'InfoPro'`` config, which is
  ``1c2f`` with the feature dim fixed at 128 (its ``--aux_net_feature_dim`` is ignored there): the
  default here (feature dim 128). InfoPro's own default loss mode ``contrast`` (SupCon) is not
  built yet: ``local_loss_mode`` takes ``cross_entropy`` only.
- Decoder ``aux_net_config_aux_loss`` ``2c`` (default; InfoPro's ``Decoder``) or ``4c``: the module
  output is interpolated to the image size (``interpolate_mode`` ``bilinear`` with
  ``align_corners=True``, or ``nearest``), then [3x3 conv (bias) to ``12 * aux_net_widen_aux_loss``,
  BN, ReLU] x 1 or 3, a 3x3 conv (bias) to the image channels and a sigmoid.
- **The reconstruction target is the un-normalised image**: the harness restores
  ``x * std + mean`` with CIFAR's constants ``(125.3, 123.0, 113.9) / 255`` and ``(63.0, 62.1,
  66.7) / 255`` whatever the data was normalised with (``image_mean``, ``image_std`` change them;
  dgl_fast's loaders normalise with other CIFAR constants, so pass those to reconstruct [0, 1]).
- Default weights: AugLocal's ``run.sh`` (train.py's own defaults ``0, 1, 0, 1`` would switch the
  decoder off): ResNet-32 ``ixx_1=5, ixy_1=0.05, ixx_2=0.2, ixy_2=0.5``; ResNet-110 ``5, 0, 0.5, 1``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import LocalHead, ModuleInfo, Rule, number, positive_int, widen

__all__ = ["InfoProRule", "infopro_classifier", "infopro_decoder", "CLASSIFIER_CONFIGS", "HARNESS_CIFAR_MEAN",
           "HARNESS_CIFAR_STD"]

CLASSIFIER_CONFIGS = ("0c1f", "0c2f", "1c1f", "1c2f", "1c3f", "2c2f")
DECODER_CONFIGS = ("2c", "4c")
HARNESS_CIFAR_MEAN = tuple(v / 255.0 for v in (125.3, 123.0, 113.9))
HARNESS_CIFAR_STD = tuple(v / 255.0 for v in (63.0, 62.1, 66.7))
_RUN_SH = {"resnet32": (5.0, 0.05, 0.2, 0.5), "resnet110": (5.0, 0.0, 0.5, 1.0)}


def infopro_classifier(info: ModuleInfo, config: str, w: float, feature_dim: int) -> nn.Sequential:
    """InfoPro's ``AuxClassifier`` head ``config`` for module ``info`` (cross-entropy mode)."""
    c, k = info.channels, info.num_classes
    convs, fcs = int(config[0]), int(config[2])
    layers: list[nn.Module] = []
    width = c
    if convs:
        cc, stride = (widen(c, w), 1) if info.last_group else (widen(2 * c, w), 2)
        layers += [nn.Conv2d(c, cc, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cc), nn.ReLU()]
        for _ in range(convs - 1):
            layers += [nn.Conv2d(cc, cc, 3, padding=1, bias=False), nn.BatchNorm2d(cc), nn.ReLU()]
        width = cc
    layers += [nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten()]
    fd = widen(feature_dim, w)
    for _ in range(fcs - 1):
        layers += [nn.Linear(width, fd), nn.ReLU(inplace=True)]
        width = fd
    layers.append(nn.Linear(width, k))
    return nn.Sequential(*layers)


def infopro_decoder(c: int, out_channels: int, config: str, w: float) -> nn.Sequential:
    """InfoPro's decoder convolutions (``2c`` or ``4c``), ending in a sigmoid."""
    hid = widen(12, w)
    layers: list[nn.Module] = []
    cin = c
    for _ in range(1 if config == "2c" else 3):
        layers += [nn.Conv2d(cin, hid, 3, padding=1), nn.BatchNorm2d(hid), nn.ReLU()]
        cin = hid
    layers += [nn.Conv2d(cin, out_channels, 3, padding=1), nn.Sigmoid()]
    return nn.Sequential(*layers)


class InfoProHead(LocalHead):
    """InfoPro's local head: ``decoder`` (reconstruction, BCE) and ``classifier`` (CE)."""

    needs_image = True

    def __init__(self, decoder: nn.Module, classifier: nn.Module, image_size: tuple[int, int], mode: str,
                 mean, std, ixx: float, ixy: float):
        super().__init__(ixx, ixy)
        self.decoder, self.classifier = decoder, classifier
        self.image_size, self.mode = tuple(image_size), mode
        C = len(mean)
        self.register_buffer("mean", torch.tensor(mean).view(1, C, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, C, 1, 1), persistent=False)

    def reconstruction(self, h: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """BCE of the decoded ``h`` against the un-normalised ``image``."""
        if self.mode == "bilinear":
            up = F.interpolate(h, size=list(self.image_size), mode="bilinear", align_corners=True)
        else:
            up = F.interpolate(h, size=list(self.image_size), mode="nearest")
        target = image.mul(self.std.to(image.dtype)) + self.mean.to(image.dtype)
        return F.binary_cross_entropy(self.decoder(up), target)

    def local_terms(self, h, y, image):
        return self.reconstruction(h, image)


class InfoProRule(Rule):
    name = "infopro"
    needs_image = True
    options = {"aux_net_config": "1c2f", "aux_net_widen": 1.0, "aux_net_feature_dim": 128,
               "aux_net_config_aux_loss": "2c", "aux_net_widen_aux_loss": 1.0, "interpolate_mode": "bilinear",
               "local_loss_mode": "cross_entropy", "image_mean": HARNESS_CIFAR_MEAN, "image_std": HARNESS_CIFAR_STD,
               "ixx_1": lambda net: _RUN_SH[net][0], "ixy_1": lambda net: _RUN_SH[net][1],
               "ixx_2": lambda net: _RUN_SH[net][2], "ixy_2": lambda net: _RUN_SH[net][3]}

    def check(self, opts: dict) -> None:
        super().check(opts)
        for key, allowed in (("aux_net_config", CLASSIFIER_CONFIGS), ("aux_net_config_aux_loss", DECODER_CONFIGS),
                             ("interpolate_mode", ("bilinear", "nearest")), ("local_loss_mode", ("cross_entropy",))):
            if opts[key] not in allowed:
                extra = " (InfoPro's 'contrast' mode is not built yet)" if key == "local_loss_mode" else ""
                raise ValueError(f"rule 'infopro': {key} must be one of {', '.join(allowed)}{extra}, got {opts[key]!r}")
        for key in ("aux_net_widen", "aux_net_widen_aux_loss"):
            if number(opts[key], key) <= 0:
                raise ValueError(f"{key} must be > 0, got {opts[key]!r}")
        positive_int(opts["aux_net_feature_dim"], "aux_net_feature_dim")
        for key in ("image_mean", "image_std"):
            v = opts[key]
            if not isinstance(v, (tuple, list)) or not v or not all(isinstance(t, (int, float)) for t in v):
                raise ValueError(f"{key} must be a tuple of per-channel numbers, got {v!r}")
        if len(opts["image_mean"]) != len(opts["image_std"]):
            raise ValueError(f"image_mean and image_std must have one value per channel, got {len(opts['image_mean'])} "
                             f"and {len(opts['image_std'])}")

    def make_head(self, info: ModuleInfo, opts: dict) -> nn.Module:
        C, H, W = info.image_shape
        if len(opts["image_mean"]) != C:
            raise ValueError(f"image_mean has {len(opts['image_mean'])} values, the image has {C} channels")
        decoder = infopro_decoder(info.channels, C, opts["aux_net_config_aux_loss"], opts["aux_net_widen_aux_loss"])
        clf = infopro_classifier(info, opts["aux_net_config"], opts["aux_net_widen"], opts["aux_net_feature_dim"])
        return InfoProHead(decoder, clf, (H, W), opts["interpolate_mode"], opts["image_mean"], opts["image_std"],
                           *self.weights(info, opts))
