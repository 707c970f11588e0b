"""One writer per teacher group: ``STORE.<teacher>.lock`` beside the store (not inside the zarr
group), held with core/lock.py's ``FileLock`` while a writer runs, at the store's resolved path.
Under torchrun the job is the writer: rank 0 holds the lock for all its ranks (ranks own
disjoint shards). Readers never lock."""
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
