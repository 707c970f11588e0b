"""An easy synthetic COCO set: coloured shapes on plain backgrounds, in the official layout.

    python -m samples.toy_coco OUT [--train 200] [--val 40] [--size 128] [--seed 0] [--short]

1-3 non-overlapping shapes per image (red rectangle, green ellipse, blue triangle) on grey,
polygon annotations, sparse category ids (3, 7, 11) as COCO's are. ``--short``: the layout
without the year (``instances_train.json``, ``train/``)."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = ({"id": 3, "name": "rectangle", "color": (220, 40, 40)},
              {"id": 7, "name": "ellipse", "color": (40, 200, 60)},
              {"id": 11, "name": "triangle", "color": (40, 70, 230)})


def _polygon(kind: str, x: float, y: float, w: float, h: float) -> list[tuple[float, float]]:
    if kind == "rectangle":
        return [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]
    if kind == "ellipse":
        cx, cy = x + w / 2, y + h / 2
        return [(cx + w / 2 * math.cos(t), cy + h / 2 * math.sin(t))
                for t in np.linspace(0, 2 * math.pi, 24, endpoint=False)]
    return [(x + w / 2, y), (x + w, y + h), (x, y + h)]


def _image(rng: np.random.Generator, *, size: int, max_shapes: int):
    """One image (PIL RGB) and its shapes as (category dict, polygon) pairs."""
    background = int(rng.integers(90, 170))
    image = Image.new("RGB", (size, size), (background,) * 3)
    draw = ImageDraw.Draw(image)
    placed: list[tuple[float, float, float, float]] = []
    shapes = []
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        for _attempt in range(20):
            w, h = rng.uniform(0.2, 0.45, size=2) * size
            x, y = rng.uniform(0, size - w), rng.uniform(0, size - h)
            if all(x + w < a or a + c < x or y + h < b or b + d < y for a, b, c, d in placed):
                break
        else:
            continue
        placed.append((x, y, w, h))
        category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        polygon = _polygon(category["name"], x, y, w, h)
        color = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in category["color"])
        draw.polygon(polygon, fill=color)
        shapes.append((category, polygon))
    return image, shapes


def make_toy_coco(out: Path, *, train: int = 200, val: int = 40, size: int = 128, seed: int = 0,
                  max_shapes: int = 3, short_layout: bool = False) -> Path:
    """Write the toy set under ``out``; returns ``out``. Deterministic in ``seed``."""
    out = Path(out)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for split, count, offset in (("train", train, 0), ("val", val, 10**6)):
        name = split if short_layout else f"{split}2017"
        (out / name).mkdir(exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            rng = np.random.default_rng([seed, offset + i])
            image, shapes = _image(rng, size=size, max_shapes=max_shapes)
            image_id = offset + i + 1
            file_name = f"{image_id:012d}.png"
            image.save(out / name / file_name)
            images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
            for category, polygon in shapes:
                xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
                box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
                annotations.append({
                    "id": len(annotations) + 1 + offset, "image_id": image_id, "category_id": category["id"],
                    "segmentation": [[round(v, 2) for p in polygon for v in p]],
                    "bbox": [round(v, 2) for v in box], "area": round(box[2] * box[3], 2), "iscrowd": 0})
        categories = [{"id": c["id"], "name": c["name"], "supercategory": "shape"} for c in CATEGORIES]
        (out / "annotations" / f"instances_{name}.json").write_text(json.dumps(
            {"images": images, "annotations": annotations, "categories": categories}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--train", type=int, default=200, help="training images (default 200)")
    parser.add_argument("--val", type=int, default=40, help="validation images (default 40)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--short", action="store_true", help="instances_{train,val}.json + {train,val}/ layout")
    args = parser.parse_args()
    make_toy_coco(args.out, train=args.train, val=args.val, size=args.size, seed=args.seed,
                  short_layout=args.short)
    print(f"wrote toy COCO set to {args.out}")


if __name__ == "__main__":
    main()
