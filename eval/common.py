"""What every evaluation shares: loading a backbone checkpoint, describing a result.

``load_backbone`` turns a plain timm ViT state dict (the student export, or any timm
checkpoint) into a strict, headless timm model; the all-zero placeholder classifier of the
student export is dropped, a trained classifier is refused as an unexpected key. ``write_result`` writes the one JSON
record an evaluation leaves behind: the metric, the protocol settings, the sha256 of
the checkpoint that was evaluated and the git commit of the code that evaluated it.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

__all__ = [
    "load_backbone",
    "read_state_dict",
    "checkpoint_digest",
    "git_commit",
    "write_result",
    "print_table",
    "format_table",
    "parse_model_args",
    "resolve_device",
    "cls_features",
    "input_size_of",
    "cosine_lr",
    "save_atomic",
    "check_resume_settings",
]

_REPO_ROOT = Path(__file__).resolve().parent.parent
_NESTED_KEYS = ("model", "state_dict")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def read_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``.pth``/``.pt``/...).

    A torch file may hold the state dict itself or one under ``"model"`` or
    ``"state_dict"``; a leading ``"module."`` (DDP) is stripped from every key.
    Torch files are read with ``weights_only=True`` (no code runs on load).
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint}: no such file")
    suffix = checkpoint.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(checkpoint), device="cpu")
        except SafetensorError as err:
            raise ValueError(f"checkpoint {checkpoint}: cannot be read as safetensors ({err})") from None
    elif suffix in _TORCH_SUFFIXES:
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling errors come in many types
            raise ValueError(
                f"checkpoint {checkpoint}: cannot be read as a torch state dict "
                f"with weights_only=True ({type(err).__name__}: {err})"
            ) from err
        if isinstance(state, Mapping):
            for key in _NESTED_KEYS:
                if key in state and isinstance(state[key], Mapping):
                    state = state[key]
                    break
    else:
        raise ValueError(
            f"checkpoint {checkpoint}: unknown file type {suffix!r}; "
            f"expected .safetensors or one of {', '.join(_TORCH_SUFFIXES)}"
        )
    if not isinstance(state, Mapping) or not state:
        raise ValueError(
            f"checkpoint {checkpoint}: holds no state dict (looked at the top level "
            f"and under {', '.join(repr(k) for k in _NESTED_KEYS)})"
        )
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(
            f"checkpoint {checkpoint}: entries that are not tensors: {_preview(bad)}; "
            f"expected a plain state dict"
        )
    return {_strip_prefix(k): v for k, v in state.items()}


def load_backbone(checkpoint: Path | None, *, model: str = "vit_tiny_patch16_224",
                  **timm_kwargs: Any) -> nn.Module:
    """Build timm ``model`` with ``num_classes=0`` and load ``checkpoint`` strictly.

    ``timm_kwargs`` go to ``timm.create_model`` (e.g. ``img_size=32``,
    ``drop_path_rate=0.1``). ``checkpoint=None`` gives a randomly initialised model
    (for baselines and tests). The model is returned on the CPU in eval mode.
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
        from train.export import drop_placeholder_head
        state = drop_placeholder_head(read_state_dict(Path(checkpoint)), net)
        own = net.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = sorted(
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape)
        )
        if missing or unexpected or shapes:
            parts = []
            if missing:
                parts.append(f"missing keys ({len(missing)}): {_preview(missing)}")
            if unexpected:
                parts.append(f"unexpected keys ({len(unexpected)}): {_preview(unexpected)}")
            if shapes:
                parts.append(f"shape mismatches ({len(shapes)}): {_preview(shapes)}")
            kw = ", ".join(f"{k}={v!r}" for k, v in sorted(timm_kwargs.items()))
            raise ValueError(
                f"checkpoint {checkpoint} does not fit timm model {model!r}"
                f"{' (' + kw + ')' if kw else ''} with num_classes=0: " + "; ".join(parts)
            )
        net.load_state_dict(state, strict=True)
    return net.eval()


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


def parse_model_args(items: Iterable[str]) -> dict[str, Any]:
    """``["img_size=32", "patch_size=8"]`` -> ``{"img_size": 32, "patch_size": 8}``.

    Values are read as YAML scalars/lists (``0.1``, ``true``, ``[1, 2]``).
    """
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"model argument {item!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


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
    """MAE's per-step schedule: linear warm-up over ``warmup_epochs`` (fractional
    epochs), then a half-cycle cosine from ``base_lr`` down to ``min_lr``."""
    epoch = step / steps_per_epoch
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-12)
    progress = min((epoch - warmup_epochs) / span, 1.0)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` via a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def check_resume_settings(saved: Mapping[str, Any], current: Mapping[str, Any], *,
                          where: Path, ignore: Iterable[str] = ()) -> None:
    """Refuse to resume a run whose settings differ; the message names every key."""
    skip = set(ignore)
    keys = sorted((set(saved) | set(current)) - skip)
    norm = lambda v: json.loads(json.dumps(v, default=_jsonable))  # noqa: E731
    diff = [f"{k}: saved {saved.get(k)!r} vs now {current.get(k)!r}" for k in keys
            if norm(saved.get(k)) != norm(current.get(k))]
    if diff:
        raise ValueError(f"cannot resume from {where}: settings differ: " + "; ".join(diff))


def checkpoint_digest(path: Path) -> str:
    """sha256 hex digest of the file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def git_commit() -> str | None:
    """Commit of the code being run (``HEAD`` of this repository), or None outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO_ROOT, capture_output=True,
                             text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _git_dirty() -> bool | None:
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                             cwd=_REPO_ROOT, capture_output=True, text=True, timeout=10,
                             check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip())


def write_result(path: Path, *, task: str, metrics: Mapping[str, Any],
                 settings: Mapping[str, Any], checkpoint: Path | None) -> dict:
    """Write one evaluation's record as JSON (atomically) and return it.

    Fields: task, metrics, settings (the protocol as run), checkpoint (path and
    sha256, or null for a random init), git_commit, git_dirty, time (UTC ISO 8601),
    argv.
    """
    record = {
        "task": task,
        "metrics": dict(metrics),
        "settings": dict(settings),
        "checkpoint": None if checkpoint is None else {
            "path": str(checkpoint),
            "sha256": checkpoint_digest(Path(checkpoint)),
        },
        "git_commit": git_commit(),
        "git_dirty": _git_dirty(),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(sys.argv),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return json.loads(json.dumps(record, default=_jsonable))


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


def _strip_prefix(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


def _preview(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
