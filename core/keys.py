"""The project's one root of randomness: the keyed hash every draw comes from, the role ids of its
keys (``Role``) and the integer seeds derived from keys for generators that need one.

A value is a hash of its keys, never the next output of a stateful stream, so a draw depends only
on its keys. A role keeps two quantities off one stream. Role ids are part of what is stored:
never renumber one, give a new quantity a new id (``unique`` refuses two names for one id)."""
from __future__ import annotations

import hashlib
from enum import IntEnum, unique

import numpy as np


@unique
class Role(IntEnum):
    # data/views.py. The cached views, keyed by (seed, index, view), stored in every feature store:
    CROP = 1              # crop (area, ratio, top, left; 10 attempts)
    FLIP = 2
    TEACHER = 3           # a teacher's mask (its key id is a key too)
    STUDENT = 4           # the student's mask, keyed by (seed, index, epoch); not stored
    STATS = 5             # the statistics sample, keyed by (seed, index); stored (stats/indices)
    # data/order.py, keyed by (seed, epoch); not stored (a checkpoint records seed and step)
    SHARD_ORDER = 11
    SAMPLE_ORDER = 12
    # data/pack.py: the packing order of ``prepare``, keyed by (seed, listing position); stored: it
    # fixes which image every sample index of a prepared set is
    PACK_ORDER = 21
    # data/views.py: fresh views of online-fresh training, keyed by (seed, index, epoch); not stored
    FRESH_CROP = 31
    FRESH_FLIP = 32
    FRESH_TEACHER = 33
    # train/noise.py: torch's global generators (stochastic depth), keyed by (seed, rank) at the start
    # of a run and by (seed, rank, step) when a resume cannot restore each rank's own state; not
    # stored (checkpoints hold the generator states)
    NOISE = 41


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijective avalanche on uint64 arrays (wrapping multiply)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * _M1
        x = x ^ (x >> np.uint64(27))
        x = x * _M2
        return x ^ (x >> np.uint64(31))


def hash_keys(*keys) -> np.ndarray:
    """Hash integer keys (scalars or broadcastable arrays, all >= 0) to uint64.

    ``hash_keys(a, b, c)[j] == hash_keys(a[j], b[j], c[j])`` for every j: the value of
    one element never depends on the other elements of a batch.
    """
    h = np.zeros((), dtype=np.uint64)
    for k in keys:
        k = np.asarray(k)
        if k.dtype.kind not in "iu":
            raise TypeError(f"hash keys must be integers, got {k.dtype}")
        if k.dtype.kind == "i" and k.size and k.min() < 0:
            raise ValueError("hash keys must be non-negative")
        with np.errstate(over="ignore"):
            h = _mix(h ^ _mix(k.astype(np.uint64) + _GOLDEN))
    return h


def uniform(*keys) -> np.ndarray:
    """Uniform float64 in [0, 1) from the keys: (broadcast shape of keys,)."""
    return (hash_keys(*keys) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def derive_seed(*keys: int) -> int:
    """A 32-bit seed from integer keys (counter-based: same keys, same seed): the evaluations'
    generators (numpy's SeedSequence of the keys)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def name_seed(name: str, seed: int = 0) -> int:
    """A 63-bit torch seed from (name, seed): a random-init teacher's weights, so that different
    teachers get different weights (sha256 of the pair)."""
    digest = hashlib.sha256(f"comad-teacher-init|{name}|{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
