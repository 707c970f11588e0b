"""The pixel rules of a view, shared by every decoder: conversion to 8-bit RGB, crop, resize, flip,
normalisation, layout, and the tolerance between decoders (docs/CONTRACTS.md, "The pixels of a
view"; measured differences in docs/performance.md, "Decoding")."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from teachers.descriptors import IMAGENET_MEAN, IMAGENET_STD

# ImageNet statistics of RGB in [0, 1] (written in teachers/descriptors.py): every decoder gives
# views normalised with them, the student's input; a teacher whose weights expect other
# statistics renormalises (teachers/vit.py).
MEAN, STD = IMAGENET_MEAN, IMAGENET_STD

SIZE = 224  # output side of a view in pixels (the teachers' and the student's resolution)

# The axes of a crop box's anchor (x, y) and shape (w, h), as DALI's slice names them.
CROP_AXES = "WH"

# Tolerance between decoders (0..255 scale, before normalisation, DALI CPU vs PIL on the
# same bytes and boxes): per view, mean absolute difference <= VIEW_BOUND; over all views
# of a check, <= MEAN_BOUND. JPEG decoders and resampling rounding differ by a level or two on
# a few pixels (docs/performance.md, "Agreement"), while shifting a box by one source pixel
# changes a view by 3-8 and nearest-neighbour instead of bilinear by 2-4, so the bounds catch
# geometry mistakes. nvJPEG's IDCT (and the A100/H100 hardware decoder) is not
# libjpeg-turbo's: DALI on CUDA is allowed CUDA_BOUND_SCALE times these.
VIEW_BOUND = 0.6
MEAN_BOUND = 0.3
CUDA_BOUND_SCALE = 2.0

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: Image.Image) -> np.ndarray:
    """Convert a PIL image of any mode to 8-bit RGB by rule 1 (docs/CONTRACTS.md, "The pixels of a view").

    Returns np.uint8 (H, W, 3), H and W as ``image.size`` reports them (no EXIF rotation).
    """
    if image.mode in SIXTEEN_BIT_MODES:
        wide = np.asarray(image).astype(np.float64)
        grey = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"))


def check_box(box: Sequence[int], *, width: int, height: int, what: str = "box") -> tuple[int, int, int, int]:
    """Validate a crop box ``(x, y, w, h)`` against an image of ``width x height``.

    Returns the box as four Python ints; raises ValueError naming ``what`` if the box is
    empty or leaves the image.
    """
    if len(box) != 4:
        raise ValueError(f"{what}: expected (x, y, w, h), got {list(box)}")
    x, y, w, h = (int(v) for v in box)
    if w < 1 or h < 1 or x < 0 or y < 0 or x + w > width or y + h > height:
        raise ValueError(
            f"{what}: crop box (x={x}, y={y}, w={w}, h={h}) is not inside the "
            f"{width}x{height} image"
        )
    return x, y, w, h


def crop_corners(box: Sequence[int]) -> tuple[int, int, int, int]:
    """A crop box ``(x, y, w, h)`` as ``(left, top, right, bottom)``, right and bottom
    exclusive (PIL's ``Image.crop``)."""
    x, y, w, h = (int(v) for v in box)
    return x, y, x + w, y + h


def crop_anchor_shape(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop boxes (B, 4) ``(x, y, w, h)`` -> anchors (B, 2) ``(x, y)`` and shapes (B, 2)
    ``(w, h)``, int32, on the axes ``CROP_AXES`` (DALI's ``image_slice``)."""
    boxes = np.asarray(boxes)
    return (np.ascontiguousarray(boxes[:, :2], dtype=np.int32),
            np.ascontiguousarray(boxes[:, 2:], dtype=np.int32))


def scaled_mean_std(normalize: bool) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on the 0..255 scale: ``(p - mean) / std`` of 0..255 pixels
    is rule 5 (``normalize``), or the identity (mean 0, std 1) without normalising."""
    if not normalize:
        return [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    return [m * 255.0 for m in MEAN], [s * 255.0 for s in STD]


def normalize_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalise 8-bit RGB images.

    pixels: uint8 (B, H, W, 3) on any device. Returns float32 (B, 3, H, W) = (pixels / 255 - MEAN) / STD
    on that device.
    """
    mean = torch.tensor(MEAN, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    chw = pixels.permute(0, 3, 1, 2).to(torch.float32)
    return (chw / 255.0 - mean) / std


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Undo ``normalize_uint8``: float32 (B, 3, H, W) normalised -> float32 (B, 3, H, W)
    pixel values on the 0..255 scale (not rounded)."""
    mean = torch.tensor(MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * std + mean) * 255.0
