"""The pixels of a view: the PIL reference decoder and the normalisation constants.

A view of an image is a crop box ``(x, y, w, h)`` in the original image's integer
pixels plus a horizontal flip (``store/views.py`` draws them). Its pixels are, in this
order (one definition, shared by every decoder of the project):

1. decode the stored bytes and convert to 8-bit RGB with these rules
   - any alpha channel is dropped, never composited (L/LA/P/PA/RGBA -> RGB; a
     palette's transparency is ignored), which is what DALI does when it decodes to RGB;
   - grey images are replicated into three channels;
   - CMYK JPEGs (Adobe/Photoshop convention) go through PIL's CMYK -> RGB conversion;
   - 16-bit samples are scaled to 8 bits as ``round(v / 257)`` (DALI's rule; PIL's own
     ``convert`` would clip them);
   - EXIF orientation is ignored: boxes are in the pixel order of the stored bytes,
     the order in which ``PIL.Image.size`` (and so the manifest) reports width and height;
2. crop the box ``[x, x + w) x [y, y + h)``;
3. resize to ``size x size``, bilinear, antialiased when shrinking (PIL's ``BILINEAR``
   widens its triangle filter by the scale factor; DALI's ``resize(antialias=True)``);
4. flip left-right if the view says so;
5. for the model: ``(pixels / 255 - MEAN) / STD`` per channel, layout CHW, float32.

``pil_view`` / ``pil_views`` here are the reference; ``store.dali_decode.DaliViewDecoder``
is the fast path and agrees with them within the tolerance stated in
``tests/store/test_decode.py`` (measured numbers in ``docs/performance.md``).
``DaliViewDecoder`` is importable from this module too, loaded on first use so that
importing the reference does not import DALI.
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch
from PIL import Image

# ImageNet statistics of RGB in [0, 1]: the one definition, used by every decoder,
# teacher and student of the project.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: Image.Image) -> np.ndarray:
    """Convert a PIL image of any mode to 8-bit RGB by the rules in the module docstring.

    Returns np.uint8 (H, W, 3), H and W as ``image.size`` reports them (no EXIF rotation).
    """
    if image.mode in _SIXTEEN_BIT_MODES:
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


def pil_view(data: bytes, box: Sequence[int], flip: bool, size: int = 224) -> np.ndarray:
    """Decode one view with PIL: the reference implementation.

    data: the encoded image (any format PIL reads); box: (x, y, w, h) ints in the stored
    image's pixels; flip: mirror left-right after resizing.
    Returns np.uint8 (size, size, 3), RGB.
    """
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        x, y, w, h = check_box(box, width=width, height=height)
        if image.mode in _SIXTEEN_BIT_MODES:
            rgb = Image.fromarray(to_rgb(image))
        else:
            rgb = image.convert("RGB")
    crop = rgb.crop((x, y, x + w, y + h))
    resized = crop.resize((size, size), resample=Image.Resampling.BILINEAR)
    if flip:
        resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(resized)


def normalize_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalise 8-bit RGB images.

    pixels: uint8 (B, H, W, 3). Returns float32 (B, 3, H, W) = (pixels / 255 - MEAN) / STD.
    """
    mean = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)
    chw = pixels.permute(0, 3, 1, 2).to(torch.float32)
    return (chw / 255.0 - mean) / std


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Undo ``normalize_uint8``: float32 (B, 3, H, W) normalised -> float32 (B, 3, H, W)
    pixel values on the 0..255 scale (not rounded)."""
    mean = torch.tensor(MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * std + mean) * 255.0


def pil_views(
    datas: Sequence[bytes],
    boxes: np.ndarray | Sequence[Sequence[int]],
    flips: np.ndarray | Sequence[bool],
    size: int = 224,
    normalize: bool = True,
) -> torch.Tensor:
    """Decode a batch of views with PIL.

    datas: B encoded images; boxes: (B, 4) ints (x, y, w, h); flips: (B,) bool.
    Returns float32 (B, 3, size, size): normalised with MEAN/STD if ``normalize``, else the
    RGB pixel values on the 0..255 scale.
    """
    boxes = np.asarray(boxes)
    flips = np.asarray(flips)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) != len(datas) or flips.shape != (len(datas),):
        raise ValueError(
            f"pil_views: expected {len(datas)} images, boxes ({len(datas)}, 4) and flips "
            f"({len(datas)},), got boxes {boxes.shape} and flips {flips.shape}"
        )
    pixels = np.empty((len(datas), size, size, 3), dtype=np.uint8)
    for k, data in enumerate(datas):
        pixels[k] = pil_view(data, boxes[k], bool(flips[k]), size=size)
    batch = torch.from_numpy(pixels)
    if normalize:
        return normalize_uint8(batch)
    return batch.permute(0, 3, 1, 2).to(torch.float32)


def __getattr__(name: str):
    # DaliViewDecoder lives in store/dali_decode.py; loading it lazily keeps DALI out of
    # processes that only need the reference decoder.
    if name == "DaliViewDecoder":
        from store.dali_decode import DaliViewDecoder

        return DaliViewDecoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
