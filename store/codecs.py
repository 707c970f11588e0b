"""Token codecs: how a teacher's (n, T, C) float tokens become stored arrays and back: ``fp16``,
``int8`` (per-token scale), ``pca`` (top-P principal coordinates) and ``adapter`` (the 192
whitened coordinates the frozen adapters read, int8). ``pca`` and ``adapter`` encode with the
teacher's statistics. Formats, sizes and fidelity: docs/format.md, "Codecs"."""
from __future__ import annotations

import numpy as np
import torch

from core.errors import ExpectedError

CODECS = ("fp16", "int8", "pca", "adapter")
PCA_DIM = 256
ADAPTER_DIM = 192           # the frozen adapters' width (the student's), docs/method.md
NEEDS_STATS = ("pca", "adapter")          # codecs that encode with the statistics
FULL_TOKENS = ("fp16", "int8")            # codecs a trainable adapter can learn from (the full width)


class CodecError(ExpectedError, ValueError):
    """A codec that cannot encode faithfully with the statistics it is given."""


def statistics_problem(codec: str, count: int, *, pca_dim: int = PCA_DIM) -> str | None:
    """Why ``codec``'s basis cannot come from ``count`` statistics tokens, or None.

    n tokens span at most n - 1 directions about their mean; a coefficient codec keeping P
    coefficients needs n > P, else the last directions are noise with near-zero eigenvalues:
    the adapter codec's whitening inflates them and its per-token int8 scale wipes out the real
    coefficients (cosine after the adapter 0.37 with 99 tokens, >= 0.9997 from 198)."""
    dim = stored_dim(codec, pca_dim)
    if dim and count <= dim:
        return (f"codec {codec} keeps {dim} coefficients per token but its statistics come from only "
                f"{count} tokens (at least {dim + 1} are needed); sample more images (extract --stats-images, "
                f"on a larger set) or use --codec {' or '.join(FULL_TOKENS)}")
    return None


def basis_digest(stats: dict) -> str:
    """sha256 of the statistics a coefficient codec encodes on (mean, components): two stores
    with equal digests hold coefficients of one basis, which one set of adapters reads alike."""
    import hashlib

    h = hashlib.sha256()
    for key in ("mean", "components"):
        h.update(np.ascontiguousarray(stats[key], dtype=np.float32).tobytes())
    return h.hexdigest()


def stored_dim(codec: str, pca_dim: int = PCA_DIM) -> int:
    """Coefficients per token the codec keeps (0: the full tokens)."""
    return {"pca": int(pca_dim), "adapter": ADAPTER_DIM}.get(codec, 0)


def statistics(codec: str, stats: dict, *, pca_dim: int = PCA_DIM) -> dict | None:
    """What ``encode``/``decode`` take as ``pca`` for ``codec``, from a teacher's statistics
    (``mean`` (C,), ``components`` (C, C), ``eigenvalues`` (C,)); None for fp16 and int8."""
    if codec not in NEEDS_STATS:
        return None
    dim = stored_dim(codec, pca_dim)
    return {"mean": stats["mean"], "basis": stats["components"][:dim],
            "sqrt_eig": np.sqrt(np.maximum(stats["eigenvalues"][:dim], 1e-12)).astype(np.float32)}


def payload_arrays(codec: str, tokens_shape: tuple[int, int], *, pca_dim: int = PCA_DIM) -> dict:
    """Stored arrays of one sample: name -> (per-sample shape, dtype). tokens_shape = (T, C)."""
    T, C = tokens_shape
    if codec == "fp16":
        return {"tokens": ((T, C), "float16")}
    if codec == "int8":
        return {"tokens": ((T, C), "int8"), "scale": ((T,), "float16")}
    if codec == "pca":
        return {"coeffs": ((T, pca_dim), "float16")}
    if codec == "adapter":
        return {"coeffs": ((T, ADAPTER_DIM), "int8"), "scale": ((T,), "float16")}
    raise ValueError(f"unknown codec {codec!r}; choose one of {CODECS}")


def encode(codec: str, tokens: torch.Tensor, *, pca: dict | None = None) -> dict[str, np.ndarray]:
    """Encode tokens (n, T, C) float (any device) to numpy arrays for the store."""
    t = tokens.float()
    if codec == "fp16":
        return {"tokens": t.half().cpu().numpy()}
    if codec == "int8":
        q, scale = _int8_per_token(t)
        return {"tokens": q, "scale": scale}
    if codec in NEEDS_STATS:
        if pca is None:
            raise ValueError(f"the {codec} codec needs the teacher's statistics (mean, basis)")
        mean = torch.as_tensor(pca["mean"], device=t.device, dtype=torch.float32)
        basis = torch.as_tensor(pca["basis"], device=t.device, dtype=torch.float32)
        c = (t - mean) @ basis.T
        if codec == "pca":
            return {"coeffs": c.half().cpu().numpy()}
        q, scale = _int8_per_token(c / torch.as_tensor(pca["sqrt_eig"], device=t.device, dtype=torch.float32))
        return {"coeffs": q, "scale": scale}
    raise ValueError(f"unknown codec {codec!r}; choose one of {CODECS}")


def _int8_per_token(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one float16 step per token: x (..., D) float32 -> (q int8 (..., D),
    scale float16 (...)), ``x ~= q * scale``, ``scale = max|x| / 127``, quantised with the
    stored (float16) scale."""
    scale = (x.abs().amax(dim=-1).clamp_min(1e-8) / 127.0).half().float()
    q = torch.round(x / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.cpu().numpy(), scale.half().cpu().numpy()


def decode(codec: str, arrays: dict, *, pca: dict | None = None,
           device: torch.device | str | None = None) -> torch.Tensor:
    """Stored arrays (numpy or torch, leading dims (..., T)) -> float32 tokens (..., T, C)."""
    def as_t(x):
        return torch.as_tensor(x, device=device)

    if codec == "fp16":
        return as_t(arrays["tokens"]).float()
    if codec == "int8":
        return as_t(arrays["tokens"]).float() * as_t(arrays["scale"]).float()[..., None]
    if codec in NEEDS_STATS:
        if pca is None:
            raise ValueError(f"the {codec} codec needs the teacher's statistics (mean, basis)")
        c = as_t(arrays["coeffs"]).float()
        if codec == "adapter":
            c = c * as_t(arrays["scale"]).float()[..., None] * as_t(pca["sqrt_eig"]).float()
        basis = as_t(pca["basis"]).float()
        return c @ basis + as_t(pca["mean"]).float()
    raise ValueError(f"unknown codec {codec!r}; choose one of {CODECS}")
