"""The log files of long jobs (a run folder's ``log.txt``, an extraction's ``STORE.<teacher>.extract.log``):
the files this process has open now, each line timestamped and flushed, and the logs a command
opened (``command_logs``) so that its last line (its outcome, or its one ``Error:`` line) reaches
them after the job has closed them. Only rank 0 opens logs."""
from __future__ import annotations

import os
import shlex
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TextIO

__all__ = ["LOG", "RunLog", "open_log", "log_line", "has_open_logs", "command_logs", "command_line"]

LOG = "log.txt"             # a run folder's log, beside metrics.jsonl

_lock = threading.Lock()
_open: dict[Path, list] = {}            # path -> [file, holders]: the logs open now
_commands: list[list[Path]] = []        # one list per running command: every log it opened


def _stamp(message: str) -> str:
    return f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n"


def command_line() -> str:
    """This process's command line as a shell would take it, with its pid and host."""
    return f"{shlex.join(sys.argv)} (pid {os.getpid()} on {socket.gethostname()})"


class RunLog:
    """A handle on an open log (``open_log``); ``close()`` it once, or use it as a context manager.
    Handles of one path share one file, closed with the last of them."""

    def __init__(self, path: Path):
        self.path, self._closed = path, False

    def write(self, message: str) -> None:
        """Write ``message`` (timestamped) to this log alone."""
        with _lock:
            entry = None if self._closed else _open.get(self.path)
        if entry is not None:
            _write(entry[0], message)

    def close(self) -> None:
        with _lock:
            if self._closed:
                return
            self._closed = True
            entry = _open.get(self.path)
            if entry is not None:
                entry[1] -= 1
                if entry[1] == 0:
                    entry[0].close()
                    del _open[self.path]

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_log(path: str | Path, *, start: str | None = None) -> RunLog:
    """Open the log ``path`` for appending (its folder made) until the handle is closed; from now
    on ``log_line`` writes to it. ``start``: a first line, e.g. the command that opened it."""
    path = Path(path).resolve()
    with _lock:
        entry = _open.get(path)
        if entry is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            entry = _open[path] = [open(path, "a", encoding="utf-8"), 0]
        entry[1] += 1
        for opened in _commands:
            if path not in opened:
                opened.append(path)
    if start is not None:
        _write(entry[0], start)
    return RunLog(path)


def _write(file: TextIO, message: str) -> None:
    try:
        file.write(_stamp(message))
        file.flush()
    except (OSError, ValueError):       # a full disk or a closed file: the log is not worth the job
        pass


def log_line(message: str, *, stream: TextIO | None = None) -> None:
    """Write ``message`` (one line, timestamped) to every open log, and as it is to ``stream`` if given."""
    with _lock:
        files = [entry[0] for entry in _open.values()]
    for file in files:
        _write(file, message)
    if stream is not None:
        print(message, file=stream, flush=True)


def has_open_logs() -> bool:
    """Whether this process has a log open (a progress bar then writes lines to it)."""
    return bool(_open)


@contextmanager
def command_logs() -> Iterator[Callable[[str], None]]:
    """Collect the logs opened while a command runs; yields ``final(message)``, which writes
    ``message`` to each of them, open still or closed since (the command line's last line)."""
    opened: list[Path] = []
    _commands.append(opened)

    def final(message: str) -> None:
        for path in opened:
            with _lock:
                entry = _open.get(path)
            if entry is not None:
                _write(entry[0], message)
                continue
            try:
                with open(path, "a", encoding="utf-8") as file:
                    _write(file, message)
            except OSError:
                pass
    try:
        yield final
    finally:
        _commands.remove(opened)
