"""Labelled images for evaluation: a packed set (``prepare``) or an ImageFolder tree, decoded with
PIL to RGB (``EvalImages``), and the protocols' transforms, each sample transformed under
generators keyed by (seed, epoch, index) so that a resumed run sees the same pixels
(docs/eval.md, "Data")."""
from __future__ import annotations

import contextlib
import io
import random
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from data.decode import MEAN as IMAGENET_MEAN, STD as IMAGENET_STD  # the project's one definition
from core.keys import derive_seed
from data.decode import to_rgb as decode_to_rgb

__all__ = [
    "EvalImages",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "eval_transform",
    "probe_train_transform",
    "finetune_transform",
    "to_rgb",
    "seeded_rngs",
    "make_loader",
]

CROP_PCT = 0.875  # 224 / 256
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".pbm",
                    ".pnm", ".tif", ".tiff", ".gif")


@contextlib.contextmanager
def seeded_rngs(seed: int, *, cuda_devices: Sequence[torch.device] = ()):
    """Run a block with torch (CPU and given CUDA devices), ``random`` and
    ``numpy.random`` global generators seeded from ``seed``; restore them after.

    torchvision/timm augmentations and timm's drop path and Mixup draw from these
    global generators; this keeps their draws keyed and the caller's state intact.
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    devices = [d.index if d.index is not None else torch.cuda.current_device()
               for d in cuda_devices if d.type == "cuda"]
    with torch.random.fork_rng(devices=devices):
        # the generators themselves: torch.manual_seed would also queue seeds for every
        # accelerator backend, ~50x slower per call
        torch.default_generator.manual_seed(seed)
        for index in devices:
            torch.cuda.default_generators[index].manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB by the project's one set of rules (data/decode/pixels.py: to_rgb)."""
    if img.mode == "RGB":
        return img
    return Image.fromarray(decode_to_rgb(img))


class EvalImages(torch.utils.data.Dataset):
    """Labelled images from a packed set or an ImageFolder tree.

    ``classes``: if given (e.g. the train set's classes when opening val), labels are
    indices into it and every class of this set must appear in it; otherwise this
    set's own sorted classes. ``__getitem__`` returns (transform(image), label int).
    ``task`` (e.g. "eval knn") names what needs the labels when a packed set has none (ValueError).
    """

    def __init__(self, root: Path, *, transform: Callable | None = None,
                 classes: Sequence[str] | None = None, seed: int = 0, task: str = "this evaluation"):
        self.root = Path(root)
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset {self.root}: no such directory")
        if (self.root / "manifest.json").exists():
            from data.shards import ImageSet

            self._packed = ImageSet.open(self.root)
            self._packed.require_labels(task)
            self._files = None
            own_classes = list(self._packed.classes)
            own_labels = np.asarray(self._packed.labels, dtype=np.int64)
            self.layout = "packed"
        else:
            self._packed = None
            own_classes, self._files, own_labels = _scan_image_folder(self.root, task)
            self.layout = "imagefolder"
        if classes is None:
            self.classes = own_classes
            self.labels = own_labels
        else:
            self.classes = list(classes)
            index = {c: j for j, c in enumerate(self.classes)}
            unknown = [c for c in own_classes if c not in index]
            if unknown:
                raise ValueError(
                    f"dataset {self.root}: classes not in the reference (train) set: "
                    f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}"
                    f" ({len(unknown)} of {len(own_classes)})")
            remap = np.array([index[c] for c in own_classes], dtype=np.int64)
            self.labels = remap[own_labels] if len(own_labels) else own_labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self):  # an open ImageSet (file descriptors, lock) is reopened, not pickled
        state = dict(self.__dict__)
        if state["_packed"] is not None:
            state["_packed"] = None
            state["_reopen"] = True
        return state

    def __setstate__(self, state):
        reopen = state.pop("_reopen", False)
        self.__dict__.update(state)
        if reopen:
            from data.shards import ImageSet

            self._packed = ImageSet.open(self.root)

    def set_epoch(self, epoch: int) -> None:
        """Key the random transforms of the next pass by ``epoch``."""
        self.epoch = int(epoch)

    def read(self, i: int) -> bytes:
        """Encoded bytes of image ``i``."""
        if self._packed is not None:
            return self._packed.read(int(i))
        return self._files[i].read_bytes()

    def image(self, i: int) -> Image.Image:
        """Decoded RGB image ``i``."""
        where = self._packed.source(int(i)) if self._packed is not None else self._files[i]
        try:
            with Image.open(io.BytesIO(self.read(i))) as img:
                img.load()
                return to_rgb(img)
        except Exception as err:
            raise ValueError(f"dataset {self.root}: sample {i} ({where}) cannot be decoded: "
                             f"{err}") from err

    def __getitem__(self, i: int):
        img = self.image(i)
        if self.transform is not None:
            with seeded_rngs(derive_seed(self.seed, self.epoch, i)):
                img = self.transform(img)
        return img, int(self.labels[i])


def _scan_image_folder(root: Path, task: str):
    if (root / "shards").is_dir() and any((root / "shards").glob("*.tar")):
        raise ValueError(
            f"dataset {root}: has shards/*.tar but no manifest.json: an unfinished `prepare` "
            f"(the manifest is written last); run prepare again to finish it")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        hint = ""
        if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.iterdir()):
            hint = (f" It holds image files directly, without labels, and {task} needs labels: put them in "
                    f"one folder per class.")
        raise ValueError(
            f"dataset {root}: neither a packed set (no manifest.json) nor an ImageFolder "
            f"tree (no class subfolders: expected {root}/<class>/<image>).{hint}")
    files: list[Path] = []
    labels: list[int] = []
    empty: list[str] = []
    for label, d in enumerate(subdirs):
        found = sorted(p for p in d.rglob("*")
                       if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
                       and p.is_file())
        if not found:
            empty.append(d.name)
        files += found
        labels += [label] * len(found)
    if empty:
        raise ValueError(
            f"dataset {root}: class folders without images ({', '.join(IMAGE_EXTENSIONS)}): "
            f"{', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''} "
            f"({len(empty)} of {len(subdirs)})")
    return [d.name for d in subdirs], files, np.asarray(labels, dtype=np.int64)


def eval_transform(size: int = 224, *, interpolation: str = "bicubic") -> Callable:
    """Resize shorter side to size/0.875 (256 at 224), center crop ``size``, normalise.

    Returns a PIL -> (3, size, size) float32 transform.
    """
    from torchvision import transforms as T

    mode = T.InterpolationMode(interpolation)
    return T.Compose([
        T.Resize(int(round(size / CROP_PCT)), interpolation=mode),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def probe_train_transform(size: int = 224) -> Callable:
    """MAE linear-probe augmentation: RandomResizedCrop (bicubic) + flip, normalise.

    Returns a PIL -> (3, size, size) float32 transform.
    """
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def finetune_transform(size: int = 224, *, auto_augment: str = "rand-m9-mstd0.5-inc1",
                       re_prob: float = 0.25, color_jitter: float | None = None) -> Callable:
    """MAE/DeiT fine-tune training augmentation via timm ``create_transform``:
    RandomResizedCrop, flip, RandAugment, random erasing (pixel mode), bicubic.

    Returns a PIL -> (3, size, size) float32 transform.
    """
    from timm.data import create_transform

    return create_transform(input_size=size, is_training=True, auto_augment=auto_augment,
                            color_jitter=color_jitter, interpolation="bicubic",
                            re_prob=re_prob, re_mode="pixel", re_count=1,
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)


def make_loader(dataset: torch.utils.data.Dataset, *, batch_size: int, shuffle: bool,
                seed: int = 0, epoch: int = 0, num_workers: int = 0, drop_last: bool = False,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader whose order is keyed by (seed, epoch), never by the global RNG."""
    gen = torch.Generator().manual_seed(derive_seed(seed, epoch, 0x5EED))
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=gen,
        num_workers=num_workers, drop_last=drop_last, pin_memory=pin_memory,
        persistent_workers=False)
