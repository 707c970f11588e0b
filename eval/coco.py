"""COCO instance data for Mask R-CNN: the accepted layouts (``resolve_layout``), samples with
large-scale jitter, contiguous labels for COCO's sparse category ids and back, result JSON and
COCOeval (docs/eval.md, "Detection")."""
from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SPLITS = ("train", "val")


def resolve_layout(root: Path, split: str) -> tuple[Path, Path]:
    """(annotation JSON, image folder) of ``split`` under ``root``; raises naming what is missing."""
    if split not in SPLITS:
        raise ValueError(f"COCO split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"COCO dataset folder {root}: no such directory")
    tried = []
    for name in (f"{split}2017", split):
        ann, images = root / "annotations" / f"instances_{name}.json", root / name
        if ann.is_file() and images.is_dir():
            return ann, images
        missing = [str(p) for p, ok in ((ann, ann.is_file()), (images, images.is_dir())) if not ok]
        tried.append(" and ".join(missing))
    raise FileNotFoundError(
        f"COCO dataset folder {root}: no {split} split; expected annotations/instances_{split}2017.json "
        f"with {split}2017/ (official layout) or annotations/instances_{split}.json with {split}/; "
        f"missing: {tried[0]} (official), {tried[1]} (short)")


def load_coco(ann_file: Path):
    """pycocotools ``COCO`` for ``ann_file`` without its console chatter."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_file))


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> (3, H, W) float32 in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


class CocoInstances(torch.utils.data.Dataset):
    """Images and Mask R-CNN targets of one COCO split.

    ``train=True``: large-scale jitter (ViTDet LSJ): horizontal flip (p = 0.5), resize so the
    image fits a square of side ``r * image_size`` with r ~ U(scale_range), random crop to at
    most ``image_size`` x ``image_size``; instances whose box is empty after the crop are
    dropped. The draws are keyed by (seed, epoch, index) (``set_epoch``), so they do not
    depend on worker count or order. ``train=False``: the image at its own size (the model
    resizes it and maps predictions back).

    Item: (image (3, H, W) float32 in [0, 1], target dict) where target holds ``image_id``
    (int64 scalar) and, for training, ``boxes`` (n, 4) float32 xyxy pixels, ``labels`` (n,)
    int64 in 1..K, ``masks`` (n, H, W) uint8.
    """

    def __init__(self, root: Path, split: str, *, train: bool, image_size: int = 1024, seed: int = 0,
                 max_images: int | None = None, scale_range: tuple[float, float] = (0.1, 2.0)):
        self.ann_file, self.image_dir = resolve_layout(root, split)
        self.coco = load_coco(self.ann_file)
        self.category_ids = sorted(self.coco.getCatIds())
        if not self.category_ids:
            raise ValueError(f"{self.ann_file}: no categories")
        self.label_to_category = {i + 1: c for i, c in enumerate(self.category_ids)}
        self.category_to_label = {c: i + 1 for i, c in enumerate(self.category_ids)}
        ids = sorted(self.coco.getImgIds())
        if train:  # images without a usable instance teach the detector nothing (detectron2 does the same)
            ids = [i for i in ids if any(not a.get("iscrowd", 0) and a["bbox"][2] >= 1 and a["bbox"][3] >= 1
                                         for a in self.coco.imgToAnns.get(i, []))]
        if max_images is not None:
            ids = ids[:max_images]
        if not ids:
            raise ValueError(f"{self.ann_file}: no images to use for {split}"
                             + (" (training keeps only images with non-crowd instances)" if train else ""))
        self.image_ids = ids
        self.train, self.image_size, self.seed = train, image_size, seed
        self.scale_range = scale_range
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch`` (call before iterating)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.image_ids)

    def _image(self, image_id: int) -> torch.Tensor:
        path = self.image_dir / self.coco.imgs[image_id]["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"{self.ann_file}: image {image_id} file {path} does not exist")
        with Image.open(path) as image:
            return _to_tensor(image)

    def __getitem__(self, index: int):
        image_id = self.image_ids[index]
        image = self._image(image_id)
        target = {"image_id": torch.tensor(image_id, dtype=torch.int64)}
        if not self.train:
            return image, target
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        height, width = image.shape[-2:]
        masks = np.stack([self.coco.annToMask(a) for a in anns]) if anns else np.zeros((0, height, width), np.uint8)
        if masks.shape[-2:] != (height, width):
            raise ValueError(f"{self.ann_file}: image {image_id} is {width}x{height} but its annotations "
                             f"say {masks.shape[-1]}x{masks.shape[-2]}")
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self.category_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        image, boxes, masks = self._jitter(image, boxes, torch.from_numpy(masks), index)
        keep = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
        target.update(boxes=boxes[keep], labels=labels[keep], masks=masks[keep])
        return image, target

    def _jitter(self, image: torch.Tensor, boxes: torch.Tensor, masks: torch.Tensor, index: int):
        """LSJ. image (3, H, W) float32, boxes (n, 4) xyxy float32, masks (n, H, W) uint8 -> same, new size."""
        rng = np.random.default_rng([self.seed, self.epoch, index])
        height, width = image.shape[-2:]
        if rng.random() < 0.5:
            image, masks = image.flip(-1), masks.flip(-1)
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
        ratio = rng.uniform(*self.scale_range)
        scale = ratio * self.image_size / max(height, width)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False,
                              antialias=scale < 1)[0]
        if len(masks):
            masks = F.interpolate(masks[None].float(), size=(new_h, new_w), mode="bilinear",
                                  align_corners=False)[0].ge(0.5).to(torch.uint8)
        else:
            masks = masks.new_zeros((0, new_h, new_w))
        boxes = boxes * torch.tensor([new_w / width, new_h / height] * 2)
        top = int(rng.integers(0, new_h - self.image_size + 1)) if new_h > self.image_size else 0
        left = int(rng.integers(0, new_w - self.image_size + 1)) if new_w > self.image_size else 0
        crop_h, crop_w = min(new_h, self.image_size), min(new_w, self.image_size)
        image = image[:, top:top + crop_h, left:left + crop_w]
        masks = masks[:, top:top + crop_h, left:left + crop_w]
        boxes = boxes - torch.tensor([left, top, left, top], dtype=torch.float32)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, crop_w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, crop_h)
        return image.contiguous(), boxes, masks.contiguous()


def collate(batch):
    """List of (image, target) -> (list of images, list of targets), as torchvision detection takes."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def to_results(*, image_id: int, prediction: dict, label_to_category: dict[int, int],
               mask_threshold: float = 0.5) -> tuple[list[dict], list[dict]]:
    """One image's torchvision prediction -> (bbox results, segm results) in COCO result format.

    prediction: ``boxes`` (n, 4) float xyxy in original pixels, ``labels`` (n,) int64 in 1..K,
    ``scores`` (n,) float, optionally ``masks`` (n, 1, H, W) float probabilities (or {0, 1})
    at the original image size. Boxes are written as [x, y, w, h]; masks are thresholded at
    ``mask_threshold`` and written as compressed RLE (``counts`` as a str, JSON-ready).
    Segm results carry no ``bbox`` so that COCOeval takes their area from the mask.
    """
    from pycocotools import mask as mask_utils

    boxes = prediction["boxes"].detach().float().cpu().numpy()
    scores = prediction["scores"].detach().float().cpu().numpy()
    labels = prediction["labels"].detach().cpu().numpy()
    bbox_results, segm_results = [], []
    for k in range(len(boxes)):
        x1, y1, x2, y2 = (float(v) for v in boxes[k])
        category = label_to_category[int(labels[k])]
        bbox_results.append({"image_id": int(image_id), "category_id": category,
                             "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(scores[k])})
    if "masks" in prediction:
        masks = prediction["masks"].detach().float().cpu()
        if masks.ndim == 4:
            masks = masks[:, 0]
        binary = np.asfortranarray((masks >= mask_threshold).numpy().astype(np.uint8).transpose(1, 2, 0))
        rles = mask_utils.encode(binary) if len(boxes) else []
        for k, rle in enumerate(rles):
            rle["counts"] = rle["counts"].decode("ascii")
            segm_results.append({"image_id": int(image_id), "category_id": label_to_category[int(labels[k])],
                                 "segmentation": rle, "score": float(scores[k])})
    return bbox_results, segm_results


def write_results(path: Path, results: list[dict]) -> None:
    """COCO result list -> JSON file (the format the COCO evaluation server takes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results))


METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def evaluate(coco_gt, results: list[dict], *, iou_type: str, image_ids: list[int]) -> dict[str, float]:
    """COCOeval of ``results`` on ``image_ids``; iou_type ``bbox`` or ``segm``.

    Returns AP (IoU .50:.95), AP50, AP75, APs, APm, APl in percent (0-100); -1 where COCO
    reports no ground truth in an area range. No detections at all gives AP 0.
    """
    from pycocotools.cocoeval import COCOeval

    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    if not results:
        return {name: 0.0 for name in METRIC_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))  # loadRes writes into the dicts
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(v) * 100 if v >= 0 else -1.0 for name, v in zip(METRIC_NAMES, evaluator.stats[:6])}
