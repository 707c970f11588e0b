"""Photos for the decoder tests (tests/data/test_decode.py, test_decode_fast.py): every mode and
format the pixel rules cover, and the helpers that draw views of them and compare decoders."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.views import view_params


def encode_image(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def tree_photos(photo_tree: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(photo_tree.rglob("*.*"))}


@pytest.fixture(scope="session")
def extra_photos() -> dict[str, bytes]:
    """Real photos at ImageNet-like sizes (~500x375) plus the rarer encodings that the
    photo tree lacks: 16-bit grey PNG, palette PNG with transparency, 1-bit PNG, a JPEG
    with an EXIF rotation tag, WebP and BMP."""
    import skimage.data

    astronaut = Image.fromarray(skimage.data.astronaut()).resize((500, 500), Image.Resampling.LANCZOS)
    coffee = Image.fromarray(skimage.data.coffee()).resize((500, 333), Image.Resampling.LANCZOS)
    rocket = Image.fromarray(skimage.data.rocket()).resize((500, 334), Image.Resampling.LANCZOS)
    camera = skimage.data.camera()[::2, ::2]
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": both decoders must ignore it
    palette = rocket.convert("P")
    return {
        "astronaut_500.jpg": encode_image(astronaut, "JPEG", quality=90),
        "coffee_cmyk_500.jpg": encode_image(coffee.convert("CMYK"), "JPEG", quality=90),
        "rocket_exif6.jpg": encode_image(rocket, "JPEG", quality=90, exif=exif.tobytes()),
        "rocket_palette_trns.png": encode_image(palette, "PNG", transparency=0),
        "camera_16bit.png": encode_image(Image.fromarray(camera.astype(np.uint16) * 257 + 100), "PNG"),
        "camera_1bit.png": encode_image(Image.fromarray(camera > 100), "PNG"),
        "coffee.webp": encode_image(coffee, "WEBP", quality=90),
        "coffee.bmp": encode_image(coffee, "BMP"),
    }


@pytest.fixture(scope="session")
def all_photos(photo_tree, extra_photos) -> dict[str, bytes]:
    return {**tree_photos(photo_tree), **extra_photos}


def photo_sizes(datas: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    dims = [Image.open(io.BytesIO(d)).size for d in datas]
    return np.array([w for w, _ in dims]), np.array([h for _, h in dims])


def photo_views(datas: list[bytes], *, seed: int, views: int) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """Every photo times ``views`` views drawn by data.views.view_params."""
    widths, heights = photo_sizes(datas)
    n = len(datas)
    indices = np.repeat(np.arange(n), views)
    boxes, flips = view_params(seed, indices, np.tile(np.arange(views), n), widths[indices], heights[indices])
    return [datas[i] for i in indices], boxes, flips


def mean_abs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) float pixels -> (B,) mean absolute difference."""
    return (a - b).abs().flatten(1).mean(1)
