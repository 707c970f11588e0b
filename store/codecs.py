"""Token codecs: how a teacher's (n, T, 768) float tokens become stored arrays and back.

Each codec maps tokens to a dict of plain arrays (only zarr v3 specification codecs are
used on disk, so any zarr v3 reader can open them) and back:

- ``fp16``: ``tokens`` float16 (n, T, C).
- ``int8``: ``tokens`` int8 (n, T, C) and ``scale`` float16 (n, T), symmetric per token:
  ``t ~= q * scale`` with ``scale = max|t| / 127``.
- ``pca``: ``coeffs`` float16 (n, T, P) on the teacher's top-P principal directions,
  ``t ~= mean + coeffs @ basis``. The frozen adapters (the default) are initialised from
  the same principal directions and use the top 192, so with P >= 192 the adapter
  output is exact up to float16 rounding while the store is C / P times smaller.
"""
from __future__ import annotations

import numpy as np
import torch

CODECS = ("fp16", "int8", "pca")
PCA_DIM = 256


def payload_arrays(codec: str, tokens_shape: tuple[int, int], *, pca_dim: int = PCA_DIM) -> dict:
    """Stored arrays of one sample: name -> (per-sample shape, dtype). tokens_shape = (T, C)."""
    T, C = tokens_shape
    if codec == "fp16":
        return {"tokens": ((T, C), "float16")}
    if codec == "int8":
        return {"tokens": ((T, C), "int8"), "scale": ((T,), "float16")}
    if codec == "pca":
        return {"coeffs": ((T, pca_dim), "float16")}
    raise ValueError(f"unknown codec {codec!r}; choose one of {CODECS}")


def encode(codec: str, tokens: torch.Tensor, *, pca: dict | None = None) -> dict[str, np.ndarray]:
    """Encode tokens (n, T, C) float (any device) to numpy arrays for the store."""
    t = tokens.float()
    if codec == "fp16":
        return {"tokens": t.half().cpu().numpy()}
    if codec == "int8":
        scale = t.abs().amax(dim=-1).clamp_min(1e-8) / 127.0
        scale = scale.half().float()                       # quantise with the stored scale
        q = torch.round(t / scale[..., None]).clamp_(-127, 127).to(torch.int8)
        return {"tokens": q.cpu().numpy(), "scale": scale.half().cpu().numpy()}
    if codec == "pca":
        if pca is None:
            raise ValueError("the pca codec needs the teacher's statistics (mean, basis)")
        mean = torch.as_tensor(pca["mean"], device=t.device, dtype=torch.float32)
        basis = torch.as_tensor(pca["basis"], device=t.device, dtype=torch.float32)
        return {"coeffs": ((t - mean) @ basis.T).half().cpu().numpy()}
    raise ValueError(f"unknown codec {codec!r}; choose one of {CODECS}")


def decode(codec: str, arrays: dict, *, pca: dict | None = None,
           device: torch.device | str | None = None) -> torch.Tensor:
    """Stored arrays (numpy or torch, leading dims (..., T)) -> float32 tokens (..., T, C)."""
    def as_t(x):
        return torch.as_tensor(x, device=device)

    if codec == "fp16":
        return as_t(arrays["tokens"]).float()
    if codec == "int8":
        return as_t(arrays["tokens"]).float() * as_t(arrays["scale"]).float()[..., None]
    if codec == "pca":
        if pca is None:
            raise ValueError("the pca codec needs the teacher's statistics (mean, basis)")
        c = as_t(arrays["coeffs"]).float()
        basis = as_t(pca["basis"]).float()
        return c @ basis + as_t(pca["mean"]).float()
    raise ValueError(f"unknown codec {codec!r}; choose one of {CODECS}")
