"""One writer per teacher group: an advisory lock file beside the store.

``STORE.<teacher>.lock`` (beside, not inside, the zarr group, which warns about foreign
files) is locked with ``flock(LOCK_EX | LOCK_NB)`` for as long as a writer runs. The kernel
releases the lock when the process ends in any way, SIGKILL included, so a stale file
never blocks anyone; the file itself stays (removing it would race with a new holder).
The holder writes who it is (pid, host, start time, command) into the file, and a
refused writer names it. Readers never lock.

Under torchrun the job is the writer: rank 0 holds the lock for all its ranks (extract/
runner.py), since ranks own disjoint shards; a second job is refused at its rank 0.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from store.features import StoreError


class StoreLocked(StoreError):
    """Another process writes the same teacher group; the message names it."""


def lock_path(store_path, teacher: str) -> Path:
    """``STORE.<teacher>.lock`` beside the store folder."""
    store = Path(store_path).absolute()
    return store.with_name(f"{store.name}.{teacher}.lock")


class WriterLock:
    """The exclusive writer lock of one teacher group of a store.

    ``acquire()`` takes it or raises ``StoreLocked`` naming the holder; ``release()`` (or
    the end of the process) gives it back. Also a context manager.
    """

    def __init__(self, store_path, teacher: str):
        self.store = Path(store_path)
        self.teacher = teacher
        self.path = lock_path(store_path, teacher)
        self._fd: int | None = None

    def acquire(self) -> "WriterLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.read(fd, 4096))
            os.close(fd)
            raise StoreLocked(f"{self.store}/{self.teacher}: another extract is writing it ({holder}; "
                              f"lock {self.path}); wait for it to end or stop it") from None
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

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(raw: bytes) -> str:
    try:
        h = json.loads(raw)
        return f"pid {h['pid']} on host {h['host']} since {h['since']}: {h['command']}"
    except (ValueError, KeyError, TypeError):
        return "holder not yet recorded"
