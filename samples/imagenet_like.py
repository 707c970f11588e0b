"""Photos with ImageNet-1K's spread of size and JPEG quality, for measuring the data path, whose
cost grows with the pixels and the entropy of each JPEG: ``write_imagenet_like`` writes an
ImageFolder tree of random crops of scikit-image's photographs (long side 300-800 px around 500,
ImageNet's aspect ratios, quality 90-95, mild colour changes and noise), byte-identical for a
seed; ``size_summary`` reports what a tree holds."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["ASPECTS", "LONG_SIDE", "QUALITY", "size_summary", "write_imagenet_like"]

LONG_SIDE = (300, 800, 500)          # min, max, median of the long side in pixels
QUALITY = (90, 95)                   # JPEG quality, inclusive
ASPECTS = ((4 / 3, 0.60), (3 / 4, 0.15), (1.0, 0.10), (16 / 9, 0.10), (2 / 3, 0.05))   # (w / h, share)
_SOURCES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
            "retina", "cat", "colorwheel")


def _sources() -> list[np.ndarray]:
    import skimage.data

    out = []
    for name in _SOURCES:
        try:
            a = np.asarray(getattr(skimage.data, name)())
        except Exception:             # noqa: BLE001 - a sample missing from this skimage build
            continue
        if a.ndim == 3 and a.shape[2] >= 3:
            out.append(np.ascontiguousarray(a[..., :3]).astype(np.uint8))
    if not out:
        raise RuntimeError("scikit-image ships none of the RGB sample photos " + ", ".join(_SOURCES))
    return out


def _draw_size(rng: np.random.Generator) -> tuple[int, int]:
    lo, hi, median = LONG_SIDE
    long = int(np.clip(round(median * np.exp(rng.normal(0.0, 0.25))), lo, hi))
    shares = np.array([s for _, s in ASPECTS])
    aspect = ASPECTS[int(rng.choice(len(ASPECTS), p=shares / shares.sum()))][0]
    if aspect >= 1:
        return long, max(1, round(long / aspect))
    return max(1, round(long * aspect)), long


def _photo(rng: np.random.Generator, sources: list[np.ndarray], width: int, height: int) -> Image.Image:
    src = sources[int(rng.integers(len(sources)))]
    h, w = src.shape[:2]
    frac = rng.uniform(0.3, 1.0)
    # a crop of the source with the target's aspect ratio, then resized to the target
    cw = min(w, max(16, int(w * frac)))
    ch = min(h, max(16, round(cw * height / width)))
    cw = min(w, max(16, round(ch * width / height)))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    image = Image.fromarray(src[y:y + ch, x:x + cw]).resize((width, height), Image.Resampling.LANCZOS)
    a = np.asarray(image, dtype=np.float32)
    if rng.random() < 0.5:
        a = a[:, ::-1]
    a = a * rng.uniform(0.9, 1.1, size=3) + rng.normal(0.0, 3.0, size=a.shape)
    return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))


def write_imagenet_like(out: Path | str, *, count: int = 256, classes: int = 8, seed: int = 0) -> Path:
    """Write ``count`` JPEGs as ``out/class_XX/img_XXXXX.jpg`` (``classes`` folders, round
    robin) and return ``out``; an existing file of the same name is overwritten."""
    if count < 1 or classes < 1:
        raise ValueError(f"write_imagenet_like: count and classes must be >= 1, got {count}, {classes}")
    out = Path(out)
    rng = np.random.default_rng(seed)
    sources = _sources()
    for k in range(count):
        width, height = _draw_size(rng)
        quality = int(rng.integers(QUALITY[0], QUALITY[1] + 1))
        folder = out / f"class_{k % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        _photo(rng, sources, width, height).save(folder / f"img_{k:05d}.jpg", format="JPEG", quality=quality)
    return out


def size_summary(root: Path | str) -> dict:
    """{images, median_long_side, min_long_side, max_long_side, mean_pixels, mean_bytes} of
    the JPEGs under ``root``."""
    longs, pixels, sizes = [], [], []
    for path in sorted(Path(root).rglob("*.jpg")):
        with Image.open(path) as image:
            w, h = image.size
        longs.append(max(w, h))
        pixels.append(w * h)
        sizes.append(path.stat().st_size)
    if not longs:
        raise ValueError(f"{root}: no .jpg files")
    return dict(images=len(longs), median_long_side=float(np.median(longs)), min_long_side=int(min(longs)),
                max_long_side=int(max(longs)), mean_pixels=float(np.mean(pixels)), mean_bytes=float(np.mean(sizes)))
