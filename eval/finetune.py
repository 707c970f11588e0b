"""End-to-end fine-tuning (the MAE/DeiT recipe) of a backbone checkpoint.

Defaults (MAE fine-tune recipe, He et al. 2022, appendix A.1, which follows DeiT;
values that MAE gives only for ViT-B/L/H are marked as our ViT-Tiny choice):
AdamW betas (0.9, 0.999), weight decay 0.05, base lr 5e-4 with lr = blr * batch / 256,
batch 1024, 100 epochs (choice for ViT-Tiny; DeiT trains 300 from scratch), 5 warm-up
epochs then half-cycle cosine to 1e-6, layer-wise lr decay 0.75 (choice: MAE uses 0.65
for ViT-B, 0.75 for ViT-L/H), drop path 0.1, RandAugment rand-m9-mstd0.5-inc1,
random erasing 0.25, mixup 0.8 + cutmix 1.0 (switch prob 0.5), label smoothing 0.1
(inside the mixed soft targets, SoftTargetCrossEntropy), CLS-token head (choice: MAE
uses global average pooling for ViT-B; pooling the CLS keeps the checkpoint's
``norm`` layer, so the backbone loads strictly) initialised trunc-normal std 2e-5.
Eval: resize size/0.875, center crop, top-1/top-5.

Every random draw is keyed: the sample order by (seed, epoch), each image's
augmentation by (seed, epoch, index), mixup/cutmix and drop path by
(seed, epoch, micro-step). A checkpoint is written after every epoch
(``run_dir/last.pt``, atomically) and ``resume=True`` continues from it; on the CPU a
resumed run ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from store.progress import progress_bar

__all__ = ["build_classifier", "evaluate_classifier", "run_finetune"]


def build_classifier(*, checkpoint: Path, model: str, timm_kwargs: dict[str, Any],
                     num_classes: int, drop_path: float, seed: int) -> nn.Module:
    """Backbone loaded strictly from ``checkpoint`` plus a fresh linear head on the CLS
    token (weight trunc-normal std 2e-5, bias 0), drop path ``drop_path``."""
    from eval.common import load_backbone

    if "drop_path_rate" in timm_kwargs:
        raise ValueError("fine-tune: set drop path with drop_path (--drop-path), "
                         "not as a model argument")
    net = load_backbone(checkpoint, model=model, drop_path_rate=drop_path, **timm_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net.reset_classifier(num_classes)
        nn.init.trunc_normal_(net.head.weight, std=2e-5)
        nn.init.zeros_(net.head.bias)
    return net


@torch.no_grad()
def evaluate_classifier(net: nn.Module, loader, *, device: torch.device,
                        desc: str = "eval") -> dict[str, float]:
    """Top-1/top-5 percent of ``net`` (images (B, 3, H, W) -> logits (B, C)) over loader."""
    net.eval()
    hits = torch.zeros(2, dtype=torch.float64)
    total = 0
    for images, target in progress_bar(loader, desc=desc, unit="batch", leave=False):
        target = torch.as_tensor(target).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = net(images.to(device, non_blocking=True))
        top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == target[:, None]
        hits[0] += hit[:, :1].any(dim=1).sum().item()
        hits[1] += hit.any(dim=1).sum().item()
        total += len(target)
    if total == 0:
        raise ValueError(f"{desc}: the loader yielded no images")
    return {"top1": 100.0 * hits[0].item() / total, "top5": 100.0 * hits[1].item() / total}


def run_finetune(*, checkpoint: Path, model: str, timm_kwargs: dict[str, Any], train: Path,
                 val: Path, run_dir: Path, device: str = "auto", epochs: int = 100,
                 warmup_epochs: float = 5, batch_size: int = 1024, accum_iter: int = 1,
                 blr: float = 5e-4, lr: float | None = None, min_lr: float = 1e-6,
                 weight_decay: float = 0.05, layer_decay: float = 0.75,
                 drop_path: float = 0.1, smoothing: float = 0.1, mixup: float = 0.8,
                 cutmix: float = 1.0, mixup_switch_prob: float = 0.5,
                 auto_augment: str = "rand-m9-mstd0.5-inc1", reprob: float = 0.25,
                 eval_every: int = 1, seed: int = 0, num_workers: int = 8,
                 resume: bool = False) -> tuple[dict, dict]:
    """Fine-tune and evaluate. Returns (metrics, settings) for ``write_result``."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import param_groups_layer_decay

    from eval.common import (check_resume_settings, checkpoint_digest, cosine_lr,
                             input_size_of, resolve_device, save_atomic)
    from eval.data import (CROP_PCT, EvalImages, derive_seed, eval_transform,
                           finetune_transform, make_loader, seeded_rngs)

    run_dir = Path(run_dir)
    last = run_dir / "last.pt"
    if resume and not last.exists():
        raise FileNotFoundError(f"--resume: {run_dir} holds no last.pt to resume from")
    if not resume and last.exists():
        raise FileExistsError(f"{last} exists: pass --resume to continue that run or choose "
                              f"another --run-dir")
    dev = resolve_device(device)
    if batch_size % accum_iter:
        raise ValueError(f"fine-tune: --batch-size {batch_size} is not a multiple of "
                         f"--accum-iter {accum_iter}")
    micro = batch_size // accum_iter
    use_mix = mixup > 0 or cutmix > 0
    if use_mix and micro % 2:
        raise ValueError(f"fine-tune: mixup/cutmix needs an even micro-batch, got {micro} "
                         f"(--batch-size / --accum-iter)")
    train_set = EvalImages(train, seed=seed)
    net = build_classifier(checkpoint=checkpoint, model=model, timm_kwargs=timm_kwargs,
                           num_classes=len(train_set.classes), drop_path=drop_path, seed=seed)
    size = input_size_of(net)
    train_set.transform = finetune_transform(size, auto_augment=auto_augment, re_prob=reprob)
    val_set = EvalImages(val, transform=eval_transform(size), classes=train_set.classes)
    steps = (len(train_set) // micro) // accum_iter
    if steps == 0:
        raise ValueError(f"fine-tune: --batch-size {batch_size} is larger than the train set "
                         f"({len(train_set)} images in {train})")
    abs_lr = lr if lr is not None else blr * batch_size / 256
    num_classes = len(train_set.classes)
    settings = {
        "protocol": "end-to-end fine-tuning, MAE/DeiT recipe, CLS-token linear head",
        "model": model, "timm_kwargs": timm_kwargs, "input_size": size,
        "checkpoint_sha256": checkpoint_digest(Path(checkpoint)),
        "epochs": epochs, "warmup_epochs": warmup_epochs, "batch_size": batch_size,
        "accum_iter": accum_iter, "blr": blr, "lr": abs_lr, "min_lr": min_lr,
        "optimizer": "AdamW betas (0.9, 0.999)", "weight_decay": weight_decay,
        "layer_decay": layer_decay, "drop_path": drop_path, "label_smoothing": smoothing,
        "mixup": mixup, "cutmix": cutmix, "mixup_switch_prob": mixup_switch_prob,
        "auto_augment": auto_augment, "reprob": reprob, "seed": seed,
        "schedule": "per-step linear warm-up + half-cycle cosine",
        "val_transform": f"resize {round(size / CROP_PCT)} bicubic, center crop {size}",
        "train": str(train), "val": str(val), "train_images": len(train_set),
        "val_images": len(val_set), "num_classes": num_classes, "steps_per_epoch": steps,
    }

    net = net.to(dev)
    groups = param_groups_layer_decay(net, weight_decay=weight_decay, layer_decay=layer_decay,
                                      no_weight_decay_list=net.no_weight_decay())
    opt = torch.optim.AdamW(groups, lr=abs_lr, betas=(0.9, 0.999))
    mixer = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=1.0,
                  switch_prob=mixup_switch_prob, mode="batch", label_smoothing=smoothing,
                  num_classes=num_classes) if use_mix else None
    if mixer is not None:
        criterion = SoftTargetCrossEntropy()
    elif smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=smoothing)
    else:
        criterion = nn.CrossEntropyLoss()

    start, history = 0, []
    if resume:
        state = torch.load(last, map_location=dev, weights_only=True)
        check_resume_settings(json.loads(state["settings"]), settings, where=last)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, history = int(state["epoch"]), json.loads(state["history"])

    val_loader = make_loader(val_set, batch_size=micro, shuffle=False, num_workers=num_workers,
                             pin_memory=dev.type == "cuda")
    cuda = [dev] if dev.type == "cuda" else []
    bar = progress_bar(total=epochs * steps, initial=start * steps, desc="fine-tune", unit="step")
    for epoch in range(start, epochs):
        net.train()
        loader = make_loader(train_set, batch_size=micro, shuffle=True, seed=seed, epoch=epoch,
                             num_workers=num_workers, drop_last=True,
                             pin_memory=dev.type == "cuda")
        loss_sum = torch.zeros((), device=dev)
        opt.zero_grad(set_to_none=True)
        for it, (images, target) in enumerate(loader):
            if it >= steps * accum_iter:
                break
            step = epoch * steps + it // accum_iter
            if it % accum_iter == 0:
                step_lr = cosine_lr(step, steps_per_epoch=steps, epochs=epochs,
                                    warmup_epochs=warmup_epochs, base_lr=abs_lr, min_lr=min_lr)
                for group in opt.param_groups:
                    group["lr"] = step_lr * group.get("lr_scale", 1.0)
            images = images.to(dev, non_blocking=True)
            target = torch.as_tensor(target).to(dev, non_blocking=True)
            with seeded_rngs(derive_seed(seed, epoch, it, 0xF7), cuda_devices=cuda):
                if mixer is not None:
                    images, target = mixer(images, target)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                    loss = criterion(net(images), target)
                (loss / accum_iter).backward()
            loss_sum += loss.detach()
            if (it + 1) % accum_iter == 0:
                opt.step()
                opt.zero_grad(set_to_none=True)
                bar.update(1)
        mean_loss = float(loss_sum) / (steps * accum_iter)  # host sync once per epoch
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"fine-tune: non-finite loss in epoch {epoch} "
                                     f"(steps {epoch * steps}..{(epoch + 1) * steps - 1})")
        record = {"epoch": epoch + 1, "loss": mean_loss}
        if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
            record.update(evaluate_classifier(net, val_loader, device=dev, desc="val"))
            bar.set_postfix(loss=f"{mean_loss:.3f}", top1=f"{record['top1']:.2f}")
        history.append(record)
        save_atomic({"model": net.state_dict(), "optimizer": opt.state_dict(),
                     "epoch": epoch + 1, "settings": json.dumps(settings, default=str),
                     "history": json.dumps(history)}, last)
        with open(run_dir / "log.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")
    bar.close()
    if history and "top1" in history[-1]:
        final = {"top1": history[-1]["top1"], "top5": history[-1]["top5"]}
    else:
        final = evaluate_classifier(net, val_loader, device=dev, desc="val")
    best = max([h["top1"] for h in history if "top1" in h] + [final["top1"]])
    return {**final, "best_top1": best}, settings
