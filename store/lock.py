"""One writer per teacher group: an advisory lock file beside the store.

``STORE.<teacher>.lock`` (beside, not inside, the zarr group, which warns about foreign
files) is held with core/lock.py's ``FileLock`` for as long as a writer runs: the kernel
frees it when the process ends in any way, and a refused writer names the holder (pid,
host, start time, command). The store's path is resolved first, so a path through a
symlink meets the same lock as the real one. Readers never lock.

Under torchrun the job is the writer: rank 0 holds the lock for all its ranks (extract/
runner.py), since ranks own disjoint shards; a second job is refused at its rank 0.
"""
from __future__ import annotations

from pathlib import Path

from core.lock import FileLock
from core.errors import StoreError


class StoreLocked(StoreError):
    """Another process writes the same teacher group; the message names it."""


def lock_path(store_path, teacher: str) -> Path:
    """``STORE.<teacher>.lock`` beside the store folder (its resolved path)."""
    store = Path(store_path).resolve()
    return store.with_name(f"{store.name}.{teacher}.lock")


class WriterLock(FileLock):
    """The exclusive writer lock of one teacher group of a store: ``acquire()`` takes it or
    raises ``StoreLocked`` naming the holder; ``release()`` (or the end of the process) gives
    it back. Also a context manager."""

    error = StoreLocked

    def __init__(self, store_path, teacher: str):
        self.store, self.teacher = Path(store_path), teacher
        super().__init__(lock_path(store_path, teacher), busy=f"{self.store}/{teacher}: another extract is writing it")
