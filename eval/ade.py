"""ADE20K semantic segmentation data (ADEChallengeData2016): the layout, the benchmark's label
convention (0 ignored as 255, class k -> k-1), mmsegmentation's training transform with every draw
keyed by (seed, epoch, index), and the test resize (docs/eval.md, "Segmentation")."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data.decode import MEAN as IMAGENET_MEAN, STD as IMAGENET_STD

SPLITS = ("training", "validation")
IGNORE = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def resolve_layout(root: Path, split: str) -> tuple[Path, Path]:
    """(image folder, annotation folder) of ``split``; raises naming what is missing."""
    if split not in SPLITS:
        raise ValueError(f"ADE20K split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"ADE20K dataset folder {root}: no such directory")
    images, annotations = root / "images" / split, root / "annotations" / split
    missing = [str(p) for p in (images, annotations) if not p.is_dir()]
    if missing:
        raise FileNotFoundError(f"ADE20K dataset folder {root}: missing {' and '.join(missing)} "
                                f"(expected images/{split}/*.jpg and annotations/{split}/*.png)")
    return images, annotations


def list_pairs(images: Path, annotations: Path) -> list[tuple[Path, Path]]:
    """(image, label map) pairs matched by file stem, sorted by name; every image needs a label."""
    pairs, orphans = [], []
    for image in sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        label = annotations / (image.stem + ".png")
        (pairs.append((image, label)) if label.is_file() else orphans.append(image.name))
    if orphans:
        raise FileNotFoundError(f"{annotations}: no label map for {len(orphans)} image(s) of {images}, "
                                f"e.g. {', '.join(orphans[:5])} (expected <name>.png)")
    if not pairs:
        raise FileNotFoundError(f"{images}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return pairs


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """(H, W) uint8 ADE labels -> (H, W) int64: 0 -> 255 (ignored), k -> k - 1, 255 stays 255."""
    label = label.astype(np.int64)
    out = label - 1
    out[(label == 0) | (label == IGNORE)] = IGNORE
    return out


def read_label(path: Path, *, num_classes: int) -> torch.Tensor:
    """An ADE label PNG -> (H, W) int64 after ``reduce_zero_label``; checks the class range."""
    with Image.open(path) as png:
        if png.mode not in ("L", "P", "I;16", "I"):
            raise ValueError(f"{path}: label map must be a single-channel PNG, got mode {png.mode}")
        label = reduce_zero_label(np.asarray(png))
    bad = (label != IGNORE) & (label >= num_classes)
    if bad.any():
        raise ValueError(f"{path}: label {int(label[bad].max()) + 1} exceeds the {num_classes} classes")
    return torch.from_numpy(label)


def read_image(path: Path) -> torch.Tensor:
    """An image file -> (3, H, W) float32 in [0, 1], RGB."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def fit_scale(height: int, width: int, *, long_side: float, short_side: float) -> tuple[int, int]:
    """Size after resizing (height, width) keeping the ratio to fit (long_side, short_side)."""
    scale = min(long_side / max(height, width), short_side / min(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


@dataclass(frozen=True)
class Distortion:
    """One draw of mmseg's PhotoMetricDistortion; ``None`` means the step is skipped (p 0.5 each).

    On mmseg's scales: ``brightness`` is added to 0..255 pixel values (U(-32, 32));
    ``contrast`` multiplies them (U(0.5, 1.5)); ``saturation`` multiplies HSV S
    (U(0.5, 1.5), S clipped to 1); ``hue`` is an integer added to OpenCV's 0..180 hue
    (numpy's ``randint(-18, 18)``, i.e. -18..17, so a shift of 2 * hue degrees).
    ``contrast_first``: contrast right after brightness, else last (p 0.5).
    """

    brightness: float | None
    contrast: float | None
    contrast_first: bool
    saturation: float | None
    hue: int | None


def draw_distortion(rng: np.random.Generator, *, brightness_delta: float = 32, contrast_range=(0.5, 1.5),
                    saturation_range=(0.5, 1.5), hue_delta: int = 18) -> Distortion:
    """mmseg PhotoMetricDistortion's draws (defaults as mmseg) from ``rng``."""
    brightness = float(rng.uniform(-brightness_delta, brightness_delta)) if rng.random() < 0.5 else None
    contrast_first = bool(rng.random() < 0.5)
    contrast = float(rng.uniform(*contrast_range)) if rng.random() < 0.5 else None
    saturation = float(rng.uniform(*saturation_range)) if rng.random() < 0.5 else None
    hue = int(rng.integers(-hue_delta, hue_delta)) if rng.random() < 0.5 else None
    return Distortion(brightness, contrast, contrast_first, saturation, hue)


def scale_saturation(image: torch.Tensor, alpha: float) -> torch.Tensor:
    """(3, H, W) RGB in [0, 1] with HSV S multiplied by ``alpha`` and clipped to 1; H and V kept.

    With V = max(r, g, b) and S = (V - min) / V, a channel c at fixed hue is V - (V - c) and
    (V - c) scales with S, so c' = V - min(alpha, 1 / S) (V - c); grey pixels stay grey.
    """
    value = image.amax(dim=0, keepdim=True)
    spread = value - image.amin(dim=0, keepdim=True)
    limit = torch.where(spread > 0, value / spread.clamp_min(1e-12), torch.full_like(spread, alpha))
    return (value - torch.clamp(limit, max=alpha) * (value - image)).clamp(0, 1)


def shift_hue(image: torch.Tensor, delta: int) -> torch.Tensor:
    """(3, H, W) RGB in [0, 1] with the hue moved by ``delta`` on OpenCV's 0..180 scale (2 delta degrees)."""
    from torchvision.transforms.v2 import functional as TF

    return TF.adjust_hue(image, delta / 180.0)     # hue_factor is a fraction of the circle


def apply_distortion(image: torch.Tensor, d: Distortion) -> torch.Tensor:
    """(3, H, W) float32 RGB in [0, 1] -> the same, distorted as mmseg does (clamped after each step)."""
    if d.brightness is not None:
        image = (image + d.brightness / 255.0).clamp(0, 1)
    if d.contrast_first and d.contrast is not None:
        image = (image * d.contrast).clamp(0, 1)
    if d.saturation is not None:
        image = scale_saturation(image, d.saturation)
    if d.hue is not None:
        image = shift_hue(image, d.hue)
    if not d.contrast_first and d.contrast is not None:
        image = (image * d.contrast).clamp(0, 1)
    return image


def photometric(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """mmseg PhotoMetricDistortion on (3, H, W) float32 in [0, 1]; returns the same shape, clamped."""
    return apply_distortion(image, draw_distortion(rng))


class AdeSegmentation(torch.utils.data.Dataset):
    """One ADE20K split.

    ``train=True`` items: (image (3, S, S) float32 normalised, label (S, S) int64, 255 ignored).
    ``train=False`` items: (image (3, h, w) float32 normalised, resized for testing; label
    (H, W) int64 at the original size).
    """

    def __init__(self, root: Path, split: str, *, train: bool, image_size: int = 512, num_classes: int = 150,
                 seed: int = 0, max_images: int | None = None, scale_range: tuple[float, float] = (0.5, 2.0),
                 cat_max_ratio: float = 0.75):
        self.pairs = list_pairs(*resolve_layout(root, split))
        if max_images is not None:
            self.pairs = self.pairs[:max_images]
        self.train, self.image_size, self.num_classes, self.seed = train, image_size, num_classes, seed
        self.scale_range, self.cat_max_ratio = scale_range, cat_max_ratio
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch`` (call before iterating)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        image_path, label_path = self.pairs[index]
        image, label = read_image(image_path), read_label(label_path, num_classes=self.num_classes)
        if image.shape[-2:] != label.shape:
            raise ValueError(f"{label_path} is {tuple(label.shape)} but {image_path} is {tuple(image.shape[-2:])}")
        size = self.image_size
        if not self.train:
            h, w = fit_scale(*image.shape[-2:], long_side=4 * size, short_side=size)
            image = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False,
                                  antialias=h < image.shape[-2])[0]
            return (image - MEAN) / STD, label
        rng = np.random.default_rng([self.seed, self.epoch, index])
        ratio = rng.uniform(*self.scale_range)
        h, w = fit_scale(*image.shape[-2:], long_side=4 * size * ratio, short_side=size * ratio)
        image = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False,
                              antialias=h < image.shape[-2])[0]
        label = F.interpolate(label[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
        top, left = self._crop(label, rng)
        image = image[:, top:top + size, left:left + size]
        label = label[top:top + size, left:left + size]
        if rng.random() < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        image = (photometric(image, rng) - MEAN) / STD
        pad_h, pad_w = size - image.shape[1], size - image.shape[2]
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
        label = F.pad(label, (0, pad_w, 0, pad_h), value=IGNORE)
        return image.contiguous(), label.contiguous()

    def _crop(self, label: torch.Tensor, rng: np.random.Generator) -> tuple[int, int]:
        """Top-left of an S x S crop (or smaller) where no class exceeds cat_max_ratio (10 tries)."""
        h, w = label.shape
        size = self.image_size
        for _ in range(10):
            top = int(rng.integers(0, max(h - size, 0) + 1))
            left = int(rng.integers(0, max(w - size, 0) + 1))
            counts = torch.bincount(label[top:top + size, left:left + size].flatten(), minlength=IGNORE + 1)[:IGNORE]
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() < self.cat_max_ratio * counts.sum():
                break
        return top, left
