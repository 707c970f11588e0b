"""A small ImageFolder tree of real photographs, for tests and the demo: scikit-image's bundled
samples, downscaled and saved in the mix of formats and PIL modes the decoders must handle
(``PHOTOS``: JPEG and PNG; RGB, CMYK, L, LA, RGBA, P; landscape, portrait and a 64 px image),
byte-identical on every call, optionally with extra crops of each (``copies``). The held-out
split (``HELDOUT_PHOTOS``, ``write_photo_splits``) is nine other photos, none a crop of a
training photo."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

__all__ = ["HELDOUT_PHOTOS", "PHOTOS", "write_photo_splits", "write_photo_tree"]


def _rgb(name: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        import skimage.data

        return Image.fromarray(getattr(skimage.data, name)())

    load.source = name                  # the skimage.data photo it is made from
    return load


def _gray(name: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        import skimage.data

        array = getattr(skimage.data, name)()
        if array.dtype == bool:
            array = np.where(array, 255, 0).astype(np.uint8)
        return Image.fromarray(array, mode="L") if array.ndim == 2 else Image.fromarray(array).convert("L")

    load.source = name
    return load


def _portrait(load: Callable[[], Image.Image]) -> Callable[[], Image.Image]:
    """Central crop to a 2:3 portrait of a landscape photo."""

    def crop() -> Image.Image:
        image = load()
        w, h = image.size
        new_w = min(w, (2 * h) // 3)
        left = (w - new_w) // 2
        return image.crop((left, 0, left + new_w, h))

    crop.source = load.source
    return crop


def _with_alpha(load: Callable[[], Image.Image]) -> Callable[[], Image.Image]:
    """Grayscale photo plus a radial alpha ramp: an LA image."""

    def make() -> Image.Image:
        gray = load().convert("L")
        w, h = gray.size
        yy, xx = np.mgrid[0:h, 0:w]
        r = np.hypot((xx - w / 2) / (w / 2), (yy - h / 2) / (h / 2))
        alpha = Image.fromarray(np.clip(255 * (1.2 - r), 0, 255).astype(np.uint8), mode="L")
        return Image.merge("LA", (gray, alpha))

    make.source = load.source
    return make


# (class, stem, loader, PIL mode to store, PIL format, file extension)
PHOTOS: list[tuple[str, str, Callable[[], Image.Image], str, str, str]] = [
    ("animals", "chelsea", _rgb("chelsea"), "RGB", "JPEG", "jpg"),
    ("animals", "cat_portrait_cmyk", _portrait(_rgb("cat")), "CMYK", "JPEG", "jpg"),
    ("animals", "horse", _gray("horse"), "L", "PNG", "png"),
    ("objects", "coffee", _rgb("coffee"), "RGB", "JPEG", "jpg"),
    ("objects", "rocket_portrait", _portrait(_rgb("rocket")), "RGB", "JPEG", "jpg"),
    ("objects", "logo_rgba", _rgb("logo"), "RGBA", "PNG", "png"),
    ("objects", "clock_gray", _gray("clock"), "L", "JPEG", "jpg"),
    ("objects", "colorwheel_palette", _rgb("colorwheel"), "P", "PNG", "png"),
    ("science", "hubble", _rgb("hubble_deep_field"), "RGB", "JPEG", "jpg"),
    ("science", "immunohistochemistry", _rgb("immunohistochemistry"), "RGB", "PNG", "png"),
    ("science", "coins", _gray("coins"), "L", "PNG", "png"),
    ("science", "text_la", _with_alpha(_gray("text")), "LA", "PNG", "png"),
    ("science", "microaneurysms_small", _gray("microaneurysms"), "L", "JPEG", "jpg"),
]
# the held-out split: photos of the wheel that no entry of PHOTOS is made from
HELDOUT_PHOTOS: list[tuple[str, str, Callable[[], Image.Image], str, str, str]] = [
    ("animals", "astronaut", _rgb("astronaut"), "RGB", "JPEG", "jpg"),
    ("animals", "retina", _rgb("retina"), "RGB", "JPEG", "jpg"),
    ("animals", "cell", _gray("cell"), "L", "PNG", "png"),
    ("objects", "camera", _gray("camera"), "L", "PNG", "png"),
    ("objects", "brick", _gray("brick"), "L", "JPEG", "jpg"),
    ("objects", "page", _gray("page"), "L", "PNG", "png"),
    ("science", "moon", _gray("moon"), "L", "JPEG", "jpg"),
    ("science", "grass", _gray("grass"), "L", "JPEG", "jpg"),
    ("science", "gravel", _gray("gravel"), "L", "PNG", "png"),
]
_SMALL_SIDE = {"microaneurysms_small": 64}


def _variant_crop(image: Image.Image, copy: int) -> Image.Image:
    """Copy 0 is the whole photo; copy c > 0 a deterministic crop of 60-95% of each side."""
    if copy == 0:
        return image
    w, h = image.size
    frac_w = 0.60 + 0.35 * ((copy * 0.618034) % 1.0)
    frac_h = 0.60 + 0.35 * ((copy * 0.414214) % 1.0)
    cw, ch = max(8, int(w * frac_w)), max(8, int(h * frac_h))
    left = int((w - cw) * ((copy * 0.754878) % 1.0))
    top = int((h - ch) * ((copy * 0.569840) % 1.0))
    return image.crop((left, top, left + cw, top + ch))


def _fit(image: Image.Image, max_side: int) -> Image.Image:
    w, h = image.size
    scale = max_side / max(w, h)
    if scale >= 1.0:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
    if mode == "P":
        return image.convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    if mode == "RGBA" and image.mode != "RGBA":
        return image.convert("RGBA")
    return image.convert(mode)


def write_photo_tree(out: Path, *, max_side: int = 256, copies: int = 1, progress: bool = False,
                     photos=PHOTOS) -> Path:
    """Write ``photos`` as an ImageFolder tree under ``out`` (its class folders and files).

    Args:
        out: root folder; created if missing. Existing files of the same names are overwritten.
        max_side: the long side of each photo is downscaled to at most this many pixels.
        copies: number of versions of each photo (1: the photo only; c > 1 adds c - 1 crops).
        progress: show a tqdm bar.
        photos: the photos to write (``PHOTOS``, or ``HELDOUT_PHOTOS``).
    Returns:
        ``out`` as a Path: ``out/<class>/<stem>[_cNN].<ext>``.
    """
    from core.progress import progress_bar

    if max_side < 16:
        raise ValueError(f"write_photo_tree: max_side must be >= 16, got {max_side}")
    if copies < 1:
        raise ValueError(f"write_photo_tree: copies must be >= 1, got {copies}")
    out = Path(out)
    jobs = [(photo, c) for photo in photos for c in range(copies)]
    cache: dict[str, Image.Image] = {}
    for (cls, stem, load, mode, fmt, ext), copy in progress_bar(jobs, progress=progress, desc="photos", unit="img"):
        if stem not in cache:
            cache[stem] = load()
        image = _variant_crop(cache[stem], copy)
        image = _fit(image, min(max_side, _SMALL_SIDE.get(stem, max_side)))
        image = _to_mode(image, mode)
        folder = out / cls
        folder.mkdir(parents=True, exist_ok=True)
        name = stem if copy == 0 else f"{stem}_c{copy:02d}"
        options = {"quality": 90} if fmt == "JPEG" else {"optimize": False}
        image.save(folder / f"{name}.{ext}", format=fmt, **options)
    return out


def write_photo_splits(root: Path, *, copies: int, heldout_copies: int, max_side: int = 256) -> tuple[Path, Path, bool]:
    """Two ImageFolder trees: ``root/train`` (copies 0 .. ``copies`` - 1 of each of ``PHOTOS``)
    and ``root/heldout`` (copies 0 .. ``heldout_copies`` - 1 of each of ``HELDOUT_PHOTOS``:
    other photos, so nothing held out is a crop of a training image).

    Returns (train tree, held-out tree, reused). Written once: ``root/done.json`` marks a
    finished write, and a later call returns the trees as they are."""
    root = Path(root)
    train, heldout, done = root / "train", root / "heldout", root / "done.json"
    if done.is_file():
        return train, heldout, True
    for d in (train, heldout, root / "staging"):
        shutil.rmtree(d, ignore_errors=True)
    staging = root / "staging"
    write_photo_tree(staging / "train", max_side=max_side, copies=copies)
    write_photo_tree(staging / "heldout", max_side=max_side, copies=heldout_copies, photos=HELDOUT_PHOTOS)
    os.replace(staging / "train", train)           # whole trees appear only when both are written
    os.replace(staging / "heldout", heldout)
    shutil.rmtree(staging)
    done.write_text(json.dumps({"copies": copies, "heldout_copies": heldout_copies, "max_side": max_side}))
    return train, heldout, False
