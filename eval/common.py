"""What every evaluation shares: loading a backbone checkpoint strictly (``load_backbone``), the
default run folder ``runs/eval/<checkpoint stem>-<sha256[:8]>/<task>`` (``default_out``) and the
``result.json`` record of an evaluation (``write_result``; docs/eval.md)."""
from __future__ import annotations

import datetime as _dt
import json
import sys
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from core.run import EVAL_ROOT, RESULT
from core.io import git_commit, git_dirty, sha256_file, write_atomic
from core.optim import lr_at
from core.state import drop_placeholder_head, load_strict, read_state_dict
from eval.config import parse_model_args

__all__ = [
    "load_backbone",
    "read_state_dict",
    "checkpoint_digest",
    "default_out",
    "git_commit",
    "write_result",
    "print_table",
    "format_table",
    "parse_model_args",
    "resolve_device",
    "cls_features",
    "input_size_of",
    "cosine_lr",
    "RESULT",
]



def load_backbone(checkpoint: Path | None, *, model: str = "vit_tiny_patch16_224",
                  **timm_kwargs: Any) -> nn.Module:
    """Build timm ``model`` with ``num_classes=0`` and load ``checkpoint`` strictly.

    ``timm_kwargs`` go to ``timm.create_model`` (e.g. ``img_size=32``,
    ``drop_path_rate=0.1``). ``checkpoint=None`` gives a randomly initialised model
    (for baselines and tests); a training checkpoint (RUN/last.pt, RUN/snapshots/epoch_NNNN.pt)
    gives its student (``run_student``). The model is returned on the CPU in eval mode.
    An all-zero classifier (the student export's placeholder) is dropped first
    (``drop_placeholder_head``); then any missing key, unexpected key or shape
    mismatch raises ``ValueError`` naming all of them.
    """
    import timm

    if "num_classes" in timm_kwargs:
        raise ValueError("load_backbone: num_classes is always 0 (a backbone); "
                         "add a head after loading")
    with torch.random.fork_rng(devices=[]):  # random init must not move the caller's RNG
        torch.manual_seed(0)
        net = timm.create_model(model, pretrained=False, num_classes=0, **timm_kwargs)
    if checkpoint is not None:
        state = drop_placeholder_head(run_student(read_state_dict(Path(checkpoint))), net)
        kw = ", ".join(f"{k}={v!r}" for k, v in sorted(timm_kwargs.items()))
        load_strict(net, state, what=f"checkpoint {checkpoint} does not fit timm model {model!r}"
                                     f"{' (' + kw + ')' if kw else ''} with num_classes=0")
    return net.eval()


# A training checkpoint's student encoder, a timm ViT, under its ``model`` entry (train/objective.py StudentSide).
RUN_STUDENT = "student.vit."


def run_student(state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """The timm state dict of ``state``: the student encoder of a training checkpoint (its keys
    ``student.vit.*``, without the decoder and adapters), else ``state`` as it is."""
    if not any(k.startswith(RUN_STUDENT) for k in state):
        return state
    return {k[len(RUN_STUDENT):]: v for k, v in state.items() if k.startswith(RUN_STUDENT)}


def cls_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """CLS token after the final norm.

    images: (B, 3, H, W) float32, normalised. Returns (B, D) in the model's dtype.
    """
    if getattr(model, "cls_token", None) is None:
        raise ValueError(f"{type(model).__name__} has no CLS token; the k-NN, linear and "
                         f"fine-tune protocols here read the CLS token")
    return model.forward_features(images)[:, 0]


def input_size_of(model: nn.Module) -> int:
    """Square input side the model was built for (``patch_embed.img_size``)."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        raise ValueError(f"{type(model).__name__}: cannot read its input size from patch_embed")
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    if size[0] != size[1]:
        raise ValueError(f"only square inputs are supported, model has {size}")
    return int(size[0])


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def cosine_lr(step: int, *, steps_per_epoch: int, epochs: int, warmup_epochs: float,
              base_lr: float, min_lr: float = 0.0) -> float:
    """MAE's per-step schedule in epochs: linear warm-up from 0 over ``warmup_epochs``
    (fractional epochs), then a half-cycle cosine from ``base_lr`` down to ``min_lr``
    (``core.optim.lr_at`` with MAE's zero-based warm-up)."""
    return lr_at(step, total_steps=epochs * steps_per_epoch, warmup_steps=warmup_epochs * steps_per_epoch,
                 peak=base_lr, min_lr=min_lr, warmup_offset=0)


def checkpoint_digest(path: Path) -> str:
    """sha256 hex digest of the file's bytes."""
    return sha256_file(Path(path))


def default_out(checkpoint: str | Path, task: str) -> Path:
    """``runs/eval/<checkpoint stem>-<first 8 hex digits of its sha256>/<task>``."""
    checkpoint = Path(checkpoint)
    return EVAL_ROOT / f"{checkpoint.stem}-{checkpoint_digest(checkpoint)[:8]}" / task


def write_result(path: Path, *, task: str, metrics: Mapping[str, Any], settings: Mapping[str, Any],
                 checkpoint: Path | None, config: Any = None) -> dict:
    """Write one evaluation's record as JSON (atomically) and return it.

    Fields: task, metrics, config (the resolved protocol config, eval/config.py, with its
    derived values), settings (the protocol as run), checkpoint (path and sha256, or null
    for a random init), git_commit, git_dirty, time (UTC ISO 8601), argv.
    """
    record = {
        "task": task,
        "metrics": dict(metrics),
        "config": None if config is None else {**config.to_dict(), **(
            {"derived": config.derived()} if config.derived() else {})},
        "settings": dict(settings),
        "checkpoint": None if checkpoint is None else {
            "path": str(checkpoint),
            "sha256": checkpoint_digest(Path(checkpoint)),
        },
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(sys.argv),
    }
    if config is None:
        del record["config"]
    text = json.dumps(record, indent=2, default=_jsonable) + "\n"
    write_atomic(Path(path), text)
    return json.loads(text)


def format_table(rows: list[Mapping[str, Any]]) -> str:
    """Rows of dicts (same keys) as an aligned text table; floats with 2 decimals."""
    if not rows:
        return ""
    cols: list[str] = []
    for row in rows:
        cols += [c for c in row if c not in cols]
    cells = [[_cell(row.get(c, "")) for c in cols] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w)  # noqa: E731
                                  for i, (v, w) in enumerate(zip(vals, widths)))
    out = [line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells]
    return "\n".join(out)


def print_table(rows: list[Mapping[str, Any]], *, file=None) -> None:
    """Print ``format_table(rows)`` to ``file`` (stdout by default)."""
    print(format_table(rows), file=file or sys.stdout)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
