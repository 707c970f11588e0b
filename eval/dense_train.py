"""Training plumbing shared by detection and segmentation: layer-decay parameter groups, a sample
order keyed by (seed, epoch), loaders that leave the global generators alone (model
initialisation and each training step run under ``eval.data.seeded_rngs`` keyed by (seed, step),
so dropout, drop path and RoI sampling are keyed too), and a stop on a non-finite loss naming
the step."""
from __future__ import annotations

import math
import re
from typing import Mapping

import numpy as np
import torch
from torch import nn



def param_groups(model: nn.Module, *, weight_decay: float, layer_decay: float,
                 vit_prefix: str = "backbone.vit.") -> list[dict]:
    """AdamW parameter groups with layer-wise lr decay (BEiT/MAE/ViTDet recipe): ``core.optim``'s,
    that is timm's ``param_groups_layer_decay`` as the fine-tune uses it, over the whole model.

    The ViT under ``vit_prefix`` is grouped by its own ``group_matcher``: embeddings are
    layer 0, block i is layer i + 1 (the final norm goes with the last block); every other
    parameter (pyramid, heads) is the top layer. ``lr_scale = layer_decay ** (top - layer)``:
    embeddings ``layer_decay ** (depth + 1)``, the last block ``layer_decay``, heads 1. No
    weight decay on 1-D tensors and the ViT's ``no_weight_decay()`` tokens. ``set_lr`` sets
    ``lr = base_lr * lr_scale``.
    """
    from core.optim import param_groups as groups

    try:
        vit = model.get_submodule(vit_prefix.rstrip("."))
    except AttributeError:
        vit = None
    if vit is None or not hasattr(vit, "group_matcher"):
        raise ValueError(f"param_groups: no ViT found at prefix {vit_prefix!r}")
    return groups(_PrefixedGroups(model, vit, vit_prefix), weight_decay=weight_decay, layer_decay=layer_decay)


class _PrefixedGroups:
    """``model`` as timm's layer-decay grouping sees it: its parameters, and its ViT's group matcher
    and no-weight-decay names moved under ``prefix`` (unmatched names form the top layer)."""

    def __init__(self, model: nn.Module, vit: nn.Module, prefix: str):
        self.model, self.skip = model, {prefix + n for n in vit.no_weight_decay()}
        under = lambda pattern: "^" + re.escape(prefix) + "(?:" + pattern.lstrip("^") + ")"  # noqa: E731
        self.matcher = {group: under(spec) if isinstance(spec, str) else [(under(p), s) for p, s in spec]
                        for group, spec in vit.group_matcher(coarse=False).items() if spec is not None}

    def group_matcher(self, coarse: bool = False) -> dict:
        return self.matcher

    def no_weight_decay(self) -> set[str]:
        return self.skip

    def named_parameters(self, *args, **kwargs):
        return self.model.named_parameters(*args, **kwargs)


def optimizer_for(run, model: nn.Module, *, lr: float, weight_decay: float, layer_decay: float,
                  unit: str) -> tuple[torch.optim.Optimizer, int]:
    """AdamW (betas 0.9/0.999) over ``param_groups(model)``; when ``run`` (a ``core.run.Run``) resumes,
    model and optimizer are restored from its checkpoint. Returns (optimizer, the checkpoint's
    ``progress[unit]``, 0 for a new run)."""
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=weight_decay, layer_decay=layer_decay), lr=lr,
                                  betas=(0.9, 0.999))
    if not run.resumed:
        return optimizer, 0
    model.load_state_dict(run.state["model"])
    optimizer.load_state_dict(run.state["optimizer"])
    start = int(run.state["progress"][unit])
    print(f"resumed from {run.checkpoint_path} after {'iteration' if unit == 'iter' else unit} {start}")
    return optimizer, start


def scaler_for(run, dtype, device) -> torch.amp.GradScaler | None:
    """The gradient scaler of training under autocast ``dtype`` (float16's, else None:
    core/precision.py ``grad_scaler``), restored from ``run``'s checkpoint when it resumes one
    that holds it, so that the resume is exact."""
    from core.precision import grad_scaler
    scaler = grad_scaler(dtype, device)
    if scaler is not None and run.resumed and run.state.get("scaler"):
        scaler.load_state_dict(run.state["scaler"])
    return scaler


def backward_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler) -> None:
    """``loss.backward()`` and ``optimizer.step()``; with a scaler, the loss scaled for the
    backward and a step whose gradients overflowed skipped (``GradScaler.step``)."""
    if scaler is None:
        loss.backward()
        optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


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


def check_finite(loss: torch.Tensor, *, step: int, parts: Mapping[str, torch.Tensor] | None = None) -> None:
    """Stop the run with the step number if ``loss`` (a scalar tensor) is NaN or infinite.

    This reads the loss on the host: one sync per step, where the progress bar is updated anyway.
    """
    value = float(loss.detach())
    if not math.isfinite(value):
        detail = "" if parts is None else " (" + ", ".join(
            f"{k}={float(v.detach()):.4g}" for k, v in parts.items()) + ")"
        raise FloatingPointError(f"non-finite loss {value} at step {step}{detail}")
