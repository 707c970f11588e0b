"""Run one evaluation protocol from its config into its run folder and write ``OUT/result.json``
(``evaluate``, with ``--resume`` or ``--auto-resume`` for the protocols that train); under torchrun
the protocols of ``DISTRIBUTED`` share the work over the ranks, rank 0 writes, and the others
refuse to run (docs/eval.md)."""
from __future__ import annotations

import importlib
import json
import os
from contextlib import nullcontext
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


def evaluate(cfg: Any, *, out: str | Path | None = None, device: str = "auto", resume: bool = False,
             auto_resume: bool = False) -> tuple[dict | None, Path]:
    """Run the protocol of ``cfg``; returns (the result record, the path of result.json).

    ``auto_resume``: resume when ``out`` holds the protocol's checkpoint, start otherwise; when it
    holds a finished run (its result.json) of these settings, nothing runs and the record is the
    one written then, with ``"finished": True``. Under torchrun the record is rank 0's, and None
    on the other ranks (rank 0 writes and reports)."""
    from eval.common import RESULT, default_out, resolve_device, write_result
    from core import dist
    from core.log import LOG, command_line, open_log

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and cfg.task not in DISTRIBUTED:
        raise ValueError(f"eval {cfg.task} runs in one process, not under torchrun ({world} ranks); "
                         f"of the protocols, {', '.join(DISTRIBUTED)} run(s) under torchrun")
    if resume and auto_resume:
        raise ValueError("--resume and --auto-resume exclude each other; give one of them")
    out = Path(out) if out else default_out(cfg.checkpoint, cfg.task)
    kwargs: dict[str, Any] = {"device": device}
    if cfg.task in RESUMABLE:
        held = auto_resume and (out / checkpoint_name(cfg.task)).is_file()
        if held and (out / RESULT).is_file():             # finished: left as it is
            _check_finished(cfg, out)
            record = json.loads((out / RESULT).read_text())
            return ({**record, "finished": True} if int(os.environ.get("RANK", "0") or 0) == 0 else None), \
                out / RESULT
        kwargs.update(out=out, resume=resume or held)
    elif resume or auto_resume:
        raise ValueError(f"eval {cfg.task} has nothing to resume (it does not train)")
    own_group = world > 1 and dist.world_size() == 1      # joined here, so left here
    if own_group:
        kwargs["device"] = dist.local_device(str(resolve_device(device)))
        dist.init_from_env(kwargs["device"])
    # a protocol that trains keeps its log in its run (core/run.py); the others' is kept here
    log = open_log(out / LOG, start=f"start: {command_line()}") \
        if cfg.task not in RESUMABLE and dist.rank() == 0 else nullcontext()
    try:
        with log:
            metrics, settings = _protocol(cfg.task)(cfg, **kwargs)
            record = None
            if dist.rank() == 0:
                record = write_result(out / RESULT, task=cfg.task, metrics=metrics, settings=settings,
                                      checkpoint=Path(cfg.checkpoint), config=cfg)
    finally:
        if own_group:
            dist.shutdown()
    return record, out / RESULT


def checkpoint_name(task: str) -> str:
    """The file name of a resumable protocol's checkpoint in its run folder."""
    from core.run import CHECKPOINT
    return getattr(importlib.import_module(f"eval.{task}"), "CHECKPOINT", CHECKPOINT)


def _check_finished(cfg: Any, out: Path) -> None:
    """The finished run in ``out`` is one of ``cfg``'s settings and checkpoint, or ValueError naming
    what differs (as a resume of it would be refused)."""
    from core.config import DERIVED
    from core.run import INFO, saved_config, settings_diff
    from eval.common import checkpoint_digest

    saved = {k: v for k, v in (saved_config(out) or {}).items() if k != DERIVED}
    diff = settings_diff(saved, cfg.to_dict(), movable=cfg.movable)
    info = json.loads((out / INFO).read_text()) if (out / INFO).is_file() else {}
    diff += settings_diff({"checkpoint_sha256": info.get("checkpoint_sha256")},
                          {"checkpoint_sha256": checkpoint_digest(Path(cfg.checkpoint))})
    if diff:
        raise ValueError(f"--auto-resume: {out} holds a finished run made with other settings: {'; '.join(diff)}; "
                         "choose another --out")
