"""UperNet decode head (Xiao et al. 2018, as mmsegmentation's ``UPerHead``) and an FCN auxiliary
head (docs/eval.md, "Segmentation")."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """Conv (no bias) -> BatchNorm -> ReLU, 'same' padding."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class PyramidPooling(nn.Module):
    """PPM: x (B, C, H, W) -> (B, C + len(scales) * channels, H, W), pooled branches upsampled back."""

    def __init__(self, *, in_channels: int, channels: int, scales: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.branches = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(in_channels, channels, 1))
                                      for s in scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x] + [_resize(branch(x), x.shape[-2:]) for branch in self.branches], dim=1)


class UperHead(nn.Module):
    """UperNet head over pyramid levels ordered finest first.

    forward(features: list of (B, C_i, H_i, W_i), H_0 the finest) -> logits (B, num_classes, H_0, W_0).
    """

    def __init__(self, *, in_channels: Sequence[int], channels: int = 512, num_classes: int = 150,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        *fine, coarsest = in_channels
        self.ppm = PyramidPooling(in_channels=coarsest, channels=channels, scales=pool_scales)
        self.ppm_out = conv_bn_relu(coarsest + len(pool_scales) * channels, channels, 3)
        self.laterals = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in fine)
        self.fpn_convs = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in fine)
        self.fuse = conv_bn_relu(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        laterals = [lateral(x) for lateral, x in zip(self.laterals, features[:-1])]
        laterals.append(self.ppm_out(self.ppm(features[-1])))
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([outs[0]] + [_resize(x, size) for x in outs[1:]], dim=1))
        return self.classifier(self.dropout(fused))


class FCNHead(nn.Module):
    """Auxiliary head: x (B, C, H, W) -> logits (B, num_classes, H, W) (one 3x3 conv, dropout, 1x1)."""

    def __init__(self, *, in_channels: int, channels: int = 256, num_classes: int = 150, dropout: float = 0.1):
        super().__init__()
        self.conv = conv_bn_relu(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.conv(x)))
