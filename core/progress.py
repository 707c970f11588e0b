"""Progress bars: one place decides whether a tqdm bar is drawn: only when the caller asks for one,
on rank 0 of a distributed job, and when stderr is a terminal (a log file, a pipe or a captured
test run gets no bar)."""
from __future__ import annotations

import os
import sys

__all__ = ["progress_bar", "show_progress"]


def _rank() -> int:
    torch = sys.modules.get("torch")          # torch is not imported for this
    dist = getattr(torch, "distributed", None) if torch is not None else None
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def show_progress(progress: bool = True, stream=None) -> bool:
    """Whether a bar should be drawn: asked for, rank 0, and ``stream`` (default stderr) a terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(progress) and _rank() == 0 and callable(isatty) and bool(isatty())


def progress_bar(iterable=None, *, progress: bool = True, **kwargs):
    """``tqdm(iterable, **kwargs)`` with ``disable`` decided by ``show_progress`` (a caller's
    own ``disable=True`` still turns it off)."""
    from tqdm import tqdm

    kwargs["disable"] = kwargs.get("disable", False) or not show_progress(progress, kwargs.get("file"))
    return tqdm(iterable, **kwargs)
