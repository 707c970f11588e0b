"""Teacher adapters A_k(t) = LayerNorm(W_k t + b_k): teacher width C_k -> student width.

Initialised from the teacher's principal components (``init_from_pca``), ``frozen`` or
``trainable`` (with a reconstruction decoder U and its term in one of ``RECON_FORMS``), and
``collapse_monitor``; the rules and defaults are docs/method.md "Adapters"."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from train.config import CHOICES

RECON_FORMS = CHOICES["loss.recon_form"]


class TeacherAdapter(nn.Module):
    """One teacher's adapter A(t) = LayerNorm(W t + b) (docs/method.md "Adapters")."""

    def __init__(self, *, in_dim: int, out_dim: int = 192, trainable: bool = False,
                 name: str = "teacher", recon_form: str = "unexplained_variance"):
        super().__init__()
        if recon_form not in RECON_FORMS:
            raise ValueError(f"adapter {name}: reconstruction form {recon_form!r}; choose one of {RECON_FORMS}")
        self.name, self.recon_form = name, recon_form
        self.in_dim, self.out_dim = in_dim, out_dim
        self.trainable = trainable
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim, eps=1e-6)
        self.decoder = nn.Linear(out_dim, in_dim) if trainable else None
        if not trainable:
            self.requires_grad_(False)

    @torch.no_grad()
    def init_from_pca(self, mean, components) -> None:
        """Set W = components[:out_dim], b = -W @ mean (LayerNorm reset to identity).

        mean: (in_dim,), components: (>= out_dim, in_dim), rows are principal directions
        sorted by decreasing variance; numpy arrays or tensors, any float dtype.
        Raises ValueError naming the teacher on a shape mismatch or non-finite values.
        """
        mean = torch.as_tensor(np.asarray(mean) if not torch.is_tensor(mean) else mean).double()
        comps = torch.as_tensor(np.asarray(components) if not torch.is_tensor(components)
                                else components).double()
        if mean.shape != (self.in_dim,):
            raise ValueError(f"adapter {self.name}: PCA mean has shape {tuple(mean.shape)}, "
                             f"expected ({self.in_dim},)")
        if comps.ndim != 2 or comps.shape[1] != self.in_dim or comps.shape[0] < self.out_dim:
            raise ValueError(f"adapter {self.name}: PCA components have shape {tuple(comps.shape)}, "
                             f"expected (>= {self.out_dim}, {self.in_dim})")
        if not (torch.isfinite(mean).all() and torch.isfinite(comps).all()):
            raise ValueError(f"adapter {self.name}: PCA statistics contain NaN or inf")
        w = comps[: self.out_dim]
        self.proj.weight.copy_(w.float())
        self.proj.bias.copy_((-w @ mean).float())
        self.norm.reset_parameters()

    def linear(self, tokens: torch.Tensor) -> torch.Tensor:
        """W t + b, before the LayerNorm. tokens: (..., in_dim) -> (..., out_dim) float32."""
        return self.proj(tokens.float())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """A(t). tokens: (..., in_dim) any float dtype -> (..., out_dim) float32, always.

        Runs in float32 even under autocast: with the PCA init, W t and b = -W mean are
        large and nearly cancel, so a bf16 matmul (relative error ~2^-8 of |W t|) would
        leave little of the centred coordinates. The adapters are a small part of a step
        (train/flops.py). Frozen adapters run without autograd."""
        with torch.autocast(tokens.device.type, enabled=False), torch.set_grad_enabled(
                self.trainable and torch.is_grad_enabled()):
            return self.norm(self.proj(tokens.float()))

    def reconstruction_loss(self, tokens: torch.Tensor, adapted: torch.Tensor) -> torch.Tensor:
        """The reconstruction term of U A(t) in ``self.recon_form`` (trainable mode only):
        ``squared_error`` is mean_tokens ||U A(t) - t||^2, ``unexplained_variance`` that divided by
        mean_tokens ||t - mean_batch(t)||^2 (detached; 0: perfect, 1: no better than the batch mean).

        tokens: (N, in_dim) the raw tokens, adapted: (N, out_dim) = A(tokens).
        Returns a float32 scalar.
        """
        if self.decoder is None:
            raise RuntimeError(f"adapter {self.name} is frozen and has no reconstruction decoder")
        t = tokens.float()
        with torch.autocast(t.device.type, enabled=False):    # t has a large mean: as forward
            err = (self.decoder(adapted.float()) - t).pow(2).sum(-1).mean()
        if self.recon_form == "squared_error":
            return err
        with torch.no_grad():
            var = (t - t.mean(0, keepdim=True)).pow(2).sum(-1).mean().clamp_min(1e-12)
        return err / var


class TeacherModules(nn.ModuleDict):
    """A ModuleDict keyed by teacher name. A module's name cannot hold ".", which a timm teacher's
    name may (``timm:vit_base_patch16_clip_224.openai``): it is kept under the name with "."
    replaced by "_" (its key in checkpoints), two names that map to one key being refused."""

    def __init__(self, modules=None):
        super().__init__()
        self._names: dict[str, str] = {}
        for name, module in dict(modules or {}).items():
            self[name] = module

    @staticmethod
    def key(name: str) -> str:
        return name.replace(".", "_")

    def __setitem__(self, name: str, module: nn.Module) -> None:
        key = self.key(name)
        if self._names.setdefault(key, name) != name:
            raise ValueError(f"teachers {self._names[key]} and {name} would share the module name {key}")
        super().__setitem__(key, module)

    def __getitem__(self, name: str) -> nn.Module:
        return super().__getitem__(self.key(name))

    def __contains__(self, name: str) -> bool:
        return self.key(name) in self._modules

    def __iter__(self):
        return iter(self.keys())

    def keys(self):
        return [self._names[k] for k in self._modules]

    def items(self):
        return [(self._names[k], m) for k, m in self._modules.items()]


def collapse_monitor(targets: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between different tokens: a collapse alarm.

    targets: (N, D) float, N >= 2. Returns a float32 scalar in [-1/(N-1), 1]; 1 means
    all tokens point the same way (collapse). O(N D): uses ||sum of unit vectors||^2.
    No gradient.
    """
    with torch.no_grad():
        u = nn.functional.normalize(targets.float(), dim=-1)
        n = u.shape[0]
        total = u.sum(0).pow(2).sum()
        self_sim = u.pow(2).sum()          # = number of non-zero tokens
        return (total - self_sim) / max(n * (n - 1), 1)


def fit_pca(tokens: torch.Tensor, *, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA of a token sample: tokens (N, C) float -> (mean (C,), components (k, C)) float32,
    rows sorted by decreasing variance. Helper for tests and small runs; stores
    compute their own statistics."""
    x = tokens.double()
    mean = x.mean(0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    if vh.shape[0] < k:
        raise ValueError(f"fit_pca: {k} components asked, only {vh.shape[0]} available "
                         f"from {tuple(tokens.shape)} tokens")
    return mean.float(), vh[:k].float()
