"""Training plumbing shared by the dense evaluations (detection, segmentation).

Optimizer groups with layer-wise lr decay (timm's param_groups_layer_decay), a sample order keyed by (seed, epoch), loaders
that leave the global RNG alone (model init and each training step run inside
``eval.data.seeded_rngs`` keyed by (seed, step), so dropout, drop path and torchvision's
RoI sampling are keyed too),
checkpoints written atomically and refused on resume when the run's settings differ,
and a non-finite-loss stop that names the step.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from eval.common import check_resume_settings, save_atomic


def param_groups(model: nn.Module, *, weight_decay: float, layer_decay: float,
                 vit_prefix: str = "backbone.vit.") -> list[dict]:
    """AdamW parameter groups with layer-wise lr decay (BEiT/MAE/ViTDet recipe), by timm's
    ``param_groups_layer_decay`` as ``eval/finetune.py`` uses it.

    The ViT under ``vit_prefix`` is grouped by its own ``group_matcher``: embeddings are
    layer 0, block i is layer i + 1 (the final norm goes with the last block); every other
    parameter (pyramid, heads) is the top layer. ``lr_scale = layer_decay ** (top - layer)``:
    embeddings ``layer_decay ** (depth + 1)``, the last block ``layer_decay``, heads 1. No
    weight decay on 1-D tensors and the ViT's ``no_weight_decay()`` tokens. ``set_lr`` sets
    ``lr = base_lr * lr_scale``.
    """
    from timm.optim import param_groups_layer_decay

    try:
        vit = model.get_submodule(vit_prefix.rstrip("."))
    except AttributeError:
        vit = None
    if vit is None or not hasattr(vit, "group_matcher"):
        raise ValueError(f"param_groups: no ViT found at prefix {vit_prefix!r}")
    return param_groups_layer_decay(_PrefixedGroups(model, vit, vit_prefix), weight_decay=weight_decay,
                                    layer_decay=layer_decay,
                                    no_weight_decay_list=[vit_prefix + n for n in vit.no_weight_decay()])


class _PrefixedGroups:
    """``model`` as timm's layer-decay grouping sees it: its parameters, and the group matcher
    of its ViT with every pattern moved under ``prefix`` (unmatched names form the top layer)."""

    def __init__(self, model: nn.Module, vit: nn.Module, prefix: str):
        self.model = model
        under = lambda pattern: "^" + re.escape(prefix) + "(?:" + pattern.lstrip("^") + ")"  # noqa: E731
        self.matcher = {group: under(spec) if isinstance(spec, str) else [(under(p), s) for p, s in spec]
                        for group, spec in vit.group_matcher(coarse=False).items() if spec is not None}

    def group_matcher(self, coarse: bool = False) -> dict:
        return self.matcher

    def named_parameters(self, *args, **kwargs):
        return self.model.named_parameters(*args, **kwargs)


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


def open_run_dir(run_dir: Path, *, resume: bool) -> Path:
    """Create ``run_dir`` for a new run, or check that it holds one to resume; returns its checkpoint path.

    A new run refuses a folder that already holds a run (its checkpoint or log) and ``resume``
    refuses a folder without a checkpoint: both raise naming the folder, nothing is overwritten.
    """
    run_dir = Path(run_dir)
    checkpoint = run_dir / "checkpoint.pt"
    if resume and not checkpoint.is_file():
        raise FileNotFoundError(f"--resume: {run_dir} holds no checkpoint.pt to resume from")
    if not resume and (checkpoint.exists() or (run_dir / "log.jsonl").exists()):
        raise FileExistsError(f"{run_dir} holds a run already: pass --resume to continue it or choose "
                              f"another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    return checkpoint


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
