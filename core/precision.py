"""Mixed precision, one rule for every job (train, extract, the online teachers, eval): a setting
``amp`` of ``AMP`` ("bf16": A100/H100; "fp16": GPUs without bf16, V100/T4, whose training then
takes a gradient scaler; "none": float32) applies on CUDA, and the CPU runs float32 whatever it
says. Importing this module imports no torch (config modules take ``AMP``)."""
from __future__ import annotations

from contextlib import AbstractContextManager

AMP = ("bf16", "fp16", "none")


def resolve_amp(amp: str, device) -> str:
    """The setting ``amp`` as it runs on ``device``: itself on CUDA, "none" on the CPU (CPU
    autocast is slow and the default bf16 would change every CPU result). ValueError for a
    setting not in ``AMP``."""
    import torch
    if amp not in AMP:
        raise ValueError(f"amp={amp!r} is not one of {list(AMP)}")
    return amp if torch.device(device).type == "cuda" else "none"


def amp_dtype(amp: str):
    """The autocast dtype a setting names, on any device: torch.bfloat16, torch.float16, or None
    for "none". ValueError for a setting not in ``AMP``."""
    import torch
    if amp not in AMP:
        raise ValueError(f"amp={amp!r} is not one of {list(AMP)}")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def autocast_dtype(amp: str, device):
    """The autocast dtype of a job's setting ``amp`` on ``device`` (None: float32)."""
    return amp_dtype(resolve_amp(amp, device))


def autocast(device, dtype) -> AbstractContextManager:
    """``torch.autocast`` on ``device``'s type in ``dtype``; off (float32, also inside an outer
    autocast region) for None."""
    import torch
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=dtype, enabled=True) if dtype is not None else torch.autocast(kind, enabled=False)


def grad_scaler(dtype, device):
    """The gradient scaler that training under autocast ``dtype`` needs: a
    ``torch.amp.GradScaler`` for float16 (its small range underflows gradients unscaled), None
    otherwise (bfloat16 has float32's range)."""
    import torch
    return torch.amp.GradScaler(torch.device(device).type) if dtype == torch.float16 else None
