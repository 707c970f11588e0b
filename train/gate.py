"""The per-token consensus gate (docs/method.md "Consensus gate"): per-teacher fusion weights at every
position (``gate_weights``, no autograd) and the fused targets (``fuse``), vectorised over teachers,
batch and positions."""
from __future__ import annotations

import torch
import torch.nn.functional as F

GATE_MODES = ("uniform", "affinity", "agreement", "consensus")


def gate_weights(*, student: torch.Tensor, adapted: torch.Tensor, seen: torch.Tensor,
                 mode: str = "consensus", tau: float = 0.1) -> torch.Tensor:
    """Per-teacher, per-position fusion weights. At position p (CLS and patches alike), with K(p)
    the teachers that saw p, a_k(p) their adapted tokens and u(p) the student's token there:

        affinity   s_k(p) = cos(u(p), a_k(p))
        agreement  c_k(p) = mean_{j in K(p), j != k} cos(a_k(p), a_j(p))   (0 if k is alone)
        weights    w_k(p) = softmax_{k in K(p)} (logit_k(p) / tau_g)

    with logit = 0 (``uniform``), s (``affinity``), c (``agreement``) or s + c (``consensus``).

    student: (B, P, D) the student's token at every position (any float dtype).
    adapted: (K, B, P, D) adapted teacher tokens, any value where unseen.
    seen:    (K, B, P) bool, True where teacher k saw position p.
    Returns w: (K, B, P) float32, no grad; sums to 1 over k where any teacher saw p,
    0 for unseen teachers and for positions no teacher saw.
    """
    if mode not in GATE_MODES:
        raise ValueError(f"gate mode {mode!r} is not one of {list(GATE_MODES)}")
    if adapted.ndim != 4 or seen.shape != adapted.shape[:3] or student.shape != adapted.shape[1:]:
        raise ValueError(f"gate shapes disagree: student {tuple(student.shape)}, adapted "
                         f"{tuple(adapted.shape)}, seen {tuple(seen.shape)}; expected (B, P, D), "
                         "(K, B, P, D), (K, B, P)")
    with torch.no_grad():
        seen_f = seen.float()
        a_hat = F.normalize(adapted.float(), dim=-1) * seen_f.unsqueeze(-1)     # (K, B, P, D)
        logits = torch.zeros_like(seen_f)
        if mode in ("affinity", "consensus"):
            u_hat = F.normalize(student.float(), dim=-1)                        # (B, P, D)
            logits = logits + (a_hat * u_hat.unsqueeze(0)).sum(-1)
        if mode in ("agreement", "consensus"):
            total = a_hat.sum(0, keepdim=True)                                  # (1, B, P, D)
            others = (a_hat * (total - a_hat)).sum(-1)                          # sum_{j != k} cos
            n_others = (seen_f.sum(0, keepdim=True) - 1.0).clamp_min(1.0)
            logits = logits + others / n_others
        logits = (logits / tau).masked_fill(~seen, float("-inf"))
        any_seen = seen.any(0, keepdim=True)
        logits = torch.where(any_seen, logits, torch.zeros_like(logits))       # avoid NaN rows
        return torch.softmax(logits, dim=0) * any_seen.float()


def fuse(*, adapted: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """y = sum_k w_k a_k. adapted: (K, B, P, D), weights: (K, B, P) (no grad) ->
    (B, P, D) in adapted's dtype; zero where no teacher saw p. Gradient flows to
    ``adapted`` only (where its weight is non-zero)."""
    return (weights.detach().to(adapted.dtype).unsqueeze(-1) * adapted).sum(0)
