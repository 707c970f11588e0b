"""The two distillation losses, token KL and spatial KL, and their MSE alternatives (the KL-vs-MSE
ablation); definitions: docs/method.md "Losses". All compute in float32 and return float32
scalars; invalid entries contribute neither value nor gradient, whatever they hold (even inf/NaN)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

_MASKED = -1e9   # finite stand-in for -inf: exp underflows to 0, no inf - inf = NaN


def _kl_terms(target_logits: torch.Tensor, student_logits: torch.Tensor, dim: int) -> torch.Tensor:
    """sum over ``dim`` of p_y (log p_y - log p_z); float32 in, float32 out."""
    log_py = F.log_softmax(target_logits, dim=dim)
    log_pz = F.log_softmax(student_logits, dim=dim)
    return (log_py.exp() * (log_py - log_pz)).sum(dim)


def token_kl(*, student: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
             tau: float = 1.0) -> torch.Tensor:
    """student, target: (B, T, D) float; valid: (B, T) bool. Returns a float32 scalar:
    tau^2 * mean over valid tokens of KL(softmax(y/tau) || softmax(z/tau)); 0 if none."""
    _check(student, target, valid)
    keep = valid.unsqueeze(-1)
    z = torch.where(keep, student.float(), 0.0) / tau
    y = torch.where(keep, target.float(), 0.0) / tau
    kl = _kl_terms(y, z, dim=-1)                                          # (B, T)
    kl = torch.where(valid, kl, 0.0)
    return tau * tau * kl.sum() / valid.sum().clamp_min(1)


def spatial_kl(*, student: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
               tau: float = 4.0) -> torch.Tensor:
    """student S, target y: (B, P, D) float over the P map positions; valid: (B, P) bool
    (covered positions). Returns a float32 scalar: tau^2 * KL over positions of each
    channel, averaged over channels and over images with a covered position."""
    _check(student, target, valid)
    keep = valid.unsqueeze(-1)
    s = torch.where(keep, student.float() / tau, _MASKED)
    y = torch.where(keep, target.float() / tau, _MASKED)
    kl = _kl_terms(y, s, dim=1)                                           # (B, D)
    has_any = valid.any(1)                                                # (B,)
    kl = torch.where(has_any.unsqueeze(-1), kl, 0.0)
    return tau * tau * kl.mean(-1).sum() / has_any.sum().clamp_min(1)


def token_mse(*, student: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """student, target: (B, T, D); valid: (B, T) bool. Mean over valid tokens and
    channels of (z - y)^2, float32 scalar; 0 if none."""
    _check(student, target, valid)
    keep = valid.unsqueeze(-1)
    diff = torch.where(keep, student.float() - target.float(), 0.0)
    return diff.pow(2).mean(-1).sum() / valid.sum().clamp_min(1)


def spatial_mse(*, student: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Same as :func:`token_mse` over the covered map positions: (B, P, D), (B, P)."""
    return token_mse(student=student, target=target, valid=valid)


def _check(student: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> None:
    if student.shape != target.shape or valid.shape != student.shape[:2] or valid.dtype != torch.bool:
        raise ValueError(f"loss shapes disagree: student {tuple(student.shape)}, target "
                         f"{tuple(target.shape)}, valid {tuple(valid.shape)} {valid.dtype}; "
                         "expected (B, T, D), (B, T, D), (B, T) bool")
