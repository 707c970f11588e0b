"""Run one evaluation protocol from its config into its run folder and write ``OUT/result.json``
(``evaluate``); under torchrun the protocols of ``DISTRIBUTED`` share the work over the ranks,
rank 0 writes, and the others refuse to run (docs/eval.md)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["evaluate", "RESUMABLE", "DISTRIBUTED"]

RESUMABLE = ("linear", "finetune", "detection", "segmentation")
DISTRIBUTED = ("linear",)     # the protocols that run under torchrun


def _protocol(task: str):
    if task == "knn":
        from eval.knn import run_knn
        return run_knn
    if task == "linear":
        from eval.linear import run_linear
        return run_linear
    if task == "finetune":
        from eval.finetune import run_finetune
        return run_finetune
    if task == "detection":
        from eval.detection import run_detection
        return run_detection
    if task == "segmentation":
        from eval.segmentation import run_segmentation
        return run_segmentation
    raise ValueError(f"unknown evaluation task {task!r}")


def evaluate(cfg: Any, *, out: str | Path | None = None, device: str = "auto",
             resume: bool = False) -> tuple[dict | None, Path]:
    """Run the protocol of ``cfg``; returns (the result record, the path of result.json).

    Under torchrun the record is rank 0's, and None on the other ranks (rank 0 writes and reports)."""
    from eval.common import RESULT, default_out, resolve_device, write_result
    from core import dist

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and cfg.task not in DISTRIBUTED:
        raise ValueError(f"eval {cfg.task} runs in one process, not under torchrun ({world} ranks); "
                         f"of the protocols, {', '.join(DISTRIBUTED)} run(s) under torchrun")
    out = Path(out) if out else default_out(cfg.checkpoint, cfg.task)
    kwargs: dict[str, Any] = {"device": device}
    if cfg.task in RESUMABLE:
        kwargs.update(out=out, resume=resume)
    elif resume:
        raise ValueError(f"eval {cfg.task} has nothing to resume (it does not train)")
    own_group = world > 1 and dist.world_size() == 1      # joined here, so left here
    if own_group:
        kwargs["device"] = dist.local_device(str(resolve_device(device)))
        dist.init_from_env(kwargs["device"])
    try:
        metrics, settings = _protocol(cfg.task)(cfg, **kwargs)
        record = None
        if dist.rank() == 0:
            record = write_result(out / RESULT, task=cfg.task, metrics=metrics, settings=settings,
                                  checkpoint=Path(cfg.checkpoint), config=cfg)
    finally:
        if own_group:
            dist.shutdown()
    return record, out / RESULT
