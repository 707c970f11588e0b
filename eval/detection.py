"""COCO detection and instance segmentation: Mask R-CNN (torchvision) on a ViTDet simple feature
pyramid, ViTDet's recipe, box and mask AP (docs/eval.md, "Detection")."""
from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from core.optim import lr_at as schedule_lr
from eval.coco import CocoInstances, collate, evaluate, to_results, write_results
from core.keys import derive_seed
from eval.data import seeded_rngs
from eval.config import DetectionConfig
from eval.dense_train import backward_step, check_finite, epoch_order, optimizer_for, ordered_loader, scaler_for, set_lr
from eval.pyramid import SimpleFeaturePyramid
from data.decode import MEAN, STD
from core.precision import autocast, autocast_dtype
from core.progress import progress_bar

ANCHOR_SIZES = (32, 64, 128, 256, 512)
LR_STEPS = (0.889, 0.963)
INIT_KEY, STEP_KEY = 0x1417, 0x57E9
CHECKPOINT = "checkpoint.pt"


class SquarePadTransform(GeneralizedRCNNTransform):
    """Normalise; at test time resize the longer side to ``image_size`` (training images come
    already jittered from the dataset); pad every batch to at least image_size x image_size."""

    def __init__(self, *, image_size: int):
        super().__init__(min_size=image_size, max_size=image_size, image_mean=list(MEAN),
                         image_std=list(STD), size_divisible=32)
        self.image_size = image_size

    def resize(self, image, target=None):
        """image (3, h, w) float -> resized (eval) or unchanged (training), with its target."""
        if self.training:
            return image, target
        return super().resize(image, target)

    def batch_images(self, images, size_divisible: int = 32):
        """images: list of (3, h_i, w_i) -> (B, 3, S, S), S >= image_size, a multiple of 32, zero-padded."""
        side = max(self.image_size, *(max(img.shape[-2:]) for img in images))
        side = int(math.ceil(side / size_divisible) * size_divisible)
        batch = images[0].new_zeros((len(images), 3, side, side))
        for i, img in enumerate(images):
            batch[i, :, :img.shape[1], :img.shape[2]].copy_(img)
        return batch


HEADS = ("vitdet", "light")


def build_mask_rcnn(*, vit: nn.Module, num_classes: int, image_size: int, heads: str = "vitdet",
                    roi_batch: int = 512) -> nn.Module:
    """torchvision MaskRCNN on ``SimpleFeaturePyramid(vit)``.

    num_classes: object classes K (background is added). heads: ``vitdet`` (two-conv RPN
    head, 4-conv + 1-fc box head and 4-conv mask head, LayerNorm) or ``light`` (torchvision's
    Mask R-CNN v1 heads: one-conv RPN head, 2-fc box head, 4-conv mask head without norm;
    about 8x cheaper box head, for CPU runs). roi_batch: sampled RoIs per image in training.
    Forward as torchvision's: training ``model(images, targets) -> dict of losses``; eval
    ``model(images) -> list of dicts`` with boxes (n, 4), labels (n,), scores (n,),
    masks (n, 1, H, W) at each input's size.
    """
    from timm.layers import LayerNorm2d
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops import MultiScaleRoIAlign

    if image_size % 32:
        raise ValueError(f"detection image size must be a multiple of 32, got {image_size}")
    if heads not in HEADS:
        raise ValueError(f"heads must be one of {HEADS}, got {heads!r}")
    backbone = SimpleFeaturePyramid(vit=vit, out_channels=256, pool_level=True)
    anchors = AnchorGenerator(sizes=tuple((s,) for s in ANCHOR_SIZES), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    per_location = anchors.num_anchors_per_location()[0]
    if heads == "vitdet":
        rpn_head = RPNHead(256, per_location, conv_depth=2)
        box_head = FastRCNNConvFCHead((256, 7, 7), [256] * 4, [1024], norm_layer=LayerNorm2d)
        mask_head = MaskRCNNHeads(256, [256] * 4, 1, norm_layer=LayerNorm2d)
    else:
        rpn_head = RPNHead(256, per_location, conv_depth=1)
        box_head = TwoMLPHead(256 * 7 * 7, 1024)
        mask_head = MaskRCNNHeads(256, [256] * 4, 1)
    levels = ["0", "1", "2", "3"]
    model = MaskRCNN(
        backbone, num_classes=num_classes + 1, min_size=image_size, max_size=image_size,
        rpn_anchor_generator=anchors, rpn_head=rpn_head,
        rpn_post_nms_top_n_train=1000, rpn_post_nms_top_n_test=1000,
        box_roi_pool=MultiScaleRoIAlign(featmap_names=levels, output_size=7, sampling_ratio=0),
        box_head=box_head, box_batch_size_per_image=roi_batch,
        mask_roi_pool=MultiScaleRoIAlign(featmap_names=levels, output_size=14, sampling_ratio=0),  # not a teacher fact
        mask_head=mask_head,
    )
    model.transform = SquarePadTransform(image_size=image_size)
    return model


def _to_device(images, targets, device):
    return [im.to(device, non_blocking=True) for im in images], [
        {k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]


@torch.no_grad()
def predict(*, model: nn.Module, dataset: CocoInstances, batch_size: int, workers: int,
            device: torch.device, amp: torch.dtype | None = None) -> tuple[list[dict], list[dict]]:
    """Run ``model`` over ``dataset`` (train=False) under autocast ``amp`` (None: fp32) -> (bbox
    results, segm results), COCO format."""
    model.eval()
    loader = ordered_loader(dataset, order=list(range(len(dataset))), batch_size=batch_size, workers=workers,
                            collate_fn=collate)
    bbox, segm = [], []
    for images, targets in progress_bar(loader, desc="detect", unit="batch"):
        with autocast(device, amp):
            outputs = model([im.to(device) for im in images])
        for target, output in zip(targets, outputs):
            b, s = to_results(image_id=int(target["image_id"]), prediction=output,
                              label_to_category=dataset.label_to_category)
            bbox += b
            segm += s
    return bbox, segm


def lr_at(step: int, *, total: int, lr: float, warmup: int) -> float:
    """Step schedule (``core.optim``): linear warm-up from lr / warmup, then x0.1 at 88.9% and
    96.3% of ``total`` steps."""
    return schedule_lr(step, total_steps=total, warmup_steps=warmup, peak=lr, kind="step", drops=LR_STEPS)


def run_detection(cfg: DetectionConfig, *, out: Path, device: str = "auto", resume: bool = False
                  ) -> tuple[dict[str, float], dict[str, Any]]:
    """The whole protocol (``cfg``: eval/config.py): train Mask R-CNN on ``cfg.data``'s train split,
    evaluate on its val split.

    Returns (metrics, settings) for ``write_result``: box_/mask_ AP, AP50, AP75, APs, APm,
    APl in percent (COCOeval). Writes to the run folder ``out`` (``core.run``): checkpoint.pt
    (after every epoch; ``resume`` continues from it and refuses one made with other settings),
    metrics.jsonl (one row per epoch), config.yaml, and bbox_results.json / segm_results.json
    (COCO result format, val). ``max_images`` keeps the first N images (by id) of each split;
    ``scale_range`` is the LSJ range of the training resize (relative to ``image_size``).
    """
    from core.run import open_run
    from eval.common import checkpoint_digest, load_backbone, resolve_device

    digest = checkpoint_digest(Path(cfg.checkpoint))
    with open_run(out, config=cfg, resume=resume, movable=cfg.movable, checkpoint=CHECKPOINT,
                  compare={"checkpoint_sha256": digest}) as run:
        dev = resolve_device(device)
        train_set = CocoInstances(cfg.data, "train", train=True, image_size=cfg.image_size, seed=cfg.seed,
                                  max_images=cfg.max_images, scale_range=tuple(cfg.scale_range))
        val_set = CocoInstances(cfg.data, "val", train=False, image_size=cfg.image_size, max_images=cfg.max_images)
        if val_set.category_ids != train_set.category_ids:
            raise ValueError(f"{val_set.ann_file} and {train_set.ann_file} list different categories")
        vit = load_backbone(cfg.checkpoint, model=cfg.model, **{"dynamic_img_size": True,
                                                                 "drop_path_rate": cfg.drop_path, **cfg.timm_kwargs})
        with seeded_rngs(derive_seed(cfg.seed, INIT_KEY)):  # head initialisation keyed, global RNG untouched
            net = build_mask_rcnn(vit=vit, num_classes=len(train_set.category_ids), image_size=cfg.image_size,
                                  heads=cfg.heads, roi_batch=cfg.roi_batch).to(dev)
        settings = {
            "protocol": "Mask R-CNN on a ViTDet simple feature pyramid (strides 4-32 + pool), LSJ train, "
                        "COCOeval bbox/segm",
            "model": cfg.model, "timm_kwargs": cfg.timm_kwargs, "checkpoint_sha256": digest,
            "data": str(cfg.data), "epochs": cfg.epochs, "image_size": cfg.image_size, "batch_size": cfg.batch_size,
            "lr": cfg.lr, "weight_decay": cfg.weight_decay, "layer_decay": cfg.layer_decay,
            "drop_path": cfg.drop_path, "warmup_steps": cfg.warmup, "lr_steps": list(LR_STEPS), "heads": cfg.heads,
            "roi_batch": cfg.roi_batch, "max_images": cfg.max_images, "seed": cfg.seed,
            "lsj_scale": list(train_set.scale_range), "train_images": len(train_set),
            "val_images": len(val_set), "num_classes": len(train_set.category_ids),
        }
        optimizer, start_epoch = optimizer_for(run, net, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                               layer_decay=cfg.layer_decay, unit="epoch")
        _train(cfg, model=net, optimizer=optimizer, dataset=train_set, run=run, start_epoch=start_epoch, device=dev)
        bbox, segm = predict(model=net, dataset=val_set, batch_size=min(cfg.batch_size, 8), workers=cfg.workers,
                             device=dev, amp=autocast_dtype(cfg.amp, dev))
    write_results(Path(out) / "bbox_results.json", bbox)
    write_results(Path(out) / "segm_results.json", segm)
    metrics: dict[str, float] = OrderedDict()
    for prefix, iou_type, results in (("box", "bbox", bbox), ("mask", "segm", segm)):
        scores = evaluate(val_set.coco, results, iou_type=iou_type, image_ids=val_set.image_ids)
        metrics.update({f"{prefix}_{k}": v for k, v in scores.items()})
    return metrics, {**settings, "device": str(dev), "run_dir": str(out)}


def _train(cfg: DetectionConfig, *, model: nn.Module, optimizer: torch.optim.Optimizer, dataset: CocoInstances,
           run, start_epoch: int, device: torch.device) -> None:
    """Epochs ``start_epoch..cfg.epochs-1``; one metrics row and a checkpoint after each."""
    from core.run import StepMetrics

    steps_per_epoch = math.ceil(len(dataset) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    amp = autocast_dtype(cfg.amp, device)
    scaler = scaler_for(run, amp, device)
    lr = lambda step: lr_at(step, total=total, lr=cfg.lr, warmup=cfg.warmup)  # noqa: E731
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        dataset.set_epoch(epoch)
        loader = ordered_loader(dataset, order=epoch_order(seed=cfg.seed, epoch=epoch, size=len(dataset)),
                                batch_size=cfg.batch_size, workers=cfg.workers, collate_fn=collate,
                                pin_memory=device.type == "cuda")
        bar = progress_bar(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch")
        sums = StepMetrics(device)
        for i, (images, targets) in enumerate(bar):
            step = epoch * steps_per_epoch + i
            set_lr(optimizer, lr(step))
            images, targets = _to_device(images, targets, device)
            with seeded_rngs(derive_seed(cfg.seed, step, STEP_KEY), cuda_devices=[device]):
                with autocast(device, amp):
                    parts = model(images, targets)
                loss = sum(parts.values())
                check_finite(loss, step=step, parts=parts)  # one host sync per step (the progress bar reads it)
                optimizer.zero_grad(set_to_none=True)
                backward_step(loss, optimizer, scaler)
            sums.add(step, {"loss": loss, **parts})
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        end = (epoch + 1) * steps_per_epoch
        run.log({"step": end, "epoch": epoch + 1, "lr_end": lr(step), **sums.reduce()})  # before the checkpoint
        run.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "progress": {"epoch": epoch + 1},
                  "step": end, **({"scaler": scaler.state_dict()} if scaler is not None else {})})
