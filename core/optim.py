"""Learning-rate schedules by step and AdamW parameter groups (timm's weight-decay and layer-decay
groups). One schedule serves train/loop.py and the eval protocols: a linear warm-up factor times
a decay (``DECAYS``); why it is ours and not timm's: docs/eval.md, "Optimisers and schedules"."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

__all__ = ["lr_schedule", "lr_at", "param_groups", "DECAYS", "NO_DECAY_NAMES"]

# Parameters that never take weight decay (besides every 1-d tensor: biases and norms).
NO_DECAY_NAMES = ("cls_token", "pos_embed", "mask_token")


def _cosine(s, *, total_steps, warmup_steps, peak, min_lr, **_):
    """Half a cosine from ``peak`` (until the warm-up ends) to ``min_lr`` (at the last step and after)."""
    t = np.clip((s - warmup_steps) / max(1e-12, total_steps - warmup_steps), 0, 1)
    return min_lr + (peak - min_lr) * 0.5 * (1 + np.cos(math.pi * t))


def _constant(s, *, peak, **_):
    return np.full_like(s, peak)


def _step(s, *, total_steps, peak, drops, drop_factor, **_):
    """``peak * drop_factor ** n``, n: how many of the fractions ``drops`` of ``total_steps`` (rounded
    down to a step) the step has reached (ViTDet's x0.1 at 88.9% and 96.3%)."""
    n = sum((s >= int(f * total_steps)).astype(np.float64) for f in drops)
    return peak * drop_factor ** n


# The decay after (and under) the warm-up, by schedule kind.
DECAYS = {"cosine": _cosine, "constant": _constant, "step": _step}


def _curve(s: np.ndarray, *, total_steps: int, warmup_steps: float, peak: float, kind: str, min_lr: float,
           warmup_offset: int, drops: Sequence[float], drop_factor: float) -> np.ndarray:
    if kind not in DECAYS:
        raise ValueError(f"lr schedule kind={kind!r} is not one of {sorted(DECAYS)}")
    warm = np.where(s < warmup_steps, (s + warmup_offset) / max(1e-12, warmup_steps), 1.0)
    return warm * DECAYS[kind](s, total_steps=total_steps, warmup_steps=warmup_steps, peak=peak, min_lr=min_lr,
                               drops=drops, drop_factor=drop_factor)


def lr_schedule(*, total_steps: int, warmup_steps: float, peak: float, kind: str = "cosine",
                min_lr: float = 0.0, warmup_offset: int = 1, drops: Sequence[float] = (),
                drop_factor: float = 0.1) -> np.ndarray:
    """(total_steps,) float64 learning rate per step: a linear warm-up times the decay ``kind``.

    Warm-up: a factor ``(step + warmup_offset) / warmup_steps`` while step < warmup_steps, 1
    afterwards (offset 1: the first step already runs at 1 / warmup_steps of the rate; 0: MAE's
    schedule, which starts at zero). ``warmup_steps`` may be fractional (warm-up epochs times
    steps per epoch). The decay (``DECAYS``): ``"cosine"``, ``peak`` until the warm-up ends, then
    half a cosine to ``min_lr`` at the last step; ``"constant"``, ``peak``; ``"step"``, ``peak``
    times ``drop_factor`` for each fraction of ``drops`` of the steps passed."""
    return _curve(np.arange(total_steps, dtype=np.float64), total_steps=total_steps, warmup_steps=warmup_steps,
                  peak=peak, kind=kind, min_lr=min_lr, warmup_offset=warmup_offset, drops=drops,
                  drop_factor=drop_factor)


def lr_at(step: int, *, total_steps: int, warmup_steps: float, peak: float, kind: str = "cosine",
          min_lr: float = 0.0, warmup_offset: int = 1, drops: Sequence[float] = (),
          drop_factor: float = 0.1) -> float:
    """The learning rate of one ``step`` of :func:`lr_schedule` (steps past the end keep the
    last value: ``min_lr`` for the cosine)."""
    return float(_curve(np.float64(step), total_steps=total_steps, warmup_steps=warmup_steps, peak=peak,
                        kind=kind, min_lr=min_lr, warmup_offset=warmup_offset, drops=drops,
                        drop_factor=drop_factor))


def param_groups(module: torch.nn.Module, *, weight_decay: float, decay_1d: bool = False,
                 layer_decay: float | None = None, no_decay_names=NO_DECAY_NAMES) -> list[dict]:
    """AdamW groups of the trainable parameters of ``module``.

    Without ``layer_decay``: two groups, [decayed, not decayed] (both always present, so that
    the optimiser's state layout, and every checkpoint of it, does not depend on the config);
    biases, norms and parameters whose names end in ``no_decay_names`` take no weight decay
    unless ``decay_1d``. Which parameter goes where is timm's ``param_groups_weight_decay``.
    With ``layer_decay`` (a ViT): timm's ``param_groups_layer_decay`` (each group's ``lr_scale``
    is ``layer_decay ** (depth - layer)``; the optimiser step multiplies it in), with the model's
    ``no_weight_decay()`` names when it has them."""
    if layer_decay is not None:
        from timm.optim import param_groups_layer_decay
        skip = set(module.no_weight_decay()) if hasattr(module, "no_weight_decay") else set(no_decay_names)
        return param_groups_layer_decay(module, weight_decay=weight_decay, layer_decay=layer_decay,
                                        no_weight_decay_list=skip, weight_decay_exclude_1d=not decay_1d)
    from timm.optim import param_groups_weight_decay
    # timm puts every parameter into one group at weight decay 0 and orders [no decay, decay]:
    # asked with a non-zero rate (1), it splits them; the groups are then put in our order.
    split = param_groups_weight_decay(module, weight_decay=1.0, weight_decay_exclude_1d=not decay_1d,
                                      no_weight_decay_list=() if decay_1d else [f"*{n}" for n in no_decay_names])
    by_rate = {g["weight_decay"]: g["params"] for g in split}
    return [{"params": by_rate.get(1.0, []), "weight_decay": weight_decay},
            {"params": by_rate.get(0.0, []), "weight_decay": 0.0}]
