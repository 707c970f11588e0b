"""Weights & Biases logging of a training run: ``train.wandb=true`` (the extra ``'.[wandb]'``). Rank 0
sends the rows it writes to metrics.jsonl, at their step, and the resolved config; the W&B run id
is kept in RUN/wandb.json, so ``--resume`` continues the same W&B run (docs/running.md, section 4).
wandb is imported only when a run asks for it: ``require_wandb`` (looked up, not imported) ends a
run that asks for it without it in one line naming the extra, before any work."""
from __future__ import annotations

import importlib.util
import json
import secrets
import string
from pathlib import Path
from typing import Any, Mapping

from core.io import write_atomic
from core.errors import ExpectedError

__all__ = ["WANDB_EXTRA", "RECORD", "WandbMissing", "require_wandb", "Tracker", "run_id"]

WANDB_EXTRA = "pip install '.[wandb]'"
RECORD = "wandb.json"
_ID_CHARS = string.ascii_lowercase + string.digits


class WandbMissing(ExpectedError, ImportError):
    """``train.wandb=true`` where wandb is not installed."""


def require_wandb() -> None:
    """Raise WandbMissing, one line naming the extra, unless wandb can be imported here."""
    try:
        found = importlib.util.find_spec("wandb") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise WandbMissing("train.wandb=true needs Weights & Biases (wandb), which is not installed: "
                           f"{WANDB_EXTRA}, or train.wandb=false")


def run_id(run_dir: str | Path) -> str | None:
    """The W&B run id a run folder records, or None."""
    path = Path(run_dir) / RECORD
    return json.loads(path.read_text())["id"] if path.is_file() else None


class Tracker:
    """The W&B run of one training run folder (make it on rank 0 only).

    ``resumed``: the run folder's run continues from a checkpoint; the recorded id is reused
    (a run resumed with W&B newly switched on gets a new id). A new run gets a new id."""

    def __init__(self, run_dir: str | Path, *, project: str, config: Mapping[str, Any], resumed: bool):
        require_wandb()
        import wandb

        run_dir = Path(run_dir)
        rid = run_id(run_dir) if resumed else None
        if rid is None:
            rid = "".join(secrets.choice(_ID_CHARS) for _ in range(8))
            write_atomic(run_dir / RECORD, json.dumps(dict(id=rid, project=project), indent=2) + "\n")
        self.id = rid
        self._run = wandb.init(project=project, id=rid, resume="allow", name=run_dir.name,
                               dir=str(run_dir), config=dict(config))

    def log(self, row: Mapping[str, Any]) -> None:
        """Send ``row`` (it has ``"step"``) as that step's values."""
        self._run.log({k: v for k, v in row.items() if k != "step"}, step=int(row["step"]))

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
