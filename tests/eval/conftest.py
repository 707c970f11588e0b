"""Fixtures of the evaluations: a tiny ViT checkpoint, a toy COCO set, a toy ADE20K set (built once per
session in the official layouts), and ``toy``, three colour classes for the linear probe and fine-tuning
(built once per module). All read-only for tests.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

DENSE_VIT_ARGS = ("img_size=64", "depth=2")
COLOURS = {"blue": (30, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40)}


def make_toy_folder(root, *, per_class, seed):
    """ImageFolder of 40x48 images: a class-coloured rectangle on a noisy gray field."""
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            img = rng.integers(90, 140, size=(40, 48, 3)).astype(np.uint8)
            y, x = rng.integers(0, 12), rng.integers(0, 14)
            img[y:y + 26, x:x + 32] = np.clip(np.array(rgb) + rng.integers(-20, 20, 3), 0, 255)
            Image.fromarray(img).save(root / name / f"{j:03d}.png")
    return root


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(train, val, checkpoint): 12 train and 6 val images of 3 classes, and a random 2-block
    vit_tiny_patch16_224 (img_size 32) state dict saved with torch.save."""
    import timm

    base = tmp_path_factory.mktemp("toy")
    train = make_toy_folder(base / "train", per_class=4, seed=1)
    val = make_toy_folder(base / "val", per_class=2, seed=2)
    ck = base / "student.pth"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        net = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, depth=2)
    torch.save(net.state_dict(), ck)
    return train, val, ck


@pytest.fixture
def keep_run_folder(monkeypatch):
    """``keep_run_folder(when, dest)``: copy the run folder to ``dest`` right after the first checkpoint
    ``obj`` with ``when(obj)`` is saved: the folder a run killed at that moment would leave behind."""
    import shutil

    from core.run import Run

    def keep(when, dest):
        original = Run.save

        def save(run, obj, name=None):
            path = original(run, obj, name)
            if when(obj) and not Path(dest).exists():
                shutil.copytree(run.path, dest)
            return path
        monkeypatch.setattr(Run, "save", save)
    return keep


@pytest.fixture(scope="session")
def dense_vit_checkpoint(tmp_path_factory) -> Path:
    """A random 2-block vit_tiny_patch16_224 (img_size 64) saved as safetensors; load it with
    ``--model-arg img_size=64 --model-arg depth=2`` (``DENSE_VIT_ARGS``)."""
    import timm
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=64, depth=2)
    path = tmp_path_factory.mktemp("dense_vit") / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session")
def toy_coco_dir(tmp_path_factory) -> Path:
    """Official COCO 2017 layout: 4 train and 2 val images of 64 px, category ids 3/7/11."""
    from samples.toy_coco import make_toy_coco

    return make_toy_coco(tmp_path_factory.mktemp("coco") / "coco", train=4, val=2, size=64, seed=1)


def write_ade(root: Path, *, sizes: dict[str, list[tuple[int, int]]], seed: int = 0) -> Path:
    """ADEChallengeData2016 layout under ``root``: per split, one JPEG and one label PNG per (h, w).

    Label maps hold 0 ("other", ignored), 1, 2 and 150 in blocks; the image's colour follows the
    label so that the task is learnable.
    """
    colours = {0: (128, 128, 128), 1: (220, 30, 30), 2: (30, 200, 40), 150: (30, 40, 220)}
    for split, shapes in sizes.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i, (h, w) in enumerate(shapes):
            rng = np.random.default_rng([seed, i, len(split)])
            label = np.zeros((h, w), np.uint8)
            y, x = int(rng.integers(h // 4, 3 * h // 4)), int(rng.integers(w // 4, 3 * w // 4))
            label[:y, :x], label[:y, x:], label[y:, :x] = 1, 2, 150
            label[y:, x:][: max(1, (h - y) // 3)] = 0
            image = np.zeros((h, w, 3), np.uint8)
            for value, colour in colours.items():
                image[label == value] = colour
            name = f"ADE_{split}_{i + 1:08d}"
            Image.fromarray(image).save(root / "images" / split / f"{name}.jpg", quality=95)
            Image.fromarray(label).save(root / "annotations" / split / f"{name}.png")
    return root


@pytest.fixture(scope="session")
def toy_ade_dir(tmp_path_factory) -> Path:
    """ADE20K layout: 4 training and 2 validation images of assorted sizes (48-80 px)."""
    return write_ade(tmp_path_factory.mktemp("ade") / "ADEChallengeData2016",
                     sizes={"training": [(48, 64), (64, 80), (80, 48), (64, 64)],
                            "validation": [(48, 80), (72, 56)]})
