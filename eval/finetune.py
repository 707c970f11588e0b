"""End-to-end fine-tuning of a backbone checkpoint with the MAE/DeiT recipe, every draw keyed, one
checkpoint per epoch in the run folder and an exact resume (docs/eval.md, "Fine-tuning")."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from eval.config import FinetuneConfig
from core.precision import autocast, autocast_dtype, grad_scaler
from core.progress import progress_bar

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
def evaluate_classifier(net: nn.Module, loader, *, device: torch.device, amp: torch.dtype | None = None,
                        desc: str = "eval") -> dict[str, float]:
    """Top-1/top-5 percent of ``net`` (images (B, 3, H, W) -> logits (B, C)) over loader, under
    autocast ``amp`` (None: fp32)."""
    net.eval()
    hits = torch.zeros(2, dtype=torch.float64)
    total = 0
    for images, target in progress_bar(loader, desc=desc, unit="batch", leave=False):
        target = torch.as_tensor(target).to(device)
        with autocast(device, amp):
            logits = net(images.to(device, non_blocking=True))
        top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == target[:, None]
        hits[0] += hit[:, :1].any(dim=1).sum().item()
        hits[1] += hit.any(dim=1).sum().item()
        total += len(target)
    if total == 0:
        raise ValueError(f"{desc}: the loader yielded no images")
    return {"top1": 100.0 * hits[0].item() / total, "top5": 100.0 * hits[1].item() / total}


def run_finetune(cfg: FinetuneConfig, *, out: Path, device: str = "auto",
                 resume: bool = False) -> tuple[dict, dict]:
    """Fine-tune and evaluate (``cfg``: eval/config.py) in the run folder ``out``.

    Returns (metrics, settings) for ``write_result``."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    from core.optim import param_groups
    from core.run import StepMetrics, open_run
    from eval.common import checkpoint_digest, cosine_lr, input_size_of, resolve_device
    from core.keys import derive_seed
    from eval.data import (CROP_PCT, EvalImages, eval_transform,
                           finetune_transform, make_loader, seeded_rngs)

    digest = checkpoint_digest(Path(cfg.checkpoint))
    with open_run(out, config=cfg, resume=resume, movable=cfg.movable,
                  compare={"checkpoint_sha256": digest}) as run:
        dev = resolve_device(device)
        micro = cfg.batch_size // cfg.accum_iter
        train_set = EvalImages(cfg.train, seed=cfg.seed, task="eval finetune")
        net = build_classifier(checkpoint=cfg.checkpoint, model=cfg.model, timm_kwargs=cfg.timm_kwargs,
                               num_classes=len(train_set.classes), drop_path=cfg.drop_path, seed=cfg.seed)
        size = input_size_of(net)
        train_set.transform = finetune_transform(size, auto_augment=cfg.auto_augment, re_prob=cfg.reprob)
        val_set = EvalImages(cfg.val, transform=eval_transform(size), classes=train_set.classes,
                             task="eval finetune")
        steps = (len(train_set) // micro) // cfg.accum_iter
        if steps == 0:
            raise ValueError(f"fine-tune: --batch-size {cfg.batch_size} is larger than the train set "
                             f"({len(train_set)} images in {cfg.train})")
        abs_lr = cfg.derived()["lr"]
        num_classes = len(train_set.classes)
        settings = {
            "protocol": "end-to-end fine-tuning, MAE/DeiT recipe, CLS-token linear head",
            "model": cfg.model, "timm_kwargs": cfg.timm_kwargs, "input_size": size,
            "checkpoint_sha256": digest, "epochs": cfg.epochs, "warmup_epochs": cfg.warmup_epochs,
            "batch_size": cfg.batch_size, "accum_iter": cfg.accum_iter, "blr": cfg.blr, "lr": abs_lr,
            "min_lr": cfg.min_lr, "optimizer": "AdamW betas (0.9, 0.999)", "weight_decay": cfg.weight_decay,
            "layer_decay": cfg.layer_decay, "drop_path": cfg.drop_path, "label_smoothing": cfg.smoothing,
            "mixup": cfg.mixup, "cutmix": cfg.cutmix, "mixup_switch_prob": cfg.mixup_switch_prob,
            "auto_augment": cfg.auto_augment, "reprob": cfg.reprob, "seed": cfg.seed,
            "schedule": "per-step linear warm-up + half-cycle cosine",
            "val_transform": f"resize {round(size / CROP_PCT)} bicubic, center crop {size}",
            "train": str(cfg.train), "val": str(cfg.val), "train_images": len(train_set),
            "val_images": len(val_set), "num_classes": num_classes, "steps_per_epoch": steps,
        }

        net = net.to(dev)
        opt = torch.optim.AdamW(param_groups(net, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay),
                                lr=abs_lr, betas=(0.9, 0.999))
        use_mix = cfg.mixup > 0 or cfg.cutmix > 0
        mixer = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=1.0, switch_prob=cfg.mixup_switch_prob,
                      mode="batch", label_smoothing=cfg.smoothing, num_classes=num_classes) if use_mix else None
        if mixer is not None:
            criterion = SoftTargetCrossEntropy()
        elif cfg.smoothing > 0:
            criterion = LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
        else:
            criterion = nn.CrossEntropyLoss()

        amp = autocast_dtype(cfg.amp, dev)
        scaler = grad_scaler(amp, dev)          # fp16's; in the checkpoint, so that a resume is exact
        start, history = 0, []
        if run.resumed:
            net.load_state_dict(run.state["model"])
            opt.load_state_dict(run.state["optimizer"])
            if scaler is not None and run.state.get("scaler"):
                scaler.load_state_dict(run.state["scaler"])
            start, history = int(run.state["epoch"]), list(run.state["history"])

        val_loader = make_loader(val_set, batch_size=micro, shuffle=False, num_workers=cfg.workers,
                                 pin_memory=dev.type == "cuda")
        cuda = [dev] if dev.type == "cuda" else []
        bar = progress_bar(total=cfg.epochs * steps, initial=start * steps, desc="fine-tune", unit="step")
        sums = StepMetrics(dev)
        for epoch in range(start, cfg.epochs):
            net.train()
            loader = make_loader(train_set, batch_size=micro, shuffle=True, seed=cfg.seed, epoch=epoch,
                                 num_workers=cfg.workers, drop_last=True, pin_memory=dev.type == "cuda")
            opt.zero_grad(set_to_none=True)
            for it, (images, target) in enumerate(loader):
                if it >= steps * cfg.accum_iter:
                    break
                step = epoch * steps + it // cfg.accum_iter
                if it % cfg.accum_iter == 0:
                    step_lr = cosine_lr(step, steps_per_epoch=steps, epochs=cfg.epochs,
                                        warmup_epochs=cfg.warmup_epochs, base_lr=abs_lr, min_lr=cfg.min_lr)
                    for group in opt.param_groups:
                        group["lr"] = step_lr * group.get("lr_scale", 1.0)
                images = images.to(dev, non_blocking=True)
                target = torch.as_tensor(target).to(dev, non_blocking=True)
                with seeded_rngs(derive_seed(cfg.seed, epoch, it, 0xF7), cuda_devices=cuda):
                    if mixer is not None:
                        images, target = mixer(images, target)
                    with autocast(dev, amp):
                        loss = criterion(net(images), target)
                    part = loss / cfg.accum_iter
                    (part if scaler is None else scaler.scale(part)).backward()
                sums.add(step, {"loss": loss})
                if (it + 1) % cfg.accum_iter == 0:
                    if scaler is None:
                        opt.step()
                    else:                       # skips a step whose gradients overflowed
                        scaler.step(opt)
                        scaler.update()
                    opt.zero_grad(set_to_none=True)
                    bar.update(1)
            bad = sums.first_non_finite()  # host sync once per epoch
            if bad is not None:
                raise FloatingPointError(f"fine-tune: non-finite loss at step {bad} (epoch {epoch})")
            mean_loss = sums.reduce()["loss"]  # over the epoch's micro-batches
            record = {"epoch": epoch + 1, "loss": mean_loss}
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                record.update(evaluate_classifier(net, val_loader, device=dev, amp=amp, desc="val"))
                bar.set_postfix(loss=f"{mean_loss:.3f}", top1=f"{record['top1']:.2f}")
            history.append(record)
            run.log({"step": (epoch + 1) * steps, **record})  # before the checkpoint: a resume trims it
            run.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                      "step": (epoch + 1) * steps, "history": history,
                      **({"scaler": scaler.state_dict()} if scaler is not None else {})})
        bar.close()
        if history and "top1" in history[-1]:
            final = {"top1": history[-1]["top1"], "top5": history[-1]["top5"]}
        else:
            final = evaluate_classifier(net, val_loader, device=dev, amp=amp, desc="val")
    best = max([h["top1"] for h in history if "top1" in h] + [final["top1"]])
    return {**final, "best_top1": best}, settings
