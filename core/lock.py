"""One writer at a time: an advisory ``flock`` on a file that names its holder (pid, host, start
time, command), held while the writer runs. The kernel frees it when the process ends in any way,
SIGKILL included; the file stays (removing it would race with a new holder). Keyed on the file's
resolved path, so a path through a symlink meets the same lock. Readers never lock."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

__all__ = ["FileLock", "Locked"]


class Locked(OSError):
    """Another process holds the lock; the message names it."""


class FileLock:
    """The exclusive lock on the file ``path`` (made on first use).

    ``acquire()`` takes it or raises ``error`` (a class attribute, ``Locked`` here):
    ``"{busy} (pid P on host H since T: COMMAND; lock PATH); wait for it to end or stop it"``;
    ``release()`` (or the end of the process) gives it back. Also a context manager.
    """

    error: type[Exception] = Locked

    def __init__(self, path, *, busy: str):
        self.path = Path(path).resolve()
        self.busy = busy
        self._fd: int | None = None

    def acquire(self) -> "FileLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.read(fd, 4096))
            os.close(fd)
            raise self.error(f"{self.busy} ({holder}; lock {self.path}); wait for it to end or stop it") from None
        me = dict(pid=os.getpid(), host=socket.gethostname(), since=time.strftime("%Y-%m-%d %H:%M:%S"),
                  command=" ".join(sys.argv))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)          # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(raw: bytes) -> str:
    try:
        h = json.loads(raw)
        return f"pid {h['pid']} on host {h['host']} since {h['since']}: {h['command']}"
    except (ValueError, KeyError, TypeError):
        return "holder not yet recorded"
