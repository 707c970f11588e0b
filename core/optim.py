"""Learning-rate schedules by step and AdamW parameter groups (weight decay, layer decay)."""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["lr_schedule", "lr_at", "param_groups", "NO_DECAY_NAMES"]

# Parameters that never take weight decay (besides every 1-d tensor: biases and norms).
NO_DECAY_NAMES = ("cls_token", "pos_embed", "mask_token")


def lr_schedule(*, total_steps: int, warmup_steps: float, peak: float, kind: str = "cosine",
                min_lr: float = 0.0, warmup_offset: int = 1) -> np.ndarray:
    """(total_steps,) float64 learning rate per step: linear warm-up, then cosine (or flat).

    Warm-up: ``peak * (step + warmup_offset) / warmup_steps`` while step < warmup_steps
    (offset 1: the first step already runs at peak / warmup_steps; 0: MAE's schedule, which
    starts at zero). Then a half cycle of cosine from ``peak`` to ``min_lr`` over the
    remaining steps (``kind="constant"``: ``peak`` throughout). ``warmup_steps`` may be
    fractional (warm-up epochs times steps per epoch)."""
    _check_kind(kind)
    s = np.arange(total_steps, dtype=np.float64)
    warm = peak * (s + warmup_offset) / max(1e-12, warmup_steps)
    t = np.clip((s - warmup_steps) / max(1e-12, total_steps - warmup_steps), 0, 1)
    after = min_lr + (peak - min_lr) * 0.5 * (1 + np.cos(math.pi * t)) if kind == "cosine" \
        else np.full_like(s, peak)
    return np.where(s < warmup_steps, warm, after)


def lr_at(step: int, *, total_steps: int, warmup_steps: float, peak: float, kind: str = "cosine",
          min_lr: float = 0.0, warmup_offset: int = 1) -> float:
    """The learning rate of one ``step`` of :func:`lr_schedule`, in Python floats (steps
    past the end keep the cosine's last value, ``min_lr``)."""
    _check_kind(kind)
    if step < warmup_steps:
        return peak * (step + warmup_offset) / max(1e-12, warmup_steps)
    if kind == "constant":
        return peak
    t = min((step - warmup_steps) / max(1e-12, total_steps - warmup_steps), 1.0)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def _check_kind(kind: str) -> None:
    if kind not in ("cosine", "constant"):
        raise ValueError(f"lr schedule kind={kind!r} is not one of ['cosine', 'constant']")


def param_groups(module: torch.nn.Module, *, weight_decay: float, decay_1d: bool = False,
                 layer_decay: float | None = None, no_decay_names=NO_DECAY_NAMES) -> list[dict]:
    """AdamW groups of the trainable parameters of ``module``.

    Without ``layer_decay``: two groups, [decayed, not decayed]; biases, norms and
    parameters named ``no_decay_names`` take no weight decay unless ``decay_1d``. With
    ``layer_decay`` (a ViT): timm's ``param_groups_layer_decay`` (each group's
    ``lr_scale`` is ``layer_decay ** (depth - layer)``; the optimiser step multiplies it in),
    with the model's ``no_weight_decay()`` names when it has them."""
    if layer_decay is not None:
        from timm.optim import param_groups_layer_decay
        skip = set(module.no_weight_decay()) if hasattr(module, "no_weight_decay") else set(no_decay_names)
        return param_groups_layer_decay(module, weight_decay=weight_decay, layer_decay=layer_decay,
                                        no_weight_decay_list=skip, weight_decay_exclude_1d=not decay_1d)
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if not decay_1d and (p.ndim <= 1 or name.endswith(tuple(no_decay_names))):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
