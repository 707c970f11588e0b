"""ADE20K semantic segmentation: UperNet on a ViTDet simple feature pyramid; mIoU and pixel accuracy.

Protocol defaults (BEiT/MAE ADE20K recipe, mmsegmentation): 512 x 512 crops, 160k
iterations at batch 16, AdamW (betas 0.9/0.999, weight decay 0.05) lr 1e-4, layer-wise lr
decay 0.65, drop path 0.1, linear warm-up 1500 iterations then poly decay (power 1) to 0;
UperNet with 512 channels plus an FCN auxiliary head on the stride-16 level (loss weight
0.4); cross-entropy ignoring 255. Test: single scale, the image resized into (2048, 512)
keeping its ratio, a 512 x 512 window slid with stride 341, logits averaged where windows
overlap, resized to the label's size.
Choice: the pyramid is the detection one (4 levels of 256 channels from the last block),
not BEiT's four-block taps, as the method's evaluation specifies a simple feature pyramid.

Metrics (percent): mIoU = torchmetrics ``MulticlassJaccardIndex(average="macro",
ignore_index=255)`` accumulated over the whole split; its macro average leaves out classes
that are in neither the labels nor the predictions, which is mmseg's nan-mean over classes
(IoU 0/0 = nan). aAcc = ``MulticlassAccuracy(average="micro", ignore_index=255)``: correct
over labelled pixels.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from eval.ade import IGNORE, AdeSegmentation
from eval.data import derive_seed, seeded_rngs
from eval.dense_train import (check_finite, epoch_order, load_checkpoint, open_run_dir, ordered_loader,
                              param_groups, save_checkpoint, set_lr, warmup_factor)
from eval.pyramid import SimpleFeaturePyramid
from eval.upernet import FCNHead, UperHead
from store.progress import progress_bar

INIT_KEY, STEP_KEY = 0x1417, 0x57E9


class Segmenter(nn.Module):
    """ViT -> simple feature pyramid (strides 4-32, 256 channels) -> UperNet (+ FCN aux head)."""

    def __init__(self, *, vit: nn.Module, num_classes: int = 150, channels: int = 512, aux_weight: float = 0.4):
        super().__init__()
        self.backbone = SimpleFeaturePyramid(vit=vit, out_channels=256, pool_level=False)
        self.decode = UperHead(in_channels=[256] * 4, channels=channels, num_classes=num_classes)
        self.aux = FCNHead(in_channels=256, channels=channels // 2, num_classes=num_classes) if aux_weight else None
        self.aux_weight = aux_weight

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) float, normalised, H, W multiples of 16 -> logits (B, K, H, W)."""
        levels = list(self.backbone(images).values())
        return F.interpolate(self.decode(levels), size=images.shape[-2:], mode="bilinear", align_corners=False)

    def losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W) float, labels (B, H, W) int64 (255 ignored) -> {loss, decode, aux}."""
        levels = list(self.backbone(images).values())
        size = images.shape[-2:]
        logits = F.interpolate(self.decode(levels), size=size, mode="bilinear", align_corners=False)
        out = {"decode": F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)}
        if self.aux is not None:
            aux = F.interpolate(self.aux(levels[2]), size=size, mode="bilinear", align_corners=False)
            out["aux"] = self.aux_weight * F.cross_entropy(aux.float(), labels, ignore_index=IGNORE)
        out["loss"] = sum(out.values())
        return out


def window_starts(length: int, *, crop: int, stride: int) -> list[int]:
    """Start offsets of sliding windows covering [0, length) (mmseg's slide grid; the last one flush)."""
    count = max(length - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride, length - crop), 0) for i in range(count)})


@torch.no_grad()
def slide_logits(model: nn.Module, image: torch.Tensor, *, crop: int, stride: int, num_classes: int,
                 batch: int = 8) -> torch.Tensor:
    """image (3, h, w) float, normalised -> logits (K, h, w) float32 averaged over S x S windows.

    Windows past the image edge are padded with 0 (the mean) to ``crop`` and cut back.
    """
    _, h, w = image.shape
    boxes = [(y, x) for y in window_starts(h, crop=crop, stride=stride) for x in window_starts(w, crop=crop,
                                                                                             stride=stride)]
    total = image.new_zeros((num_classes, h, w), dtype=torch.float32)
    count = image.new_zeros((1, h, w), dtype=torch.float32)
    for i in range(0, len(boxes), batch):
        chunk = boxes[i:i + batch]
        tiles = torch.stack([F.pad(image[:, y:y + crop, x:x + crop],
                                   (0, max(0, crop - min(crop, w - x)), 0, max(0, crop - min(crop, h - y))))
                             for y, x in chunk])
        logits = model(tiles).float()
        for (y, x), tile in zip(chunk, logits):
            th, tw = min(crop, h - y), min(crop, w - x)
            total[:, y:y + th, x:x + tw] += tile[:, :th, :tw]
            count[:, y:y + th, x:x + tw] += 1
    return total / count


class SegmentationMetrics:
    """mIoU and pixel accuracy over a split (see the module docstring for the convention)."""

    def __init__(self, *, num_classes: int, device: torch.device | str = "cpu"):
        from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

        self.iou = MulticlassJaccardIndex(num_classes=num_classes, average="macro", ignore_index=IGNORE).to(device)
        self.acc = MulticlassAccuracy(num_classes=num_classes, average="micro", ignore_index=IGNORE).to(device)

    def update(self, prediction: torch.Tensor, label: torch.Tensor) -> None:
        """prediction, label: (H, W) or (B, H, W) int64; label 255 is ignored."""
        self.iou.update(prediction, label)
        self.acc.update(prediction, label)

    def compute(self) -> dict[str, float]:
        """{"mIoU": percent, "aAcc": percent}."""
        return {"mIoU": float(self.iou.compute()) * 100, "aAcc": float(self.acc.compute()) * 100}


def evaluate(*, model: nn.Module, dataset: AdeSegmentation, device: torch.device, workers: int) -> dict[str, float]:
    """Slide inference over ``dataset`` (train=False), prediction at the label's size -> mIoU, aAcc."""
    model.eval()
    size = dataset.image_size
    metrics = SegmentationMetrics(num_classes=dataset.num_classes, device=device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                                         generator=torch.Generator().manual_seed(0))
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for image, label in progress_bar(loader, desc="segment", unit="image"):
        with amp:
            logits = slide_logits(model, image.to(device), crop=size, stride=size * 2 // 3,
                                  num_classes=dataset.num_classes)
        logits = F.interpolate(logits[None], size=label.shape, mode="bilinear", align_corners=False)[0]
        metrics.update(logits.argmax(0), label.to(device))
    return metrics.compute()


def lr_at(step: int, *, total: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then poly decay (power 1) from ``lr`` to 0 at ``total``."""
    return lr * warmup_factor(step, warmup) * max(0.0, 1 - step / total)


def run_segmentation(*, checkpoint: Path, model: str, timm_kwargs: dict[str, Any], data: Path, run_dir: Path,
                     device: str = "auto", iters: int = 160_000, image_size: int = 512, batch_size: int = 16,
                     lr: float = 1e-4, weight_decay: float = 0.05, layer_decay: float = 0.65,
                     drop_path: float = 0.1, warmup: int = 1500, channels: int = 512, aux_weight: float = 0.4,
                     num_classes: int = 150, max_images: int | None = None, seed: int = 0,
                     checkpoint_every: int = 2000, num_workers: int = 8, resume: bool = False
                     ) -> tuple[dict[str, float], dict[str, Any]]:
    """The whole protocol: train on ``data``'s training split, evaluate on its validation split.

    Returns (metrics, settings) for ``write_result``: mIoU and aAcc in percent. Writes to
    ``run_dir``: checkpoint.pt (every ``checkpoint_every`` iterations and at the end;
    ``resume`` continues from it exactly, refusing one made with other settings) and
    log.jsonl (every 50 iterations). ``max_images`` keeps the first N images (by name) of each split.
    """
    from eval.common import checkpoint_digest, load_backbone, resolve_device

    if image_size % 32:
        raise ValueError(f"segmentation crop size must be a multiple of 32, got {image_size}")
    dev = resolve_device(device)
    run_dir = Path(run_dir)
    checkpoint_file = open_run_dir(run_dir, resume=resume)
    train_set = AdeSegmentation(data, "training", train=True, image_size=image_size, num_classes=num_classes,
                                seed=seed, max_images=max_images)
    val_set = AdeSegmentation(data, "validation", train=False, image_size=image_size, num_classes=num_classes,
                              max_images=max_images)
    if len(train_set) < batch_size:
        raise ValueError(f"{data}: {len(train_set)} training images, fewer than one batch of {batch_size}")
    vit = load_backbone(checkpoint, model=model, **{"dynamic_img_size": True, "drop_path_rate": drop_path,
                                                     **timm_kwargs})
    with seeded_rngs(derive_seed(seed, INIT_KEY)):  # head initialisation keyed, global RNG untouched
        net = Segmenter(vit=vit, num_classes=num_classes, channels=channels, aux_weight=aux_weight).to(dev)
    settings = {
        "protocol": "UperNet (+FCN aux) on a ViTDet simple feature pyramid; slide inference; "
                    "mIoU (torchmetrics macro Jaccard, ignore 255) and aAcc",
        "model": model, "timm_kwargs": timm_kwargs, "checkpoint_sha256": checkpoint_digest(Path(checkpoint)),
        "data": str(data), "iters": iters, "image_size": image_size, "batch_size": batch_size, "lr": lr,
        "weight_decay": weight_decay, "layer_decay": layer_decay, "drop_path": drop_path, "warmup_iters": warmup,
        "channels": channels, "aux_weight": aux_weight, "num_classes": num_classes, "max_images": max_images,
        "seed": seed, "train_images": len(train_set), "val_images": len(val_set),
        "test": f"resize into ({4 * image_size}, {image_size}), slide {image_size} stride {image_size * 2 // 3}",
    }
    optimizer = torch.optim.AdamW(param_groups(net, weight_decay=weight_decay, layer_decay=layer_decay), lr=lr,
                                  betas=(0.9, 0.999))
    start = 0
    if resume:
        start = load_checkpoint(checkpoint_file, model=net, optimizer=optimizer, settings=settings)["iter"]
        print(f"resumed from {checkpoint_file} after iteration {start}")
    _train(model=net, optimizer=optimizer, dataset=train_set, run_dir=run_dir, start=start, iters=iters,
           batch_size=batch_size, lr=lr, warmup=warmup, seed=seed, workers=num_workers, device=dev,
           settings=settings, checkpoint_every=checkpoint_every)
    metrics = evaluate(model=net, dataset=val_set, device=dev, workers=num_workers)
    return metrics, {**settings, "device": str(dev), "run_dir": str(run_dir)}


def _train(*, model: Segmenter, optimizer: torch.optim.Optimizer, dataset: AdeSegmentation, run_dir: Path,
           start: int, iters: int, batch_size: int, lr: float, warmup: int, seed: int, workers: int,
           device: torch.device, settings: dict[str, Any], checkpoint_every: int, log_every: int = 50) -> None:
    """Iterations ``start..iters-1`` over epochs of whole batches (the epoch and position follow from the
    iteration, so a resumed run sees the same batches)."""
    steps_per_epoch = len(dataset) // batch_size
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    bar = progress_bar(total=iters, initial=start, desc="train", unit="iter")
    step, sums = start, {}
    while step < iters:
        epoch, skip = divmod(step, steps_per_epoch)
        dataset.set_epoch(epoch)
        order = epoch_order(seed=seed, epoch=epoch, size=len(dataset))[skip * batch_size:steps_per_epoch * batch_size]
        loader = ordered_loader(dataset, order=order, batch_size=batch_size, workers=workers, drop_last=True,
                                pin_memory=device.type == "cuda")
        model.train()
        for images, labels in loader:
            set_lr(optimizer, lr_at(step, total=iters, lr=lr, warmup=warmup))
            with seeded_rngs(derive_seed(seed, step, STEP_KEY), cuda_devices=[device]):
                with amp:
                    parts = model.losses(images.to(device, non_blocking=True), labels.to(device, non_blocking=True))
                check_finite(parts["loss"], step=step, parts=parts)  # one host sync per step, read by the bar too
                optimizer.zero_grad(set_to_none=True)
                parts["loss"].backward()
            optimizer.step()
            step += 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{float(parts['loss'].detach()):.3f}")
            if step % log_every == 0 or step == iters:
                with open(run_dir / "log.jsonl", "a") as log:
                    n = (step - 1) % log_every + 1
                    log.write(json.dumps({"iter": step, "lr": lr_at(step - 1, total=iters, lr=lr, warmup=warmup),
                                          **{k: v / n for k, v in sums.items()}}) + "\n")
                sums = {}
            if step % checkpoint_every == 0 or step == iters:
                save_checkpoint(run_dir / "checkpoint.pt", model=model, optimizer=optimizer,
                                progress={"iter": step}, settings=settings)
            if step >= iters:
                break
    bar.close()
