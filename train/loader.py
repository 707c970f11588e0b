"""Training batches: from the feature store (cached) or from teachers run every step (online).

The order (which samples global batch k of epoch e holds, which rank serves which part,
steps per epoch, ``data.streams=auto``) is data/order.py; ``Plan`` joins it to the data.
``resolve_data`` turns ``auto`` (streams, and views, which come from the store) into numbers
once, when a run starts; the run's config.yaml records them.

Both sources give the same batch for the same step: the same images, views (e + i) mod V,
crops, flips and student masks; only where the teacher tokens come from differs.
Features and images are joined by index: a block's ``index`` array is checked against the
image indices it must hold, and every teacher's crops against the others'. Every file of a
block is checked as it is read (crc32c, the view tars against their completion records), and
a block's masks against the keyed draw the first time a run reads it.

Batches are made in a background thread (``core/prefetch.py``) while the step runs; on
CUDA that thread also pins what the step reads and copies it to the GPU on its own stream,
and the step's stream waits for an event, not the host. Index and view stay on the host.
Inside that thread the cached path reads each stream's next window of blocks ahead in a
second thread, finds the batch's rows by binary search (no per-sample Python), and keeps one
batch decoding in DALI (submit/get) while it gathers the next one's rows. Stored views travel
as uint8 (B, 224, 224, 3), a quarter of the float32 bytes, and are normalised on the training
device in ``materialize``.
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch

from data import views as V
from data.decode.pixels import normalize_uint8
from data.decoders import resolve_decoder
from store.features import DataInfo, FeatureStore, StoreError
from core.prefetch import DeviceCopier, Prefetch
from teachers.descriptors import DESCRIPTORS, PAPER_TEACHERS
from train.config import AUTO, Config
from train.requirements import check_mask_ratio, student_pixels
from data.order import Order, auto_streams, steps_per_epoch  # noqa: F401 (steps_per_epoch: old import path)


def resolve_data(cfg: Config, data, *, recorded: Mapping | None = None) -> Config:
    """``cfg`` with ``data.teachers`` set to names, ``data.views`` and ``data.streams`` to numbers,
    ``data.pixels`` to ``views`` or ``source`` and ``data.decoder`` to ``dali`` or ``pil``.

    ``teachers``: ``auto`` takes the recorded list (a resumed run keeps its teachers if the
    store gains one), else every teacher of the store in registry order (teachers/descriptors.py),
    else, without a store, the paper's three.

    data: the packed image set (store/shards.ImageSet). ``views``: ``auto`` takes the store's
    V (1 without a store: online-fresh); an explicit v < V trains on the store's first v slots
    (``Plan.store_views``); more views than the store holds are refused (StoreError naming the
    store and the key).
    ``streams``: ``auto`` takes ``recorded["streams"]`` when given (the ``data`` section of
    the config a resumed run recorded), else ``auto_streams``.
    ``pixels``: ``auto`` takes the recorded value, else ``views`` for a cached run whose store's
    view pixels are complete (store/viewpixels.py) and are what its teachers ran on
    (``student_pixels``), else ``source``; so a resumed run keeps its images even if view
    pixels were added meanwhile.
    ``decoder``: ``auto`` takes the recorded value, else ``dali`` where DALI is installed, else
    ``pil`` (data/decoders.py); so a resumed run never changes decoder silently."""
    teachers = cfg.data.teachers
    if teachers == AUTO:
        teachers = (recorded or {}).get("teachers", AUTO)
    if teachers == AUTO:
        teachers = PAPER_TEACHERS
        if cfg.data.store:
            held = FeatureStore.open(cfg.data.store).teachers
            teachers = tuple(n for n in DESCRIPTORS if n in held)
            unknown = sorted(set(held) - set(teachers))
            if unknown:
                raise StoreError(f"{cfg.data.store}: holds teachers {unknown} that teachers/descriptors.py does not "
                                 f"describe; set data.teachers to the ones to train")
            if not teachers:
                raise StoreError(f"{cfg.data.store}: holds no teachers; run extract first")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, teachers=tuple(teachers)))
    if cfg.data.decoder == AUTO:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, decoder=resolve_decoder((recorded or {}).get("decoder", AUTO))))
    views, store = cfg.data.views, None
    if cfg.data.store:
        store = FeatureStore.open(cfg.data.store)
        if views == AUTO:
            views = store.views
        elif not 1 <= views <= store.views:
            raise StoreError(f"{store.path}: holds {store.views} views per image but the config sets "
                             f"data.views={views}; set data.views to auto or to 1..{store.views}")
    elif views == AUTO:
        views = 1           # no store (online-fresh): no cached views; V only picks the statistics' views
    streams = cfg.data.streams
    if streams == AUTO:
        streams = (recorded or {}).get("streams", AUTO)
    if streams == AUTO:
        shards = [[int(s["first"]), int(s["count"])] for s in data.shards]
        streams = auto_streams(shards, global_batch=cfg.train.batch_size)
    pixels = cfg.data.pixels
    if pixels == AUTO:
        pixels = (recorded or {}).get("pixels", AUTO)
    if pixels == AUTO:
        pixels = "source"
        if store is not None and cfg.data.source == "cached":
            pixels, _ = student_pixels(store, [store.teacher(n) for n in cfg.data.teachers if n in store.teachers],
                                       AUTO)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, views=int(views), streams=int(streams),
                                                             pixels=pixels))


def store_views(cfg: Config) -> int:
    """The V of the store a resolved ``cfg`` reads (``cfg.data.views`` without a store)."""
    return FeatureStore.open(cfg.data.store).views if cfg.data.store else int(cfg.data.views)


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
    def of(cls, cfg: Config, data, *, rank: int = 0, world: int = 1) -> "Plan":
        """The plan of a resolved run config (``resolve_data``) over ``data``, for one rank."""
        return cls(data, seed=cfg.data.seed, views=cfg.data.views, store_views=store_views(cfg),
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
    """Batches whose teacher tokens come from the store, read by whole blocks.

    ``pixels`` (``data.pixels``): ``views`` reads the images from the store's view tars
    (store/viewpixels.py) and never opens an original image shard; ``source`` decodes the
    original images with the stored crops; ``auto`` takes the view tars when they are complete."""

    def __init__(self, plan: Plan, *, store_path, teachers, pixels: str = "source", **kw):
        super().__init__(plan, **kw)
        self.fs = FeatureStore.open(store_path, data=DataInfo.of(plan.data), views=plan.store_views,
                                   seed=plan.seed)
        self.stores = {}
        for name in teachers:
            ts = self.fs.teacher(name)
            ts.require_complete()
            check_mask_ratio(ts)
            self.stores[name] = ts
        # (teacher, slot, shard) whose masks this run compared with the keyed draw: once per block,
        # as later reads pass the crc32c only with the same bytes (a comparison costs 1-10% of
        # the images/s per core of a read, docs/performance.md "Read-time checks")
        self.masks_checked: set[tuple[str, int, int]] = set()
        _, self.view_pixels = student_pixels(self.fs, list(self.stores.values()), pixels)
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
        slot = epoch % plan.views
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

    def __init__(self, plan: Plan, *, teachers: dict, amp: bool = False, **kw):
        super().__init__(plan, **kw)
        self.teachers = teachers          # name -> teachers.vit.Teacher, on the training device
        self.amp = amp

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
    images = batch["images"].to(device)
    if images.dtype == torch.uint8:      # stored views come as uint8 (B, 224, 224, 3): normalised here
        images = normalize_uint8(images)
    return {"index": batch["index"], "view": batch["view"], "images": images,
            "student_visible": batch["student_visible"].to(device), "teachers": {}}
