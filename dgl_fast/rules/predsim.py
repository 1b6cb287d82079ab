"""Rule ``predsim``: prediction + similarity matching (Nøkland & Eidnes, ICML 2019), as AugLocal's
harness builds it.

Loss of local module i: ``ixx_r * MSE(S(conv(h)), S(onehot(y))) + ixy_r * CE(classifier(h), y)``:

- similarity branch (``Decoder_PredSim``): one 3x3 conv (C -> C, no bias); ``S`` is the adjusted
  cosine-similarity matrix of the batch: a 4-d input with C > 3 and H > 1 is first reduced to the
  per-channel standard deviation over its pixels (unbiased), rows are centred, divided by
  ``1e-8 + their norm``, ``S = X X^T`` clamped to [-1, 1]; the one-hot labels go through the same;
- prediction branch (``AuxNetwork(net_config='PredSim')``): an average pool chosen so that the
  flattened size is at most ``hidden_dim`` (the harness's ``get_pool_layer``: kernels doubled in
  height then width, padded to ``ceil``), Flatten, Linear(., classes);
- the harness reads the side from the width (``image_size // (C // 16)``), which is the module
  output's side on its networks; dgl_fast reads the side itself.
- Defaults: ``hidden_dim=512`` (train.py's; its ``LocalResNet`` default 1024 is overridden) and
  run.sh's weights ``ixx_1=ixx_2=0.99``, ``ixy_1=ixy_2=0.01``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import LocalHead, ModuleInfo, Rule, positive_int

__all__ = ["PredSimRule", "similarity_matrix", "pool_for"]


def pool_for(channels: int, side: int, target_dim: int) -> tuple[nn.Module, int]:
    """The average pool that brings ``channels x side x side`` to at most ``target_dim`` features
    (kernels doubled alternately in height and width), and the flattened size it gives."""
    kh = kw = 1
    oh = ow = side
    dim = channels * oh * ow
    while dim > target_dim and kh < side:
        kh *= 2
        oh = math.ceil(side / kh)
        dim = channels * oh * ow
        if dim > target_dim:
            kw *= 2
            ow = math.ceil(side / kw)
            dim = channels * oh * ow
    if kh == 1 and kw == 1:
        return nn.Identity(), dim
    pad = ((kh * (oh - side // kh)) // 2, (kw * (ow - side // kw)) // 2)
    return nn.AvgPool2d((kh, kw), padding=pad), dim


def similarity_matrix(x: torch.Tensor) -> torch.Tensor:
    """PredSim's adjusted cosine-similarity matrix of a batch ([B, B])."""
    if x.dim() == 4 and x.size(1) > 3 and x.size(2) > 1:
        x = x.reshape(x.size(0), x.size(1), -1).std(dim=2)
    else:
        x = x.reshape(x.size(0), -1)
    xc = x - x.mean(dim=1, keepdim=True)
    xn = xc / (1e-8 + xc.pow(2).sum(dim=1).sqrt()).unsqueeze(1)
    return (xn @ xn.t()).clamp(-1, 1)


class PredSimHead(LocalHead):
    """PredSim's local head: ``decoder`` (similarity branch) and ``classifier``."""

    def __init__(self, decoder: nn.Module, classifier: nn.Module, num_classes: int, ixx: float, ixy: float):
        super().__init__(ixx, ixy)
        self.decoder, self.classifier, self.num_classes = decoder, classifier, num_classes

    def local_terms(self, h, y, image):
        onehot = F.one_hot(y, self.num_classes).to(h.dtype)
        return F.mse_loss(similarity_matrix(self.decoder(h)), similarity_matrix(onehot))


class PredSimRule(Rule):
    name = "predsim"
    options = {"hidden_dim": 512, "ixx_1": 0.99, "ixy_1": 0.01, "ixx_2": 0.99, "ixy_2": 0.01}

    def check(self, opts: dict) -> None:
        super().check(opts)
        positive_int(opts["hidden_dim"], "hidden_dim")

    def make_head(self, info: ModuleInfo, opts: dict) -> nn.Module:
        c = info.channels
        pool, dim = pool_for(c, info.size[0], opts["hidden_dim"])
        clf = nn.Sequential(pool, nn.Flatten(), nn.Linear(dim, info.num_classes))
        return PredSimHead(nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False)), clf, info.num_classes,
                           *self.weights(info, opts))
