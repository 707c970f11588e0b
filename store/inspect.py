"""`inspect`: one sample of a feature store, as the panel (``train/plots.py: render_panel``) draws it.

A sample is (image index i, view v). The panel shows what both stages agreed on for it:

- the view: exactly the pixels the teachers saw: the store's JPEG view where they ran on it
  (teacher input ``jpeg``), else the stored crop box and flip of image i decoded by the PIL
  reference decoder;
- each teacher's mask: the stored visible patch ids drawn on the crop (hidden patches
  dimmed), checked against a fresh draw from ``data/views.py``;
- the student's mask at the first epoch that trains on this view (epoch e uses view
  (e + i) mod V, so that is epoch ``slot_of(i, v)``; any other epoch can be asked for);
- optionally, per-position gate weights w_k(p) as 14 x 14 maps, one per teacher. They need
  a trained student, so they are computed above this layer (``train/diagnostics.py``) and
  passed in.

Errors name the store, the data and what differs: an index or view out of range, a store
that was not extracted from this data, an incomplete block.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data import views as V
from data.decode import pil_view
from data.decode.stored import pil_stored_views
from store.features import DataInfo, FeatureStore, StoreError
from store.viewpixels import ViewPixels

__all__ = ["SampleView", "open_store", "load_sample", "mask_image"]

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


def open_store(store_path, data) -> FeatureStore:
    """The store at ``store_path``, which must have been extracted from ``data`` (a
    ``data.shards.ImageSet``); else StoreError naming both."""
    try:
        return FeatureStore.open(store_path, data=DataInfo.of(data))
    except StoreError as error:
        raise StoreError(f"{error}\n  (the store was not extracted from the data at {data.root}: "
                         "pass the --data it was made from)") from None


def load_sample(store_path, data, *, index: int, view: int = 0, epoch: int | None = None,
                n_student: int = V.STUDENT_VISIBLE, teachers: list[str] | None = None,
                with_tokens: bool = False) -> SampleView:
    """Read sample (index, view) of the store at ``store_path`` extracted from ``data``.

    store_path: a path, or a FeatureStore that ``open_store(path, data)`` opened (callers that
    read many samples open it once). data: a ``data.shards.ImageSet``. epoch: the student
    mask's epoch (default: the first epoch that trains on this view). Raises ``StoreError`` if
    the store does not belong to ``data`` or the block is incomplete, ``IndexError`` for an
    index or view out of range.
    """
    fs = store_path if isinstance(store_path, FeatureStore) else open_store(store_path, data)
    store_path = fs.path
    if not 0 <= index < fs.num_samples:
        raise IndexError(f"index {index} is out of range: {store_path} holds images 0..{fs.num_samples - 1}")
    if not 0 <= view < fs.views:
        raise IndexError(f"view {view} is out of range: {store_path} holds views 0..{fs.views - 1} per image")
    names = teachers or sorted(fs.teachers, key=lambda n: V.TEACHER_IDS.get(n, len(V.TEACHER_IDS)))
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
    crop = _stored_view(fs, slot, index, jpeg) if jpeg else pil_view(data.read(index), box, flip)
    student = V.student_visible(fs.seed, idx, epoch, n_visible=n_student)[0]
    return SampleView(store=Path(store_path), index=index, view=view, slot=slot, epoch=epoch, box=box,
                      flip=flip, crop=crop, teacher_visible=visible, student_visible=student,
                      label=int(data.labels[index]), source=data.source(index), seed=fs.seed,
                      untrained=untrained, tokens=tokens if with_tokens else None)


def _stored_view(fs: FeatureStore, slot: int, index: int, teachers: list[str]) -> np.ndarray:
    """(224, 224, 3) uint8: the JPEG view of ``index`` in ``slot`` that ``teachers`` ran on,
    decoded by PIL as training decodes it (StoreError when the store lacks its block)."""
    vp = ViewPixels.open(fs)
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
