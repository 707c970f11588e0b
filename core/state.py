"""State dicts: reading one from a file, loading one strictly with a one-line error."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

__all__ = ["read_state_dict", "check_state_dict", "load_strict", "preview"]

NESTED_KEYS = ("model", "state_dict")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def read_state_dict(checkpoint: str | Path, *, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``.pth``/``.pt``/...).

    A torch file may hold the state dict itself or one under ``"model"`` or
    ``"state_dict"``; a leading ``"module."`` (DDP) is stripped from every key.
    Torch files are read with ``weights_only=True`` (no code runs on load). Errors
    (FileNotFoundError, ValueError) begin with ``what`` and the path.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{what} {checkpoint}: no such file")
    suffix = checkpoint.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(checkpoint), device="cpu")
        except SafetensorError as err:
            raise ValueError(f"{what} {checkpoint}: cannot be read as safetensors ({err})") from None
    elif suffix in TORCH_SUFFIXES:
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling errors come in many types
            raise ValueError(
                f"{what} {checkpoint}: cannot be read as a torch state dict "
                f"with weights_only=True ({type(err).__name__}: {err})"
            ) from err
        if isinstance(state, Mapping):
            for key in NESTED_KEYS:
                if key in state and isinstance(state[key], Mapping):
                    state = state[key]
                    break
    else:
        raise ValueError(
            f"{what} {checkpoint}: unknown file type {suffix!r}; "
            f"expected .safetensors or one of {', '.join(TORCH_SUFFIXES)}"
        )
    if not isinstance(state, Mapping) or not state:
        raise ValueError(
            f"{what} {checkpoint}: holds no state dict (looked at the top level "
            f"and under {', '.join(repr(k) for k in NESTED_KEYS)})"
        )
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(
            f"{what} {checkpoint}: entries that are not tensors: {preview(bad)}; "
            f"expected a plain state dict"
        )
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def check_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], *, what: str) -> None:
    """Raise one ValueError, ``"{what}: missing keys (n): ...; unexpected keys (n): ...;
    shape mismatches (n): ..."``, when ``state`` does not fit ``module`` exactly."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape)
    )
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {preview(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {preview(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches ({len(shapes)}): {preview(shapes)}")
    if parts:
        raise ValueError(f"{what}: " + "; ".join(parts))


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], *, what: str) -> nn.Module:
    """:func:`check_state_dict`, then ``module.load_state_dict(state, strict=True)``."""
    check_state_dict(module, state, what=what)
    module.load_state_dict(state, strict=True)
    return module


def preview(items: list[str], limit: int = 12) -> str:
    """The first ``limit`` items, comma-separated, and how many more there are."""
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def drop_placeholder_head(state: Mapping[str, torch.Tensor], net: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` without a classifier (weight and bias) that is all zeros, when ``net`` has none.

    An all-zero classifier carries nothing: it is the placeholder ``student_state_dict``
    writes so that timm's default ``pretrained=True`` loading, strict with 1000
    classes, accepts the file. The classifier's names come from ``net.pretrained_cfg``
    (``"head"`` for a ViT). A trained (non-zero) head is left in, for the strict check to
    report."""
    names = getattr(net, "pretrained_cfg", {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    own = net.state_dict()
    out = dict(state)
    for name in names:
        keys = (f"{name}.weight", f"{name}.bias")
        if all(k in out and k not in own and not out[k].any() for k in keys):
            for k in keys:
                del out[k]
    return out
