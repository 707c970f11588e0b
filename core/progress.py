"""Progress bars: one place decides whether a tqdm bar is drawn: only when the caller asks for one,
on rank 0 of a distributed job, and when stderr is a terminal. Where it is not (a batch job's log, a
pipe, a captured test run), rank 0 prints a plain line per interval instead (COMAD_LOG_INTERVAL
seconds, default 30, and the last); the open run logs (core/log.py) get those lines either way."""
from __future__ import annotations

import datetime
import os
import sys
import time

from core.log import has_open_logs, log_line

__all__ = ["progress_bar", "show_progress", "log_interval"]

INTERVAL = 30.0         # seconds between two lines, unless COMAD_LOG_INTERVAL says otherwise


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


def log_interval() -> float:
    """Seconds between two progress lines: COMAD_LOG_INTERVAL, default 30 (0: a line per update)."""
    text = os.environ.get("COMAD_LOG_INTERVAL", "").strip()
    if not text:
        return INTERVAL
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"COMAD_LOG_INTERVAL={text!r}: give the seconds between two progress lines (0 or more)")
    return value


def progress_bar(iterable=None, *, progress: bool = True, **kwargs) -> "Progress":
    """``tqdm(iterable, **kwargs)`` with ``disable`` decided by ``show_progress`` (a caller's
    own ``disable=True`` still turns it off), wrapped in a ``Progress`` that also writes the
    interval lines: to the open run logs, and to the stream (stderr) on rank 0 when it is not
    a terminal and ``progress`` is on."""
    from tqdm import tqdm

    off = bool(kwargs.get("disable", False))
    stream = kwargs.get("file")
    kwargs["disable"] = off or not show_progress(progress, stream)
    bar = tqdm(iterable, **kwargs)
    console = not off and bool(progress) and _rank() == 0 and bar.disable
    return Progress(bar, iterable, desc=kwargs.get("desc"), unit=kwargs.get("unit", "it"),
                    initial=int(kwargs.get("initial", 0) or 0), lines=not off,
                    stream=(sys.stderr if stream is None else stream) if console else None)


class Progress:
    """A tqdm bar (``update``, ``set_postfix``, ``close``, iteration) that also writes one plain
    line per interval and the last one (once ``total`` is reached, or the iterable is done):
    ``train (cached): step 150/1000 (15%) loss=1.2345 img_s=812.3 0.52 step/s eta 0:27:03``."""

    def __init__(self, bar, iterable, *, desc: str | None, unit: str, initial: int, lines: bool, stream):
        self.bar, self._iterable, self.desc, self.unit = bar, iterable, desc, unit
        self.total = bar.total
        self.n = self._start = self._shown = initial
        self._lines, self._stream = lines, stream
        self._interval = log_interval() if lines else 0.0
        self._t0 = self._last = time.monotonic()
        self._postfix: dict[str, str] = {}
        self._shown_postfix: dict[str, str] = {}

    def __iter__(self):
        for item in self._iterable:
            yield item
            self.update(1)
        if self.total is None:
            self.total = self.n
        self.close()

    def __len__(self) -> int:
        return len(self.bar)

    def __getattr__(self, name):            # what else tqdm has (disable, postfix, ...)
        if name == "bar":
            raise AttributeError(name)
        return getattr(self.bar, name)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        self.n += n
        if self._lines and time.monotonic() - self._last >= self._interval:
            self._line()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        self.bar.set_postfix(ordered_dict, refresh=refresh, **kwargs)
        self._postfix = {str(k): str(v) for k, v in {**dict(ordered_dict or {}), **kwargs}.items()}

    def close(self) -> None:
        done = self.total is not None and self.n >= self.total
        if self._lines and done and (self.n != self._shown or self._postfix != self._shown_postfix):
            self._line()
        self._lines = False
        self.bar.close()

    def _line(self) -> None:
        """Write the line of now (when there is anywhere to write it)."""
        self._last = time.monotonic()
        if self._stream is None and not has_open_logs():
            return
        self._shown, self._shown_postfix = self.n, dict(self._postfix)
        elapsed = self._last - self._t0
        rate = (self.n - self._start) / elapsed if elapsed > 0 else 0.0
        count = f"{self.unit} {self.n}" if self.total is None else \
            f"{self.unit} {self.n}/{self.total} ({100 * self.n // max(self.total, 1)}%)"
        parts = [f"{self.desc}: {count}" if self.desc else count]
        parts += [f"{k}={v}" for k, v in self._postfix.items()]
        parts.append(f"{rate:.2f} {self.unit}/s" if rate < 100 else f"{rate:.0f} {self.unit}/s")
        if self.total is not None and self.n >= self.total:
            parts.append(f"done in {_clock(elapsed)}")
        elif self.total is not None and rate > 0:
            parts.append(f"eta {_clock((self.total - self.n) / rate)}")
        log_line(" ".join(parts), stream=self._stream)


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))
