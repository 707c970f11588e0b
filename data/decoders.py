"""The image decoders a job may name (``pil``, the reference, over a thread pool; ``dali``, the
fast path from the optional extra ``.[dali]``; ``torchvision``, torchvision's batched JPEG
decoder, nvJPEG on a GPU; ``auto``: ``resolve_decoder``), and the errors of decoding:
``DaliMissing`` (one line naming the extra) and ``DecodeError`` naming the image
(``sample_name``). Light on purpose (no torch; DALI is looked up, never imported): the command
line takes its choices from here."""
from __future__ import annotations

import importlib.util

from core.errors import ExpectedError

AUTO = "auto"
DECODERS = (AUTO, "dali", "pil", "torchvision")
DALI_EXTRA = "pip install '.[dali]' (CUDA 13) or '.[dali-cuda12]' (CUDA 12)"
DECODER_HELP = "Image decoder: dali (NVIDIA DALI, GPU decoder on CUDA; the extra " + DALI_EXTRA + \
    "), pil (the reference, on a thread pool), torchvision (batched decode_jpeg, nvJPEG on CUDA; other " \
    "formats by PIL) or auto (dali where it is installed, else torchvision on a CUDA device, else pil)."


class DaliMissing(ExpectedError, ImportError):
    """A DALI decoder was asked for where NVIDIA DALI is not installed."""


class DecodeError(ExpectedError, RuntimeError):
    """A decoder failed on a sample of a batch; the message names the sample (``sample_name``)."""


def sample_name(datas, k: int, keys=None) -> str:
    """Sample ``k`` of a batch for messages: ``keys[k]`` if given, else the ``origin`` that
    ``ImageSet.read`` gave its bytes (``image <i> (<source>, in <shard tar>)``), else its
    position in the batch."""
    if keys is not None:
        return str(keys[k])
    return getattr(datas[k], "origin", None) or f"sample {k} of the batch"


def dali_installed() -> bool:
    """Whether ``nvidia.dali`` can be imported here (looked up, not imported)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):    # no ``nvidia`` package at all, or an import hook refused it
        return False


def require_dali() -> None:
    """Raise DaliMissing, one line naming the extra, unless DALI is installed."""
    if not dali_installed():
        raise DaliMissing(f"decoder=dali needs NVIDIA DALI (nvidia.dali), which is not installed: "
                          f"install the extra, {DALI_EXTRA}, or choose decoder=pil (or auto)")


def resolve_decoder(kind: str, device=None) -> str:
    """The decoder that a name of ``DECODERS`` stands for on ``device`` (a torch device or its
    name; None: not known, as the CPU): ``auto`` is ``dali`` where DALI is installed, else
    ``torchvision`` on a CUDA device, else ``pil``; another name is itself."""
    if kind not in DECODERS:
        raise ValueError(f"unknown decoder {kind!r}; choose one of {', '.join(DECODERS)}")
    if kind == AUTO:
        if dali_installed():
            return "dali"
        return "torchvision" if str(device).split(":")[0] == "cuda" else "pil"
    return kind
