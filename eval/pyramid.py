"""ViTDet simple feature pyramid over a plain timm ViT (Li et al. 2022): strides 4 to 32 (and
``pool``, stride 64) from the last block's tokens after the final norm, as the ``OrderedDict``
torchvision's ``MaskRCNN`` takes (docs/eval.md, "Detection")."""
from collections import OrderedDict

import torch
from torch import nn
from timm.layers import LayerNorm2d

STRIDES = (4, 8, 16, 32)


def _scale_stage(*, stride: int, dim: int) -> tuple[nn.Module, int]:
    """The resampling part of one level: from stride 16 to ``stride``; returns (module, channels)."""
    if stride == 4:
        return nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2),
            LayerNorm2d(dim // 2),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 2, dim // 4, kernel_size=2, stride=2),
        ), dim // 4
    if stride == 8:
        return nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2), dim // 2
    if stride == 16:
        return nn.Identity(), dim
    if stride == 32:
        return nn.MaxPool2d(kernel_size=2, stride=2), dim
    raise ValueError(f"simple feature pyramid: unsupported stride {stride}; use a subset of {STRIDES}")


class SimpleFeaturePyramid(nn.Module):
    """A timm ViT (built with ``dynamic_img_size=True``) plus the ViTDet simple pyramid.

    Args:
        vit: a timm ``VisionTransformer`` with patch size 16 and ``dynamic_img_size=True``
            (position embeddings are interpolated to the input's grid).
        out_channels: channels of every pyramid level (256 in ViTDet).
        strides: the levels to build, a subset of (4, 8, 16, 32), ascending.
        pool_level: also return ``"pool"``, a stride-2 max-pool of the coarsest level (RPN only).
        final_norm: apply the ViT's final LayerNorm to the tokens first.
    """

    def __init__(self, *, vit: nn.Module, out_channels: int = 256, strides=STRIDES,
                 pool_level: bool = True, final_norm: bool = True):
        super().__init__()
        patch = vit.patch_embed.patch_size
        patch = patch[0] if isinstance(patch, (tuple, list)) else patch
        if patch != 16:
            raise ValueError(f"simple feature pyramid needs a patch-16 ViT, got patch size {patch}")
        if not getattr(vit, "dynamic_img_size", False):
            raise ValueError("simple feature pyramid needs a timm ViT created with dynamic_img_size=True "
                             "(position embeddings interpolated to the input size)")
        if list(strides) != sorted(set(strides)):
            raise ValueError(f"strides must be ascending and distinct, got {strides}")
        self.vit = vit
        self.strides = tuple(strides)
        self.pool_level = pool_level
        self.final_norm = final_norm
        self.out_channels = out_channels
        dim = vit.embed_dim
        self.scales = nn.ModuleList()
        self.outputs = nn.ModuleList()
        for stride in self.strides:
            scale, channels = _scale_stage(stride=stride, dim=dim)
            self.scales.append(scale)
            self.outputs.append(nn.Sequential(
                nn.Conv2d(channels, out_channels, kernel_size=1, bias=False),
                LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
                LayerNorm2d(out_channels),
            ))

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) float, H and W multiples of 16 -> (B, C, H/16, W/16), C = embed_dim."""
        height, width = images.shape[-2:]
        if height % 16 or width % 16:
            raise ValueError(f"simple feature pyramid: input size {height}x{width} is not a multiple of 16")
        return self.vit.forward_intermediates(images, indices=1, norm=self.final_norm, output_fmt="NCHW",
                                              intermediates_only=True)[-1]

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """images: (B, 3, H, W) float32/bf16, H, W multiples of 16.

        Returns an OrderedDict: ``str(i)`` -> (B, out_channels, H/s_i, W/s_i) for each stride
        s_i (floor division), and ``"pool"`` -> (B, out_channels, H/(2 s_max), W/(2 s_max)).
        """
        x = self.tokens(images)
        levels = OrderedDict()
        for i, (scale, output) in enumerate(zip(self.scales, self.outputs)):
            levels[str(i)] = output(scale(x))
        if self.pool_level:
            levels["pool"] = nn.functional.max_pool2d(levels[str(len(self.strides) - 1)], kernel_size=1,
                                                      stride=2)
        return levels

