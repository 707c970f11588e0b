"""Training batches: from the feature store (``CachedSource``) or from teachers run every step
(``OnlineSource``; online-fresh: train/online.py), the same batch for the same step.

``Plan`` joins the order (data/order.py) to the data; batches are made, checked and moved to the
device in a background thread. The joins, checks and threads: docs/CONTRACTS.md, "Training batches"."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from data import views as V
from data.decode.pixels import normalize_uint8
from store.features import StoreError
from core.prefetch import DeviceCopier, Prefetch
from train.config import Config
from train.runstore import RunStore, resolve_data  # noqa: F401 (resolve_data: importable from here too)
from data.order import Order


@dataclass
class Plan:
    """What both sources share: data, seed, views, batch geometry and order (``order``, a
    train/order.Order of the data's shards; ValueError as Order refuses a geometry).

    ``views`` v: the views a run trains on; ``store_views`` V (0: v): the store's. Epoch e reads
    slot e mod v of the store, which holds view (e mod v + i) mod V of image i: every image
    still gets v distinct views, a store's slots are read whole as with v = V, and v = V gives
    view (e + i) mod V. The views of a store are independent keyed draws, so its first v slots
    serve a budget of v views as well as any other v of them would.

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
    store_views: int = 0

    order: Order = field(init=False, repr=False)

    @classmethod
    def of(cls, cfg: Config, data, store: RunStore | None, *, rank: int = 0, world: int = 1) -> "Plan":
        """The plan of a resolved run config over ``data`` and its ``store`` (``open_run_store``), for one rank."""
        return cls(data, seed=cfg.data.seed, views=cfg.data.views, store_views=store.store_views if store else 0,
                   batch_size=cfg.train.batch_size, rank=rank, world=world, window=cfg.data.shuffle_window,
                   streams=cfg.data.streams, n_student=cfg.data.student_visible)

    def __post_init__(self):
        self.store_views = self.store_views or self.views
        if not 1 <= self.views <= self.store_views:
            raise ValueError(f"views={self.views}: a run trains on 1..{self.store_views} of the store's views")
        self.order = Order(self.shards, seed=self.seed, batch_size=self.batch_size, rank=self.rank,
                           world=self.world, window=self.window, streams=self.streams)

    @property
    def shards(self) -> list:
        return [[int(s["first"]), int(s["count"])] for s in self.data.shards]

    def view_of(self, index, epoch: int) -> np.ndarray:
        """The stored view of each image of ``index`` in ``epoch`` (the class docstring)."""
        return V.view_of_slot(index, epoch % self.views, self.store_views)

    @property
    def local_batch(self) -> int:
        return self.order.local_batch

    @property
    def steps_per_epoch(self) -> int:
        return self.order.steps_per_epoch

    def windows(self, epoch: int) -> dict[int, list]:
        """{stream: [(shard ids, shuffled indices), ...]} for this rank's streams (Order.windows)."""
        return self.order.windows(epoch)

    def batch_indices(self, epoch: int):
        """Yield (step, [(stream, window) touched], (local_batch,) indices) for every step
        (Order.batch_indices)."""
        return self.order.batch_indices(epoch)


class _Source:
    def __init__(self, plan: Plan, *, decoder: str = "dali", device: str = "cpu", num_threads: int = 2,
                 prefetch: int = 2, decoder_settings: dict | None = None):
        from data.decode import make_decoder
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
    """Batches whose teacher tokens come from the run's ``store`` (a train/runstore.RunStore of a
    cached run, its checks passed), read by whole blocks.

    The images come from the store's view tars when ``store.view_pixels`` holds them
    (store/viewpixels.py: no original image shard is opened), else from the original images
    decoded with the stored crops (``data.pixels``)."""

    def __init__(self, plan: Plan, store: RunStore, **kw):
        super().__init__(plan, **kw)
        if store.source != "cached" or (store.store_views, store.seed) != (plan.store_views, plan.seed):
            raise ValueError(f"{store.path}: opened for a {store.source} run of V={store.store_views}, seed "
                             f"{store.seed}; this plan reads V={plan.store_views}, seed {plan.seed} from the cache")
        self.store, self.stores, self.view_pixels = store, store.teachers, store.view_pixels
        # (teacher, slot, shard) whose masks this run compared with the keyed draw: once per block,
        # as later reads pass the crc32c only with the same bytes (the cost of a comparison:
        # docs/performance.md "Read-time checks")
        self.masks_checked: set[tuple[str, int, int]] = set()
        if self.view_pixels is not None:
            from data.decode.stored import make_view_decoder
            self.decode_views = make_view_decoder(self.view_pixels.form, kw.get("decoder", "dali"),
                                                  batch_size=plan.local_batch, device=kw.get("device", "cpu"),
                                                  num_threads=kw.get("num_threads", 2), normalize=False)

    def _window(self, slot: int, shard_ids) -> dict:
        """Read the rank's window of blocks: {index, boxes, flips, teachers: {name: {...}}},
        and ``sorted``/``order`` (the window's image indices ascending, and where each one is)
        for the vectorised row lookup of ``_rows``."""
        out = {"teachers": {}}
        for name, ts in self.stores.items():
            blocks = [ts.read_block(slot, int(k)) for k in shard_ids]      # every file checked as read
            for k, block in zip(shard_ids, blocks):
                if (name, slot, int(k)) not in self.masks_checked:
                    ts.check_masks(slot, int(k), block)
                    self.masks_checked.add((name, slot, int(k)))
            cat = {key: np.concatenate([b[key] for b in blocks]) for key in blocks[0]}
            if "index" not in out:
                out.update(index=cat["index"], boxes=cat["boxes"], flips=cat["flips"])
            elif not (np.array_equal(out["index"], cat["index"]) and np.array_equal(out["boxes"], cat["boxes"])
                      and np.array_equal(out["flips"], cat["flips"])):
                raise StoreError(f"teacher {name!r} holds other samples or views than "
                                 f"{next(iter(self.stores))!r} in slot {slot}, shards {list(shard_ids)}")
            out["teachers"][name] = {k: cat[k] for k in ("visible", *ts.payload_keys)}
        if self.view_pixels is not None:
            parts = [self.view_pixels.read_block(slot, int(k)) for k in shard_ids]
            if not np.array_equal(np.concatenate([i for i, _ in parts]), out["index"]):
                raise StoreError(f"{self.view_pixels.path}: view tars of slot {slot}, shards {list(shard_ids)} "
                                 "hold other images than the token blocks")
            out["pixels"] = np.empty(len(out["index"]), dtype=object)
            out["pixels"][:] = [d for _, datas in parts for d in datas]
        out["order"] = np.argsort(out["index"], kind="stable")
        out["sorted"] = out["index"][out["order"]]
        return out

    @staticmethod
    def _rows(windows: list[dict], index: np.ndarray) -> np.ndarray:
        """(B, 2) (window, row) of each image of ``index`` in ``windows`` (the first window
        holding it), by binary search in each window's sorted indices; -1 where none does."""
        where = np.full((len(index), 2), -1, dtype=np.int64)
        for n, w in enumerate(windows):
            pos = np.minimum(np.searchsorted(w["sorted"], index), len(w["sorted"]) - 1)
            hit = (w["sorted"][pos] == index) & (where[:, 0] < 0)
            where[hit, 0], where[hit, 1] = n, w["order"][pos[hit]]
        return where

    def _read_ahead(self, pool, windows: dict, slot: int, ahead: dict, j: int, w: int) -> None:
        """Start reading window ``w`` of stream ``j`` in the reader thread (if it exists)."""
        if w < len(windows[j]) and (j, w) not in ahead:
            ahead[j, w] = pool.submit(self._window, slot, windows[j][w][0])

    def _features(self, epoch: int, start_step: int):
        """Yield (step, index, boxes, flips, pixels, teachers) with the batch's rows gathered
        from the windows read (the next window of each stream read ahead in a thread);
        ``pixels``: the stored views' bytes (None without view pixels)."""
        plan = self.plan
        slot = epoch % plan.views
        windows = plan.windows(epoch)
        cache: dict[tuple[int, int], dict] = {}
        ahead: dict[tuple[int, int], object] = {}
        with ThreadPoolExecutor(1, thread_name_prefix="blocks") as pool:
            try:
                for step, touched, index in plan.batch_indices(epoch):
                    if step < start_step:
                        continue
                    for key in [k for k in cache if k not in touched]:
                        del cache[key]          # streams only move forward: a window left is done
                    for j, w in touched:
                        if (j, w) not in cache:
                            self._read_ahead(pool, windows, slot, ahead, j, w)
                            cache[j, w] = ahead.pop((j, w)).result()
                        self._read_ahead(pool, windows, slot, ahead, j, w + 1)
                    keys = list(cache)
                    where = self._rows([cache[k] for k in keys], index)
                    if (where[:, 0] < 0).any():
                        raise StoreError(f"image {int(index[where[:, 0] < 0][0])} is not in the blocks read "
                                         f"for step {step}")
                    single = len(keys) == 1 or (where[:, 0] == where[0, 0]).all()

                    def gather(get):
                        if single:          # the whole batch in one window: one fancy index
                            return get(cache[keys[where[0, 0]]])[where[:, 1]]
                        first = get(cache[keys[0]])
                        out = np.empty((len(index), *first.shape[1:]), dtype=first.dtype)
                        for n, key in enumerate(keys):
                            sel = where[:, 0] == n
                            out[sel] = get(cache[key])[where[sel, 1]]
                        return out

                    if not np.array_equal(gather(lambda c: c["index"]), index):
                        raise StoreError(f"feature rows do not match image indices at step {step}")
                    teachers = {name: {k: torch.from_numpy(gather(lambda c, k=k, n=name: c["teachers"][n][k]))
                                       for k in ("visible", *ts.payload_keys)}
                                for name, ts in self.stores.items()}
                    pixels = None if self.view_pixels is None else list(gather(lambda c: c["pixels"]))
                    yield step, index, gather(lambda c: c["boxes"]), gather(lambda c: c["flips"]), pixels, teachers
            finally:
                for f in ahead.values():
                    f.cancel()

    def _batches(self, epoch: int, start_step: int):
        """The batches; with a decoder that can queue (DALI's submit/get), batch k + 1's
        images are decoding while batch k is handed over and the next rows are gathered."""
        plan = self.plan
        queued = self.view_pixels is None and hasattr(self.decode, "submit")
        if queued:
            self.decode.drain()                 # what an abandoned epoch left in flight
        pending = None
        try:
            for step, index, boxes, flips, pixels, teachers in self._features(epoch, start_step):
                batch = {
                    "index": torch.from_numpy(index), "view": torch.from_numpy(plan.view_of(index, epoch)),
                    "images": None,
                    "student_visible": torch.from_numpy(V.student_visible(plan.seed, index, epoch,
                                                                          n_visible=plan.n_student)),
                    "teachers": teachers,
                }
                if pixels is not None:        # the stored views: no image shard is opened
                    batch["images"] = self.decode_views(pixels)
                if not queued:
                    if pixels is None:
                        batch["images"] = self._images(index, boxes, flips)
                    yield step, batch
                    continue
                self.decode.submit(self.plan.data.read_many(index), boxes, flips)
                if pending is not None:
                    pending[1]["images"] = self.decode.get()
                    yield pending
                pending = (step, batch)
            if pending is not None:
                pending[1]["images"] = self.decode.get()
                yield pending
        finally:
            if queued:
                self.decode.drain()

    def materialize(self, batch: dict, device) -> dict:
        """Move a CPU batch to ``device`` and decode the stored tokens to float32."""
        out = _move_common(batch, device)
        for name, ts in self.stores.items():
            t = batch["teachers"][name]
            tok = ts.decode({k: t[k].to(device) for k in ts.payload_keys}, device=device)
            out["teachers"][name] = {"cls": tok[:, 0], "patch": tok[:, 1:],
                                     "index": t["visible"].to(device).long()}
        return out


class OnlineSource(_Source):
    """The same batches, with the teachers run on every step (the baseline)."""

    def __init__(self, plan: Plan, *, teachers: dict, amp: bool | str | None = None, **kw):
        """``amp``: the teachers' precision (``Teacher.set_amp``; the run's train.amp resolved on its
        device, core/precision.py); None keeps each as built."""
        super().__init__(plan, **kw)
        self.teachers = teachers          # name -> teachers.vit.Teacher, on the training device
        if amp is not None:
            for teacher in teachers.values():
                if teacher is not None:
                    teacher.set_amp(amp)

    def _batches(self, epoch: int, start_step: int):
        plan = self.plan
        for step, _, index in plan.batch_indices(epoch):
            if step < start_step:
                continue
            view = plan.view_of(index, epoch)
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
        for name, teacher in self.teachers.items():
            vis = batch["teachers"][name]["visible"].to(device)
            o = teacher(out["images"], vis)                         # in the teacher's precision (amp)
            out["teachers"][name] = {"cls": o["cls"].float(), "patch": o["patch"].float(), "index": vis.long()}
        return out


# What the step does not read: kept on the host (reports and tests read them there).
_HOST_KEYS = ("index", "view")


def _move_common(batch: dict, device) -> dict:
    """index and view as they are (host); images and the student's mask on ``device`` (a
    no-op for the batches of ``epoch`` on CUDA, which are there already)."""
    images = batch["images"].to(device)
    if images.dtype == torch.uint8:      # stored views come as uint8 (B, 224, 224, 3): normalised here
        images = normalize_uint8(images)
    return {"index": batch["index"], "view": batch["view"], "images": images,
            "student_visible": batch["student_visible"].to(device), "teachers": {}}
