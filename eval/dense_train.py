"""Training plumbing shared by the dense evaluations (detection, segmentation).

Optimizer groups with layer-wise lr decay, a sample order keyed by (seed, epoch), loaders
that leave the global RNG alone (model init and each training step run inside
``eval.data.seeded_rngs`` keyed by (seed, step), so dropout, drop path and torchvision's
RoI sampling are keyed too),
checkpoints written atomically and refused on resume when the run's settings differ,
and a non-finite-loss stop that names the step.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from eval.common import check_resume_settings, save_atomic


def _vit_layer(name: str, depth: int) -> int:
    """Layer index of a ViT parameter for layer-wise lr decay: 0 embeddings, i+1 block i, depth+1 after."""
    if name.startswith(("cls_token", "reg_token", "pos_embed", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(model: nn.Module, *, weight_decay: float, layer_decay: float,
                 vit_prefix: str = "backbone.vit.") -> list[dict]:
    """AdamW parameter groups with layer-wise lr decay (BEiT/MAE/ViTDet recipe).

    Parameters under ``vit_prefix`` get ``lr_scale = layer_decay ** (depth + 1 - layer)``
    (embeddings most decayed, the last block ``layer_decay ** 1``); everything else
    (pyramid, heads, the ViT's final norm) has scale 1. Biases, norm weights (any 1-D
    tensor) and position/class tokens get no weight decay. Each group carries
    ``lr_scale``; ``set_lr`` sets ``lr = base_lr * lr_scale``.
    """
    vit_depth = None
    for name, module in model.named_modules():
        if name + "." == vit_prefix:
            vit_depth = len(module.blocks)
    if vit_depth is None:
        raise ValueError(f"param_groups: no ViT found at prefix {vit_prefix!r}")
    groups: dict[tuple[float, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith(vit_prefix):
            sub = name[len(vit_prefix):]
            scale = layer_decay ** (vit_depth + 1 - _vit_layer(sub, vit_depth))
            no_decay = param.ndim <= 1 or sub.startswith(("cls_token", "reg_token", "pos_embed"))
        else:
            scale, no_decay = 1.0, param.ndim <= 1
        decay = 0.0 if no_decay else weight_decay
        group = groups.setdefault((scale, decay), {"params": [], "lr_scale": scale, "weight_decay": decay})
        group["params"].append(param)
    return list(groups.values())


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr * group['lr_scale']``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def warmup_factor(step: int, warmup: int) -> float:
    """Linear warm-up from 1/warmup to 1 over ``warmup`` steps (1 afterwards)."""
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def epoch_order(*, seed: int, epoch: int, size: int) -> list[int]:
    """A permutation of range(size) keyed by (seed, epoch): the sample order of one epoch."""
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(size).tolist()


def ordered_loader(dataset: torch.utils.data.Dataset, *, order: list[int], batch_size: int, workers: int,
                   collate_fn=None, drop_last: bool = False, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over ``order`` (indices into ``dataset``) that never draws from the global RNG
    (its worker base seed comes from a private generator; our datasets key their own draws)."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=order, num_workers=workers,
                                       collate_fn=collate_fn, drop_last=drop_last, pin_memory=pin_memory,
                                       generator=torch.Generator().manual_seed(0))


def save_checkpoint(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, progress: Mapping[str, int],
                    settings: Mapping[str, Any]) -> None:
    """Write {model, optimizer, progress, settings} to ``path`` atomically (tmp + os.replace)."""
    save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "progress": dict(progress),
                 "settings": dict(settings)}, Path(path))


def load_checkpoint(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    settings: Mapping[str, Any], ignore: tuple[str, ...] = ()) -> dict[str, int]:
    """Restore model and optimizer from ``path``; returns its ``progress``.

    Refuses (ValueError naming every key) a checkpoint whose settings differ from
    ``settings`` (keys in ``ignore`` excepted).
    """
    state = torch.load(path, map_location="cpu", weights_only=False)
    check_resume_settings(state.get("settings", {}), settings, where=Path(path), ignore=ignore)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return dict(state["progress"])


def check_finite(loss: torch.Tensor, *, step: int, parts: Mapping[str, torch.Tensor] | None = None) -> None:
    """Stop the run with the step number if ``loss`` (a scalar tensor) is NaN or infinite.

    This reads the loss on the host: one sync per step, where the progress bar is updated anyway.
    """
    value = float(loss.detach())
    if not math.isfinite(value):
        detail = "" if parts is None else " (" + ", ".join(
            f"{k}={float(v.detach()):.4g}" for k, v in parts.items()) + ")"
        raise FloatingPointError(f"non-finite loss {value} at step {step}{detail}")
