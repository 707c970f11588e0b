"""`inspect`: one sample (image index i, view v) of a feature store, read as the panel
(``train/plots.py: render_panel``) draws it: the pixels the teachers saw, each teacher's mask
checked against a fresh draw, the student's mask (docs/running.md, section 3). Gate weights need a
trained student and are computed above this layer (``train/diagnostics.py``)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data import views as V
from data.decode import pil_view
from data.decode.stored import pil_stored_views
from store.features import DataInfo, FeatureStore, StoreError
from store.viewpixels import ViewPixels
from teachers.descriptors import teacher_order

__all__ = ["SampleView", "open_store", "load_sample", "load_sample_views", "mask_image"]

PATCH = 16


@dataclass
class SampleView:
    """Everything the panel shows about one (image, view) of a store.

    crop: (224, 224, 3) uint8 RGB, the pixels the teachers ran on; teacher_visible: {name: (n_k,)
    int64 ascending}; student_visible: (n,) int64 ascending; box: (4,) int64 [x, y, w, h]; tokens (only with
    ``with_tokens``): {name: (1 + n_k, C) float32, CLS first}.
    """
    store: Path
    index: int
    view: int
    slot: int
    epoch: int
    box: np.ndarray
    flip: bool
    crop: np.ndarray
    teacher_visible: dict
    student_visible: np.ndarray
    label: int
    source: str
    seed: int
    untrained: dict
    tokens: dict | None = None


def open_store(store, data) -> FeatureStore:
    """The store (a path, opened here, or a FeatureStore already open), which must have been
    extracted from ``data`` (a ``data.shards.ImageSet``); else StoreError naming both."""
    info = DataInfo.of(data)
    hint = f"\n  (the store was not extracted from the data at {data.root}: pass the --data it was made from)"
    if isinstance(store, FeatureStore):
        if (store.data_digest, store.num_samples, [list(s) for s in store.shards]) != \
                (info.digest, info.num_samples, info.shards):
            raise StoreError(f"{store.path}: store does not match this data: it holds {store.num_samples} images "
                             f"of digest {store.data_digest[:12]}, the data {info.num_samples} of {info.digest[:12]}"
                             + hint)
        return store
    try:
        return FeatureStore.open(store, data=info)
    except StoreError as error:
        raise StoreError(f"{error}{hint}") from None


def load_sample(store, data, *, index: int, view: int = 0, epoch: int | None = None,
                n_student: int = V.STUDENT_VISIBLE, teachers: list[str] | None = None,
                with_tokens: bool = False) -> SampleView:
    """Read sample (index, view) of the store extracted from ``data``: ``load_sample_views`` of one."""
    return load_sample_views(store, data, indices=[index], views=[view], epoch=epoch, n_student=n_student,
                             teachers=teachers, with_tokens=with_tokens)[0]


def load_sample_views(store, data, *, indices, views=None, epoch: int | None = None,
                      n_student: int = V.STUDENT_VISIBLE, teachers: list[str] | None = None,
                      with_tokens: bool = False) -> list[SampleView]:
    """Read samples (indices[k], views[k]) (view 0 unless ``views``) of the store extracted from
    ``data``, the store (a path, or a FeatureStore already open: ``open_store``) and its view
    pixels opened once for all of them.

    data: a ``data.shards.ImageSet``. epoch: the student mask's epoch (default: the first epoch
    that trains on each view). Raises ``StoreError`` if the store does not belong to ``data`` or
    a block is incomplete, ``IndexError`` for an index or view out of range.
    """
    fs = open_store(store, data)
    view_pixels = functools.cache(lambda: ViewPixels.open(fs))      # opened by the first JPEG view read
    views = [0] * len(indices) if views is None else list(views)
    return [_load(fs, view_pixels, data, index=int(i), view=int(v), epoch=epoch, n_student=n_student,
                  teachers=teachers, with_tokens=with_tokens) for i, v in zip(indices, views)]


def _load(fs: FeatureStore, view_pixels, data, *, index: int, view: int, epoch: int | None, n_student: int,
          teachers: list[str] | None, with_tokens: bool) -> SampleView:
    """Sample (index, view) of ``fs``; ``view_pixels()`` gives the store's ViewPixels."""
    store_path = fs.path
    if not 0 <= index < fs.num_samples:
        raise IndexError(f"index {index} is out of range: {store_path} holds images 0..{fs.num_samples - 1}")
    if not 0 <= view < fs.views:
        raise IndexError(f"view {view} is out of range: {store_path} holds views 0..{fs.views - 1} per image")
    names = teachers or sorted(fs.teachers, key=teacher_order)
    if not names:
        raise StoreError(f"{store_path}: the store holds no teacher")
    slot = int(V.slot_of(np.array([index]), np.array([view]), fs.views)[0])
    epoch = slot if epoch is None else int(epoch)
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    visible, tokens, untrained, jpeg, box, flip = {}, {}, {}, [], None, None
    for name in names:
        ts = fs.teacher(name)
        row = ts.read_samples(slot, [index])
        if int(row["index"][0]) != index or int(row["view"][0]) != view:
            raise StoreError(f"{ts.path}: row (slot {slot}, image {index}) holds image "
                             f"{int(row['index'][0])} view {int(row['view'][0])}, expected view {view}")
        b, f = row["boxes"][0].astype(np.int64), bool(row["flips"][0])
        if box is None:
            box, flip = b, f
        elif not (np.array_equal(b, box) and f == flip):
            raise StoreError(f"{ts.path}: teacher {name!r} stores another crop for image {index} view "
                             f"{view} than {names[0]!r} ({b.tolist()} vs {box.tolist()})")
        visible[name] = row["visible"][0].astype(np.int64)
        untrained[name] = bool(ts.config.get("untrained"))
        if ts.input == "jpeg":
            jpeg.append(name)
        if with_tokens:
            tokens[name] = ts.decode({k: row[k][0] for k in ts.payload_keys}).float().numpy()
    idx = np.array([index])
    fresh_box, fresh_flip = V.view_params(fs.seed, idx, np.array([view]), data.widths[idx], data.heights[idx])
    if not (np.array_equal(fresh_box[0], box) and bool(fresh_flip[0]) == flip):
        raise StoreError(f"{store_path}: stored crop {box.tolist()} (flip {flip}) of image {index} view {view} "
                         f"differs from the view drawn from seed {fs.seed}: {fresh_box[0].tolist()}")
    crop = _stored_view(fs, view_pixels(), slot, index, jpeg) if jpeg else pil_view(data.read(index), box, flip)
    student = V.student_visible(fs.seed, idx, epoch, n_visible=n_student)[0]
    return SampleView(store=Path(store_path), index=index, view=view, slot=slot, epoch=epoch, box=box,
                      flip=flip, crop=crop, teacher_visible=visible, student_visible=student,
                      label=int(data.labels[index]), source=data.source(index), seed=fs.seed,
                      untrained=untrained, tokens=tokens if with_tokens else None)


def _stored_view(fs: FeatureStore, vp: ViewPixels | None, slot: int, index: int, teachers: list[str]) -> np.ndarray:
    """(224, 224, 3) uint8: the JPEG view of ``index`` in ``slot`` that ``teachers`` ran on,
    decoded by PIL as training decodes it, from the store's view pixels ``vp`` (StoreError when
    the store lacks its block)."""
    shard = int(np.searchsorted([first for first, _ in fs.shards], index, side="right") - 1)
    if vp is None or not vp.is_complete(slot, shard):
        raise StoreError(f"{fs.path}: teachers {', '.join(teachers)} ran on the stored JPEG views, but the view "
                         f"block (slot {slot}, shard {shard}) of image {index} is missing; resume `python cli.py "
                         "extract --view-pixels jpeg`")
    _, datas = vp.read_block(slot, shard)
    return pil_stored_views([datas[index - fs.shards[shard][0]]], normalize=False)[0].numpy()


def mask_image(crop: np.ndarray, visible: np.ndarray, *, dim: float = 0.25) -> np.ndarray:
    """The crop with hidden patches dimmed toward a dark blue (visible on grey photos too).

    crop: (224, 224, 3) uint8; visible: (n,) int64 patch ids of the 14 x 14 grid.
    Returns (224, 224, 3) uint8.
    """
    hidden = np.ones(V.NUM_PATCHES, dtype=bool)
    hidden[np.asarray(visible, dtype=np.int64)] = False
    cells = np.kron(hidden.reshape(V.GRID, V.GRID), np.ones((PATCH, PATCH), dtype=bool))
    out = crop.astype(np.float32)
    out[cells] = dim * out[cells] + (1 - dim) * np.array([30.0, 30.0, 70.0], dtype=np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)
