"""ADE20K semantic segmentation: UperNet on the ViTDet simple feature pyramid, the BEiT/MAE recipe,
sliding-window test, mIoU and pixel accuracy (docs/eval.md, "Segmentation")."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from eval.ade import IGNORE, AdeSegmentation
from core.keys import derive_seed
from eval.data import seeded_rngs
from eval.config import SegmentationConfig
from eval.dense_train import (backward_step, check_finite, epoch_order, optimizer_for, ordered_loader, scaler_for,
                              set_lr, warmup_factor)
from eval.pyramid import SimpleFeaturePyramid
from eval.upernet import FCNHead, UperHead
from core.precision import autocast, autocast_dtype
from core.progress import progress_bar

INIT_KEY, STEP_KEY = 0x1417, 0x57E9
CHECKPOINT = "checkpoint.pt"


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
    """mIoU and pixel accuracy over a split, accumulated over the whole split; the convention:
    docs/eval.md, "Segmentation" (Metrics)."""

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


def evaluate(*, model: nn.Module, dataset: AdeSegmentation, device: torch.device, workers: int,
             amp: torch.dtype | None = None) -> dict[str, float]:
    """Slide inference over ``dataset`` (train=False) under autocast ``amp`` (None: fp32), prediction
    at the label's size -> mIoU, aAcc."""
    model.eval()
    size = dataset.image_size
    metrics = SegmentationMetrics(num_classes=dataset.num_classes, device=device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                                         generator=torch.Generator().manual_seed(0))
    for image, label in progress_bar(loader, desc="segment", unit="image"):
        with autocast(device, amp):
            logits = slide_logits(model, image.to(device), crop=size, stride=size * 2 // 3,
                                  num_classes=dataset.num_classes)
        logits = F.interpolate(logits[None], size=label.shape, mode="bilinear", align_corners=False)[0]
        metrics.update(logits.argmax(0), label.to(device))
    return metrics.compute()


def lr_at(step: int, *, total: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then poly decay (power 1) from ``lr`` to 0 at ``total``."""
    return lr * warmup_factor(step, warmup) * max(0.0, 1 - step / total)


def run_segmentation(cfg: SegmentationConfig, *, out: Path, device: str = "auto", resume: bool = False
                     ) -> tuple[dict[str, float], dict[str, Any]]:
    """The whole protocol (``cfg``: eval/config.py): train on ``cfg.data``'s training split, evaluate on
    its validation split.

    Returns (metrics, settings) for ``write_result``: mIoU and aAcc in percent. Writes to the run
    folder ``out`` (``core.run``): checkpoint.pt (every ``checkpoint_every`` iterations and at the
    end; ``resume`` continues from it exactly, refusing one made with other settings), metrics.jsonl
    (every 50 iterations) and config.yaml. ``max_images`` keeps the first N images (by name) of each split.
    """
    from core.run import open_run
    from eval.common import checkpoint_digest, load_backbone, resolve_device

    digest = checkpoint_digest(Path(cfg.checkpoint))
    with open_run(out, config=cfg, resume=resume, movable=cfg.movable, checkpoint=CHECKPOINT,
                  compare={"checkpoint_sha256": digest}) as run:
        dev = resolve_device(device)
        train_set = AdeSegmentation(cfg.data, "training", train=True, image_size=cfg.image_size,
                                    num_classes=cfg.num_classes, seed=cfg.seed, max_images=cfg.max_images)
        val_set = AdeSegmentation(cfg.data, "validation", train=False, image_size=cfg.image_size,
                                  num_classes=cfg.num_classes, max_images=cfg.max_images)
        if len(train_set) < cfg.batch_size:
            raise ValueError(f"{cfg.data}: {len(train_set)} training images, fewer than one batch of "
                             f"{cfg.batch_size}")
        vit = load_backbone(cfg.checkpoint, model=cfg.model, **{"dynamic_img_size": True,
                                                                 "drop_path_rate": cfg.drop_path, **cfg.timm_kwargs})
        with seeded_rngs(derive_seed(cfg.seed, INIT_KEY)):  # head initialisation keyed, global RNG untouched
            net = Segmenter(vit=vit, num_classes=cfg.num_classes, channels=cfg.channels,
                            aux_weight=cfg.aux_weight).to(dev)
        size = cfg.image_size
        settings = {
            "protocol": "UperNet (+FCN aux) on a ViTDet simple feature pyramid; slide inference; "
                        "mIoU (torchmetrics macro Jaccard, ignore 255) and aAcc",
            "model": cfg.model, "timm_kwargs": cfg.timm_kwargs, "checkpoint_sha256": digest,
            "data": str(cfg.data), "iters": cfg.iters, "image_size": size, "batch_size": cfg.batch_size,
            "lr": cfg.lr, "weight_decay": cfg.weight_decay, "layer_decay": cfg.layer_decay,
            "drop_path": cfg.drop_path, "warmup_iters": cfg.warmup, "channels": cfg.channels,
            "aux_weight": cfg.aux_weight, "num_classes": cfg.num_classes, "max_images": cfg.max_images,
            "seed": cfg.seed, "train_images": len(train_set), "val_images": len(val_set),
            "test": f"resize into ({4 * size}, {size}), slide {size} stride {size * 2 // 3}",
        }
        optimizer, start = optimizer_for(run, net, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                         layer_decay=cfg.layer_decay, unit="iter")
        _train(cfg, model=net, optimizer=optimizer, dataset=train_set, run=run, start=start, device=dev)
        metrics = evaluate(model=net, dataset=val_set, device=dev, workers=cfg.workers,
                           amp=autocast_dtype(cfg.amp, dev))
    return metrics, {**settings, "device": str(dev), "run_dir": str(out)}


def _train(cfg: SegmentationConfig, *, model: Segmenter, optimizer: torch.optim.Optimizer,
           dataset: AdeSegmentation, run, start: int, device: torch.device, log_every: int = 50) -> None:
    """Iterations ``start..cfg.iters-1`` over epochs of whole batches (the epoch and position follow from
    the iteration, so a resumed run sees the same batches). A metrics row holds the means since the
    previous row (after a resume: since the resumed iteration)."""
    from core.run import StepMetrics

    steps_per_epoch = len(dataset) // cfg.batch_size
    amp = autocast_dtype(cfg.amp, device)
    scaler = scaler_for(run, amp, device)
    lr = lambda step: lr_at(step, total=cfg.iters, lr=cfg.lr, warmup=cfg.warmup)  # noqa: E731
    bar = progress_bar(total=cfg.iters, initial=start, desc="train", unit="iter")
    step, sums = start, StepMetrics(device)
    while step < cfg.iters:
        epoch, skip = divmod(step, steps_per_epoch)
        dataset.set_epoch(epoch)
        order = epoch_order(seed=cfg.seed, epoch=epoch, size=len(dataset))[
            skip * cfg.batch_size:steps_per_epoch * cfg.batch_size]
        loader = ordered_loader(dataset, order=order, batch_size=cfg.batch_size, workers=cfg.workers,
                                drop_last=True, pin_memory=device.type == "cuda")
        model.train()
        for images, labels in loader:
            set_lr(optimizer, lr(step))
            with seeded_rngs(derive_seed(cfg.seed, step, STEP_KEY), cuda_devices=[device]):
                with autocast(device, amp):
                    parts = model.losses(images.to(device, non_blocking=True), labels.to(device, non_blocking=True))
                check_finite(parts["loss"], step=step, parts=parts)  # one host sync per step, read by the bar too
                optimizer.zero_grad(set_to_none=True)
                backward_step(parts["loss"], optimizer, scaler)
            sums.add(step, parts)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(parts['loss'].detach()):.3f}")
            if step % log_every == 0 or step == cfg.iters:   # before the checkpoint: a resume trims it
                run.log({"step": step, "iter": step, "lr": lr(step - 1), **sums.reduce()})
            if step % cfg.checkpoint_every == 0 or step == cfg.iters:
                run.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "progress": {"iter": step}, "step": step,
                          **({"scaler": scaler.state_dict()} if scaler is not None else {})})
            if step >= cfg.iters:
                break
    bar.close()
