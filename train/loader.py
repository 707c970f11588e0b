"""Training batches: from the feature store (cached) or from teachers run every step (online).

Order (DESIGN.md "Hot paths"): at epoch e the image shards are shuffled by a hash of
(seed, e); rank r of W takes every W-th shard of that order; its shards are grouped into
windows of ``window`` shards, and the samples of a window are shuffled by a hash of
(seed, e, index). Batches are consecutive slices of that local order, so image shards and
feature blocks are read whole and in sequence, and a batch is a pure function of
(seed, epoch, rank, world, step): resuming at step k needs no data read before it.

Both sources give the same batch for the same step: the same images, views (e + i) mod V,
crops, flips and student masks; only where the teacher tokens come from differs.
Features and images are joined by index: a block's ``index`` array is checked against
the image indices it must hold, and every teacher's crops against the others'.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch

from store import views as V
from store.features import DataInfo, FeatureStore, StoreError

_ROLE_SHARD_ORDER, _ROLE_SAMPLE_ORDER = 11, 12


def local_shards(num_shards: int, *, seed: int, epoch: int, rank: int, world: int) -> np.ndarray:
    """Image shards rank ``rank`` reads at ``epoch``, in reading order: (n,) int64."""
    keys = V.hash_keys(seed, epoch, _ROLE_SHARD_ORDER, np.arange(num_shards))
    order = np.argsort(keys, kind="stable")
    return order[rank::world]


def local_order(shards: list, *, seed: int, epoch: int, rank: int, world: int,
                window: int) -> list[np.ndarray]:
    """The rank's sample order at ``epoch`` as a list of windows: each (n_w,) int64 indices."""
    mine = local_shards(len(shards), seed=seed, epoch=epoch, rank=rank, world=world)
    out = []
    for a in range(0, len(mine), window):
        idx = np.concatenate([np.arange(shards[k][0], shards[k][0] + shards[k][1]) for k in mine[a:a + window]])
        keys = V.hash_keys(seed, epoch, _ROLE_SAMPLE_ORDER, idx)
        out.append(idx[np.argsort(keys, kind="stable")])
    return out


def steps_per_epoch(shards: list, *, batch_size: int, world: int) -> int:
    """Steps every rank can take in any epoch: only the full shards a rank is sure to get
    count, so all ranks take the same number of steps (the rest of an epoch is dropped)."""
    full = sum(1 for _, c in shards if c == max(c for _, c in shards))
    per_rank = (full // world) * max(c for _, c in shards)
    steps = per_rank // batch_size
    if steps == 0:
        raise ValueError(f"{len(shards)} image shards are too few for a batch of {batch_size} on "
                         f"{world} rank(s); use a smaller batch or more data")
    return steps


@dataclass
class Plan:
    """What both sources share: data, seed, views, batch geometry and order."""
    data: object
    seed: int
    views: int
    batch_size: int            # per rank
    rank: int = 0
    world: int = 1
    window: int = 4
    n_student: int = V.STUDENT_VISIBLE

    @property
    def shards(self) -> list:
        return [[int(s["first"]), int(s["count"])] for s in self.data.shards]

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.shards, batch_size=self.batch_size, world=self.world)

    def batch_indices(self, epoch: int):
        """Yield (step, windows touched, (B,) indices) for every step of the epoch."""
        wins = local_order(self.shards, seed=self.seed, epoch=epoch, rank=self.rank, world=self.world,
                           window=self.window)
        flat = np.concatenate(wins)
        which = np.concatenate([np.full(len(w), k) for k, w in enumerate(wins)])
        B = self.batch_size
        for step in range(self.steps_per_epoch):
            sl = slice(step * B, (step + 1) * B)
            yield step, sorted(set(which[sl].tolist())), wins, flat[sl]


class _Prefetch:
    """Run a generator in a background thread, ``depth`` items ahead; errors re-raised."""

    _END = object()

    def __init__(self, gen, depth: int):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(gen,), daemon=True, name="prefetch")
        self.thread.start()

    def _run(self, gen):
        try:
            for item in gen:
                while not self.stop.is_set():
                    try:
                        self.q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
            self.q.put(self._END)
        except BaseException as e:       # surfaced in the consumer
            self.q.put(e)

    def __iter__(self):
        while True:
            item = self.q.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self):
        self.stop.set()


class _Source:
    def __init__(self, plan: Plan, *, decoder: str = "dali", device: str = "cpu", num_threads: int = 2,
                 prefetch: int = 2):
        from extract.runner import make_decoder
        self.plan = plan
        self.prefetch = prefetch
        self.decode = make_decoder(decoder, batch_size=plan.batch_size, device=device, num_threads=num_threads)

    def _images(self, index, boxes, flips) -> torch.Tensor:
        return self.decode(self.plan.data.read_many(index), boxes, flips)

    def epoch(self, epoch: int, *, start_step: int = 0):
        """Yield (step, CPU batch) for the epoch from ``start_step``; prefetched in a thread."""
        gen = self._batches(epoch, start_step)
        pf = _Prefetch(gen, self.prefetch)
        try:
            yield from pf
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
        mine = local_shards(len(plan.shards), seed=plan.seed, epoch=epoch, rank=plan.rank, world=plan.world)
        cache: dict[int, dict] = {}
        for step, touched, _, index in plan.batch_indices(epoch):
            if step < start_step:
                continue
            for w in list(cache):
                if w < touched[0]:
                    del cache[w]
            for w in touched:
                if w not in cache:
                    cache[w] = self._window(slot, mine[w * plan.window:(w + 1) * plan.window])
            # where each sample of the batch lives: (window, row) -> fancy-index per window
            where = np.full((len(index), 2), -1, dtype=np.int64)
            for w in touched:
                rows = cache[w]["row"]
                for j, i in enumerate(index):
                    r = rows.get(int(i))
                    if r is not None:
                        where[j] = (w, r)
            if (where[:, 0] < 0).any():
                raise StoreError(f"image {int(index[where[:, 0] < 0][0])} is not in the blocks read "
                                 f"for step {step}")

            def gather(get):
                first = get(cache[touched[0]])
                out = np.empty((len(index), *first.shape[1:]), dtype=first.dtype)
                for w in touched:
                    sel = where[:, 0] == w
                    out[sel] = get(cache[w])[where[sel, 1]]
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
            tok = ts.decode({k: t[k].to(device, non_blocking=True) for k in ts.payload_keys}, device=device)
            out["teachers"][name] = {"cls": tok[:, 0], "patch": tok[:, 1:],
                                     "index": t["visible"].to(device).long()}
        return out


class OnlineSource(_Source):
    """The same batches, with the teachers run on every step (the baseline)."""

    def __init__(self, plan: Plan, *, teachers: dict, amp: bool = False, **kw):
        super().__init__(plan, **kw)
        self.teachers = teachers          # name -> extract.teachers.Teacher, on the training device
        self.amp = amp

    def _batches(self, epoch: int, start_step: int):
        plan = self.plan
        for step, _, _, index in plan.batch_indices(epoch):
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


def _move_common(batch: dict, device) -> dict:
    return {"index": batch["index"].to(device), "view": batch["view"].to(device),
            "images": batch["images"].to(device, non_blocking=True),
            "student_visible": batch["student_visible"].to(device), "teachers": {}}
