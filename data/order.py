"""The training order: which samples global batch k of epoch e holds, and which rank serves which
part of it, from (seed, epoch, step) alone and independent of the world size; ``auto_streams``
resolves ``data.streams=auto``. The rules: docs/CONTRACTS.md, "The training order"."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from core.keys import Role, hash_keys

AUTO_STREAMS = (8, 4, 2, 1)       # data.streams=auto picks from these, most first
AUTO_STREAMS_KEEP = 0.9           # ... keeping at least this share of one stream's steps


def _dealt(counts: np.ndarray, *, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(shards in dealing order (n,), each shard's place in the shuffle (n,)) at ``epoch``."""
    keys = hash_keys(seed, epoch, Role.SHARD_ORDER, np.arange(len(counts)))
    shuffled = np.argsort(keys, kind="stable")
    place = np.empty(len(counts), dtype=np.int64)
    place[shuffled] = np.arange(len(counts))
    return shuffled[np.argsort(-counts[shuffled], kind="stable")], place


def stream_shards(counts: Sequence[int], *, seed: int, epoch: int, stream: int, streams: int) -> np.ndarray:
    """Image shards (of ``counts`` samples each) that stream ``stream`` of ``streams`` reads at
    ``epoch``, in order: (n,) int64, n = len(counts) // streams or one more."""
    dealt, place = _dealt(np.asarray(counts, dtype=np.int64), seed=seed, epoch=epoch)
    mine = dealt[stream::streams]
    return mine[np.argsort(place[mine], kind="stable")]


def _counts(shards: Sequence) -> np.ndarray:
    return np.array([c for _, c in shards], dtype=np.int64)


def _window_samples(shards: Sequence, ids: np.ndarray, *, seed: int, epoch: int) -> np.ndarray:
    """The samples of the shards ``ids`` (w,), shuffled: (sum of their counts,) int64."""
    idx = np.concatenate([np.arange(shards[k][0], shards[k][0] + shards[k][1]) for k in ids])
    keys = hash_keys(seed, epoch, Role.SAMPLE_ORDER, idx)
    return idx[np.argsort(keys, kind="stable")]


def stream_windows(shards: Sequence, *, seed: int, epoch: int, stream: int, streams: int,
                   window: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The stream's windows at ``epoch``: [(shard ids (w,), shuffled sample indices (n_w,))],
    w <= ``window`` shards each; their samples, in order, are the stream's epoch."""
    mine = stream_shards(_counts(shards), seed=seed, epoch=epoch, stream=stream, streams=streams)
    return [(mine[a:a + window], _window_samples(shards, mine[a:a + window], seed=seed, epoch=epoch))
            for a in range(0, len(mine), window)]


def stream_span(shards: Sequence, *, seed: int, epoch: int, stream: int, streams: int, window: int,
                start: int, stop: int) -> np.ndarray:
    """Positions ``start .. stop - 1`` of the stream's epoch (the concatenated samples of
    ``stream_windows``), shuffling only the windows they lie in: (stop - start,) int64."""
    mine = stream_shards(_counts(shards), seed=seed, epoch=epoch, stream=stream, streams=streams)
    groups = [mine[a:a + window] for a in range(0, len(mine), window)]
    ends = np.cumsum([sum(shards[k][1] for k in ids) for ids in groups])
    if not 0 <= start < stop <= (ends[-1] if len(ends) else 0):
        raise IndexError(f"positions {start}..{stop - 1} are outside stream {stream}'s epoch")
    first, last = np.searchsorted(ends, [start, stop - 1], side="right")
    got = np.concatenate([_window_samples(shards, groups[w], seed=seed, epoch=epoch)
                          for w in range(first, last + 1)])
    offset = start - (ends[first - 1] if first else 0)
    return got[offset:offset + stop - start]


def stream_guarantee(shards: Sequence, *, streams: int) -> int:
    """Samples of the shortest stream, the same in every epoch: the shards dealt largest first,
    one to each stream in turn, give stream j the sizes j, j + S, ... of the sorted counts."""
    dealt = -np.sort(-_counts(shards))
    return int(min(dealt[j::streams].sum() for j in range(streams)))


def steps_per_epoch(shards: Sequence, *, global_batch: int, streams: int) -> int:
    """Steps every stream can feed in any epoch (``stream_guarantee`` // the per-stream slice;
    the rest of an epoch is dropped), so every global batch of every epoch is full and every
    rank takes the same steps. Raises ValueError when that is 0."""
    steps = stream_guarantee(shards, streams=streams) // (global_batch // streams)
    if steps == 0:
        size = max(c for _, c in shards)
        raise ValueError(f"{len(shards)} image shards of up to {size} samples are too few for a global batch "
                         f"of {global_batch} over {streams} streams; use a smaller batch, fewer "
                         "streams (data.streams) or more data")
    return steps


def auto_streams(shards: Sequence, *, global_batch: int) -> int:
    """``data.streams=auto``: the most streams of ``AUTO_STREAMS`` that divide the global batch
    and give at least ``AUTO_STREAMS_KEEP`` of the steps per epoch one stream gives (each
    stream drops its last partial slice and the shards it cannot be sure of).

    A function of the shards and the global batch only, never of the world size, so every
    world size resolves it alike. Raises ValueError when the data is too small for even one
    stream."""
    one = steps_per_epoch(shards, global_batch=global_batch, streams=1)
    for s in AUTO_STREAMS:
        if global_batch % s:
            continue
        try:
            steps = steps_per_epoch(shards, global_batch=global_batch, streams=s)
        except ValueError:
            continue
        if steps >= AUTO_STREAMS_KEEP * one:
            return s
    return 1


@dataclass
class Order:
    """The order of one run on one rank: shards ``[[first, count], ...]``, the root seed, the
    global ``batch_size``, this ``rank`` of ``world``, ``window`` shards per shuffle window and
    ``streams``. This rank serves ``batch_size / world`` samples a step: the whole slices of
    its streams, or, with fewer streams than ranks, its part of one stream's slice.

    Raises ValueError (naming the config keys) when neither of streams and world is a multiple
    of the other, or the batch is not divisible by the streams or the world."""
    shards: Sequence
    seed: int
    batch_size: int
    rank: int = 0
    world: int = 1
    window: int = 4
    streams: int = 1

    def __post_init__(self):
        if self.streams % self.world and self.world % self.streams:
            raise ValueError(f"data.streams={self.streams} and the world size {self.world}: one must be "
                             "a multiple of the other")
        if self.batch_size % self.streams:
            raise ValueError(f"train.batch_size={self.batch_size} must be a multiple of data.streams={self.streams}")
        if self.batch_size % self.world:
            raise ValueError(f"train.batch_size={self.batch_size} is not divisible by {self.world} ranks")

    @property
    def local_batch(self) -> int:
        return self.batch_size // self.world

    @property
    def per_stream(self) -> int:
        """Samples a step takes from each stream."""
        return self.batch_size // self.streams

    @property
    def my_streams(self) -> list[int]:
        if self.streams % self.world == 0:
            return list(range(self.rank, self.streams, self.world))
        return [self.rank // (self.world // self.streams)]

    @property
    def my_rows(self) -> slice:
        """The rows of each of its streams' per-step slices this rank serves."""
        per = self.per_stream
        if self.streams % self.world == 0:
            return slice(0, per)
        share = self.world // self.streams
        part, n = self.rank % share, per // share
        return slice(part * n, (part + 1) * n)

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.shards, global_batch=self.batch_size, streams=self.streams)

    def windows(self, epoch: int) -> dict[int, list]:
        """{stream: [(shard ids (w,), shuffled indices (n_w,)), ...]} for this rank's streams."""
        return {j: stream_windows(self.shards, seed=self.seed, epoch=epoch, stream=j, streams=self.streams,
                                  window=self.window) for j in self.my_streams}

    def batch_indices(self, epoch: int) -> Iterator[tuple[int, list, np.ndarray]]:
        """Yield (step, [(stream, window) touched], (local_batch,) int64 indices) for every step;
        the indices are this rank's streams' rows, stream after stream."""
        per = self.per_stream
        rows = self.my_rows
        flat = {}
        for j, wins in self.windows(epoch).items():
            flat[j] = (np.concatenate([idx for _, idx in wins]),
                       np.concatenate([np.full(len(idx), w) for w, (_, idx) in enumerate(wins)]))
        steps = self.steps_per_epoch
        for j, (idx, _) in flat.items():
            if len(idx) < steps * per:
                raise RuntimeError(f"stream {j} holds {len(idx)} samples at epoch {epoch}, fewer than "
                                   f"{steps} steps of {per}: steps_per_epoch is wrong for these shards")
        for step in range(steps):
            sl = slice(step * per + rows.start, step * per + rows.stop)
            touched = [(j, int(w)) for j in self.my_streams for w in sorted(set(flat[j][1][sl].tolist()))]
            yield step, touched, np.concatenate([flat[j][0][sl] for j in self.my_streams])

    def _rows(self, epoch: int, step: int, stream: int, rows: slice) -> np.ndarray:
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} is outside an epoch of {self.steps_per_epoch} steps")
        base = step * self.per_stream
        return stream_span(self.shards, seed=self.seed, epoch=epoch, stream=stream, streams=self.streams,
                           window=self.window, start=base + rows.start, stop=base + rows.stop)

    def batch(self, epoch: int, step: int) -> np.ndarray:
        """This rank's part of global batch ``step`` of ``epoch``, computed from (seed, epoch,
        step) alone: (local_batch,) int64, equal to what ``batch_indices`` yields at ``step``."""
        return np.concatenate([self._rows(epoch, step, j, self.my_rows) for j in self.my_streams])

    def global_batch(self, epoch: int, step: int) -> np.ndarray:
        """Global batch ``step`` of ``epoch``, every stream's slice in stream order, whatever
        this rank and world: (batch_size,) int64."""
        every = slice(0, self.per_stream)
        return np.concatenate([self._rows(epoch, step, j, every) for j in range(self.streams)])
