"""Training batches: from the feature store (cached) or from teachers run every step (online).

Order (DESIGN.md "Hot paths"). The data is read as ``streams`` independent streams, a
number fixed by the config and not by the world size. At epoch e the image shards are
shuffled by a hash of (seed, e); stream j takes every ``streams``-th shard of that order,
groups its shards into windows of ``window`` shards, and shuffles the samples of a window
by a hash of (seed, e, index). Global batch k is the k-th slice of every stream. Rank r of
W serves the streams j with j mod W == r; when W is a multiple of the streams (a small set
read as one or two streams), the W / streams ranks of stream j = r // (W / streams) serve
equal parts of its slice. So:

- image shards and feature blocks are read whole and in sequence, each by one rank only
  (by the ranks sharing a stream when there are fewer streams than ranks);
- the samples of a global batch do not depend on the world size (1, 2, 4, 8 ranks with
  8 streams, or with 1 stream, see the same global batches), which is what lets a 2-rank
  run follow the single-process loss curve and resume a run on another world size;
- a batch is a pure function of (seed, epoch, step): resuming at step k reads nothing
  before it.

``data.streams=auto`` (``auto_streams``) takes the most of 8, 4, 2, 1 streams that the data
and the global batch allow without dropping more than a tenth of what one stream would
train on per epoch: 8 on ImageNet, 1 on a set of a few dozen images. ``resolve_data``
turns ``auto`` (streams, and views, which come from the store) into numbers once, when a
run starts; the run's config.yaml records them.

Both sources give the same batch for the same step: the same images, views (e + i) mod V,
crops, flips and student masks; only where the teacher tokens come from differs.
Features and images are joined by index: a block's ``index`` array is checked against the
image indices it must hold, and every teacher's crops against the others'.

Batches are made in a background thread (``store/prefetch.py``) while the step runs; on
CUDA that thread also pins what the step reads and copies it to the GPU on its own stream,
and the step's stream waits for an event, not the host. Index and view stay on the host.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from store import views as V
from store.features import DataInfo, FeatureStore, StoreError
from store.prefetch import DeviceCopier, Prefetch
from train.config import AUTO, Config

_ROLE_SHARD_ORDER, _ROLE_SAMPLE_ORDER = 11, 12


def stream_shards(num_shards: int, *, seed: int, epoch: int, stream: int, streams: int) -> np.ndarray:
    """Image shards stream ``stream`` of ``streams`` reads at ``epoch``, in order: (n,) int64."""
    keys = V.hash_keys(seed, epoch, _ROLE_SHARD_ORDER, np.arange(num_shards))
    return np.argsort(keys, kind="stable")[stream::streams]


def stream_windows(shards: list, *, seed: int, epoch: int, stream: int, streams: int,
                   window: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The stream's windows at ``epoch``: [(shard ids (w,), shuffled sample indices (n_w,))]."""
    mine = stream_shards(len(shards), seed=seed, epoch=epoch, stream=stream, streams=streams)
    out = []
    for a in range(0, len(mine), window):
        ids = mine[a:a + window]
        idx = np.concatenate([np.arange(shards[k][0], shards[k][0] + shards[k][1]) for k in ids])
        keys = V.hash_keys(seed, epoch, _ROLE_SAMPLE_ORDER, idx)
        out.append((ids, idx[np.argsort(keys, kind="stable")]))
    return out


def steps_per_epoch(shards: list, *, global_batch: int, streams: int) -> int:
    """Steps every stream can feed in any epoch: only the full shards a stream is sure to
    get count (the rest of an epoch is dropped), so every rank takes the same steps."""
    size = max(c for _, c in shards)
    full = sum(1 for _, c in shards if c == size)
    steps = (full // streams) * size // (global_batch // streams)
    if steps == 0:
        raise ValueError(f"{len(shards)} image shards of {size} are too few for a global batch of "
                         f"{global_batch} over {streams} streams; use a smaller batch, fewer "
                         "streams (data.streams) or more data")
    return steps


AUTO_STREAMS = (8, 4, 2, 1)       # data.streams=auto picks from these, most first
AUTO_STREAMS_KEEP = 0.9           # ... keeping at least this share of one stream's steps


def auto_streams(shards: list, *, global_batch: int) -> int:
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


def resolve_data(cfg: Config, data, *, recorded: Mapping | None = None) -> Config:
    """``cfg`` with ``data.views`` and ``data.streams`` set to numbers.

    data: the packed image set (store/shards.ImageSet). ``views``: ``auto`` takes the store's
    V (1 without a store: online-fresh); an explicit V that differs is refused (StoreError naming
    the store and the key).
    ``streams``: ``auto`` takes ``recorded["streams"]`` when given (the ``data`` section of
    the config a resumed run recorded), else ``auto_streams``."""
    views = cfg.data.views
    if cfg.data.store:
        store = FeatureStore.open(cfg.data.store)
        if views == AUTO:
            views = store.views
        elif views != store.views:
            raise StoreError(f"{store.path}: holds {store.views} views per image but the config sets "
                             f"data.views={views}; leave data.views at auto or set it to {store.views}")
    elif views == AUTO:
        views = 1           # no store (online-fresh): no cached views; V only picks the statistics' views
    streams = cfg.data.streams
    if streams == AUTO:
        streams = (recorded or {}).get("streams", AUTO)
    if streams == AUTO:
        shards = [[int(s["first"]), int(s["count"])] for s in data.shards]
        streams = auto_streams(shards, global_batch=cfg.train.batch_size)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, views=int(views), streams=int(streams)))


@dataclass
class Plan:
    """What both sources share: data, seed, views, batch geometry and order.

    ``batch_size`` is the global batch; this rank serves ``batch_size / world``: the whole
    slices of its streams, or, with fewer streams than ranks, its part of one stream's."""
    data: object
    seed: int
    views: int
    batch_size: int
    rank: int = 0
    world: int = 1
    window: int = 4
    streams: int = 1
    n_student: int = V.STUDENT_VISIBLE

    def __post_init__(self):
        if self.streams % self.world and self.world % self.streams:
            raise ValueError(f"data.streams={self.streams} and the world size {self.world}: one must be "
                             "a multiple of the other")
        if self.batch_size % self.streams:
            raise ValueError(f"train.batch_size={self.batch_size} must be a multiple of data.streams={self.streams}")
        if self.batch_size % self.world:
            raise ValueError(f"train.batch_size={self.batch_size} is not divisible by {self.world} ranks")

    @property
    def shards(self) -> list:
        return [[int(s["first"]), int(s["count"])] for s in self.data.shards]

    @property
    def local_batch(self) -> int:
        return self.batch_size // self.world

    @property
    def my_streams(self) -> list[int]:
        if self.streams % self.world == 0:
            return list(range(self.rank, self.streams, self.world))
        return [self.rank // (self.world // self.streams)]

    @property
    def my_rows(self) -> slice:
        """The rows of each of its streams' per-step slices this rank serves."""
        per = self.batch_size // self.streams
        if self.streams % self.world == 0:
            return slice(0, per)
        share = self.world // self.streams
        part, n = self.rank % share, per // share
        return slice(part * n, (part + 1) * n)

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.shards, global_batch=self.batch_size, streams=self.streams)

    def windows(self, epoch: int) -> dict[int, list]:
        """{stream: [(shard ids, shuffled indices), ...]} for this rank's streams."""
        return {j: stream_windows(self.shards, seed=self.seed, epoch=epoch, stream=j, streams=self.streams,
                                  window=self.window) for j in self.my_streams}

    def batch_indices(self, epoch: int):
        """Yield (step, [(stream, window) touched], (local_batch,) indices) for every step."""
        per = self.batch_size // self.streams
        rows = self.my_rows
        flat = {}
        for j, wins in self.windows(epoch).items():
            flat[j] = (np.concatenate([idx for _, idx in wins]),
                       np.concatenate([np.full(len(idx), w) for w, (_, idx) in enumerate(wins)]))
        for step in range(self.steps_per_epoch):
            sl = slice(step * per + rows.start, step * per + rows.stop)
            touched = [(j, int(w)) for j in self.my_streams for w in sorted(set(flat[j][1][sl].tolist()))]
            yield step, touched, np.concatenate([flat[j][0][sl] for j in self.my_streams])


class _Source:
    def __init__(self, plan: Plan, *, decoder: str = "dali", device: str = "cpu", num_threads: int = 2,
                 prefetch: int = 2, decoder_settings: dict | None = None):
        from extract.runner import make_decoder
        self.plan = plan
        self.prefetch = prefetch
        self.decode = make_decoder(decoder, batch_size=plan.local_batch, device=device, num_threads=num_threads,
                                   **(decoder_settings or {}))
        self.copier = DeviceCopier(device)

    def _images(self, index, boxes, flips) -> torch.Tensor:
        return self.decode(self.plan.data.read_many(index), boxes, flips)

    def _staged(self, epoch: int, start_step: int):
        """The producer: batches with what the step needs already on its way to the device
        (pinned, copied on the copier's stream); index and view stay on the host."""
        for step, batch in self._batches(epoch, start_step):
            host = {k: batch.pop(k) for k in _HOST_KEYS}
            yield step, (host, self.copier.send(batch))

    def epoch(self, epoch: int, *, start_step: int = 0):
        """Yield (step, batch) for the epoch from ``start_step``, made in a thread ahead of
        the step; ``materialize`` turns a batch into the step's input. On the CPU the batch is
        the plain CPU batch; on CUDA what the step reads is on the device already, ordered on
        the caller's current stream by an event (the host does not wait for the copies)."""
        pf = Prefetch(self._staged(epoch, start_step), self.prefetch, context=self.copier.producer_stream)
        try:
            for step, (host, sent) in pf:
                yield step, {**host, **self.copier.receive(sent)}
        finally:
            pf.close()


class CachedSource(_Source):
    """Batches whose teacher tokens come from the store, read by whole blocks."""

    def __init__(self, plan: Plan, *, store_path, teachers, **kw):
        super().__init__(plan, **kw)
        self.fs = FeatureStore.open(store_path, data=DataInfo.of(plan.data), views=plan.views, seed=plan.seed)
        self.stores = {}
        for name in teachers:
            ts = self.fs.teacher(name)
            ts.require_complete()
            _check_mask_ratio(ts)
            self.stores[name] = ts

    def _window(self, slot: int, shard_ids) -> dict:
        """Read the rank's window of blocks: {index, boxes, flips, teachers: {name: {...}}}."""
        out = {"teachers": {}}
        for name, ts in self.stores.items():
            blocks = [ts.read_block(slot, int(k)) for k in shard_ids]
            cat = {key: np.concatenate([b[key] for b in blocks]) for key in blocks[0]}
            if "index" not in out:
                out.update(index=cat["index"], boxes=cat["boxes"], flips=cat["flips"])
            elif not (np.array_equal(out["index"], cat["index"]) and np.array_equal(out["boxes"], cat["boxes"])
                      and np.array_equal(out["flips"], cat["flips"])):
                raise StoreError(f"teacher {name!r} holds other samples or views than "
                                 f"{next(iter(self.stores))!r} in slot {slot}, shards {list(shard_ids)}")
            out["teachers"][name] = {k: cat[k] for k in ("visible", *ts.payload_keys)}
        out["row"] = {int(i): r for r, i in enumerate(out["index"])}
        return out

    def _batches(self, epoch: int, start_step: int):
        plan = self.plan
        slot = epoch % plan.views
        windows = plan.windows(epoch)
        cache: dict[tuple[int, int], dict] = {}
        for step, touched, index in plan.batch_indices(epoch):
            if step < start_step:
                continue
            for key in [k for k in cache if k not in touched]:
                del cache[key]          # streams only move forward: a window left is done
            for j, w in touched:
                if (j, w) not in cache:
                    cache[j, w] = self._window(slot, windows[j][w][0])
            # where each sample of the batch lives: (window, row) -> fancy-index per window
            keys = list(cache)
            where = np.full((len(index), 2), -1, dtype=np.int64)
            for n, key in enumerate(keys):
                rows = cache[key]["row"]
                for b, i in enumerate(index):
                    r = rows.get(int(i))
                    if r is not None:
                        where[b] = (n, r)
            if (where[:, 0] < 0).any():
                raise StoreError(f"image {int(index[where[:, 0] < 0][0])} is not in the blocks read "
                                 f"for step {step}")

            def gather(get):
                first = get(cache[keys[0]])
                out = np.empty((len(index), *first.shape[1:]), dtype=first.dtype)
                for n, key in enumerate(keys):
                    sel = where[:, 0] == n
                    out[sel] = get(cache[key])[where[sel, 1]]
                return out

            if not np.array_equal(gather(lambda c: c["index"]), index):
                raise StoreError(f"feature rows do not match image indices at step {step}")
            boxes, flips = gather(lambda c: c["boxes"]), gather(lambda c: c["flips"])
            teachers = {name: {k: torch.from_numpy(gather(lambda c, k=k, n=name: c["teachers"][n][k]))
                               for k in ("visible", *ts.payload_keys)}
                        for name, ts in self.stores.items()}
            view = V.view_of_slot(index, slot, plan.views)
            yield step, {
                "index": torch.from_numpy(index), "view": torch.from_numpy(view),
                "images": self._images(index, boxes, flips),
                "student_visible": torch.from_numpy(V.student_visible(plan.seed, index, epoch,
                                                                      n_visible=plan.n_student)),
                "teachers": teachers,
            }

    def materialize(self, batch: dict, device) -> dict:
        """Move a CPU batch to ``device`` and decode the stored tokens to float32."""
        out = _move_common(batch, device)
        for name, ts in self.stores.items():
            t = batch["teachers"][name]
            tok = ts.decode({k: t[k].to(device) for k in ts.payload_keys}, device=device)
            out["teachers"][name] = {"cls": tok[:, 0], "patch": tok[:, 1:],
                                     "index": t["visible"].to(device).long()}
        return out


def _check_mask_ratio(ts) -> None:
    """The store's masks must be the ones this code draws for the teacher (store/views.py
    MASK_RATIOS, what the online path and the method use); else StoreError, one line."""
    ratio = V.MASK_RATIOS[ts.name]
    stored = (ts.config.get("mask_ratio"), ts.n_visible)
    if stored != (ratio, V.num_visible(ratio)):
        raise StoreError(f"{ts.path}: config mask_ratio={stored[0]} (n_visible {stored[1]}) but this run "
                         f"masks teacher {ts.name} at {ratio} (n_visible {V.num_visible(ratio)}, "
                         "store/views.py MASK_RATIOS); extract a new store")


class OnlineSource(_Source):
    """The same batches, with the teachers run on every step (the baseline)."""

    def __init__(self, plan: Plan, *, teachers: dict, amp: bool = False, **kw):
        super().__init__(plan, **kw)
        self.teachers = teachers          # name -> extract.teachers.Teacher, on the training device
        self.amp = amp

    def _batches(self, epoch: int, start_step: int):
        plan = self.plan
        for step, _, index in plan.batch_indices(epoch):
            if step < start_step:
                continue
            view = V.epoch_view(index, epoch, plan.views)
            boxes, flips = V.view_params(plan.seed, index, view, plan.data.widths[index], plan.data.heights[index])
            yield step, {
                "index": torch.from_numpy(index), "view": torch.from_numpy(view),
                "images": self._images(index, boxes, flips),
                "student_visible": torch.from_numpy(V.student_visible(plan.seed, index, epoch,
                                                                      n_visible=plan.n_student)),
                "teachers": {name: {"visible": torch.from_numpy(V.teacher_visible(plan.seed, index, view, name))}
                             for name in self.teachers},
            }

    @torch.no_grad()
    def materialize(self, batch: dict, device) -> dict:
        out = _move_common(batch, device)
        dev = torch.device(device)
        for name, teacher in self.teachers.items():
            vis = batch["teachers"][name]["visible"].to(device)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.amp):
                o = teacher(out["images"], vis)
            out["teachers"][name] = {"cls": o["cls"].float(), "patch": o["patch"].float(), "index": vis.long()}
        return out


# What the step does not read: kept on the host (reports and tests read them there).
_HOST_KEYS = ("index", "view")


def _move_common(batch: dict, device) -> dict:
    """index and view as they are (host); images and the student's mask on ``device`` (a
    no-op for the batches of ``epoch`` on CUDA, which are there already)."""
    return {"index": batch["index"], "view": batch["view"], "images": batch["images"].to(device),
            "student_visible": batch["student_visible"].to(device), "teachers": {}}
