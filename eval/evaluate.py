"""Run one evaluation protocol from its config into its run folder and record the result.

``evaluate(cfg, out=..., device=..., resume=...)`` picks the protocol from the config's type
(eval/config.py), runs it with ``out`` as its run folder (default: ``eval.common.default_out``,
derived from the checkpoint, so that evaluations of two checkpoints never overwrite each
other) and writes ``OUT/result.json``. The protocols that train (linear, finetune, detection,
segmentation) keep their checkpoint, metrics.jsonl and config.yaml in the same folder through
``core.run``: a new run refuses a folder that holds one, ``resume`` continues it and is an
error when there is nothing to resume.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["evaluate", "RESUMABLE"]

RESUMABLE = ("linear", "finetune", "detection", "segmentation")


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
             resume: bool = False) -> tuple[dict, Path]:
    """Run the protocol of ``cfg``; returns (the result record, the path of result.json)."""
    from eval.common import RESULT, default_out, write_result

    out = Path(out) if out else default_out(cfg.checkpoint, cfg.task)
    kwargs: dict[str, Any] = {"device": device}
    if cfg.task in RESUMABLE:
        kwargs.update(out=out, resume=resume)
    elif resume:
        raise ValueError(f"eval {cfg.task} has nothing to resume (it does not train)")
    metrics, settings = _protocol(cfg.task)(cfg, **kwargs)
    record = write_result(out / RESULT, task=cfg.task, metrics=metrics, settings=settings,
                          checkpoint=Path(cfg.checkpoint), config=cfg)
    return record, out / RESULT
