"""`inspect`: one sample of a feature store as a picture.

A sample is (image index i, view v). The panel shows what both stages agreed on for it:

- the view: the stored crop box and flip of image i, decoded by the PIL reference decoder
  (exactly the pixels the teachers saw);
- each teacher's mask: the stored visible patch ids drawn on the crop (hidden patches
  dimmed), checked against a fresh draw from ``store/views.py``;
- the student's mask at the first epoch that trains on this view (epoch e uses view
  (e + i) mod V, so that is epoch ``slot_of(i, v)``; any other epoch can be asked for);
- optionally, per-position gate weights w_k(p) as 14 x 14 maps, one per teacher. They need
  a trained student, so they are computed above this layer (``train/report.py``) and
  passed in.

Errors name the store, the data and what differs: an index or view out of range, a store
that was not extracted from this data, an incomplete block.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from store import views as V
from store.decode import pil_view
from store.features import DataInfo, FeatureStore, StoreError

__all__ = ["SampleView", "load_sample", "mask_image", "render_panel", "write_panel"]

PATCH = 16


@dataclass
class SampleView:
    """Everything the panel shows about one (image, view) of a store.

    crop: (224, 224, 3) uint8 RGB; teacher_visible: {name: (n_k,) int64 ascending};
    student_visible: (n,) int64 ascending; box: (4,) int64 [x, y, w, h]; tokens (only with
    ``with_tokens``): {name: (1 + n_k, 768) float32, CLS first}.
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


def load_sample(store_path, data, *, index: int, view: int = 0, epoch: int | None = None,
                n_student: int = V.STUDENT_VISIBLE, teachers: list[str] | None = None,
                with_tokens: bool = False) -> SampleView:
    """Read sample (index, view) of the store at ``store_path`` extracted from ``data``.

    data: a ``store.shards.ImageSet``. epoch: the student mask's epoch (default: the first
    epoch that trains on this view). Raises ``StoreError`` if the store does not belong to
    ``data`` or the block is incomplete, ``IndexError`` for an index or view out of range.
    """
    try:
        fs = FeatureStore.open(store_path, data=DataInfo.of(data))
    except StoreError as error:
        raise StoreError(f"{error}\n  (the store was not extracted from the data at {data.root}: "
                         "pass the --data it was made from)") from None
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
    visible, tokens, untrained, box, flip = {}, {}, {}, None, None
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
        if with_tokens:
            tokens[name] = ts.decode({k: row[k][0] for k in ts.payload_keys}).float().numpy()
    idx = np.array([index])
    fresh_box, fresh_flip = V.view_params(fs.seed, idx, np.array([view]), data.widths[idx], data.heights[idx])
    if not (np.array_equal(fresh_box[0], box) and bool(fresh_flip[0]) == flip):
        raise StoreError(f"{store_path}: stored crop {box.tolist()} (flip {flip}) of image {index} view {view} "
                         f"differs from the view drawn from seed {fs.seed}: {fresh_box[0].tolist()}")
    crop = pil_view(data.read(index), box, flip)
    student = V.student_visible(fs.seed, idx, epoch, n_visible=n_student)[0]
    return SampleView(store=Path(store_path), index=index, view=view, slot=slot, epoch=epoch, box=box,
                      flip=flip, crop=crop, teacher_visible=visible, student_visible=student,
                      label=int(data.labels[index]), source=data.source(index), seed=fs.seed,
                      untrained=untrained, tokens=tokens if with_tokens else None)


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


def render_panel(sample: SampleView, out_png, *, weights: dict | None = None,
                 weights_title: str = "gate weight", title: str | None = None) -> Path:
    """Draw the panel to ``out_png`` (PNG, matplotlib Agg).

    weights: {teacher: (196,) float in [0, 1], NaN where the teacher did not see p}, the
    per-position gate weights (row-major 14 x 14), or None to leave that row out.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(sample.teacher_visible)
    cols = 2 + len(names)
    rows = 2 if weights else 1
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.75 * rows + 0.4), dpi=110, squeeze=False)
    tiles = [("view" + (" (flipped)" if sample.flip else ""), sample.crop)]
    for name in names:
        vis = sample.teacher_visible[name]
        tiles.append((f"{name}{' (untrained)' if sample.untrained[name] else ''}\n"
                      f"{len(vis)}/{V.NUM_PATCHES} visible", mask_image(sample.crop, vis)))
    tiles.append((f"student, epoch {sample.epoch}\n{len(sample.student_visible)}/{V.NUM_PATCHES} visible",
                  mask_image(sample.crop, sample.student_visible)))
    for ax, (label, img) in zip(axes[0], tiles):
        ax.imshow(img)
        ax.set_title(label, fontsize=8)
    if weights:
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad=(0.35, 0.35, 0.35, 0.9))
        image = None
        for ax, name in zip(axes[1], names):
            w = np.asarray(weights[name], dtype=np.float64).reshape(V.GRID, V.GRID)
            ax.imshow(sample.crop)
            image = ax.imshow(np.ma.masked_invalid(w), cmap=cmap, vmin=0.0, vmax=1.0, alpha=0.8,
                              extent=(0, 224, 224, 0), interpolation="nearest")
            mean = np.nanmean(w) if np.isfinite(w).any() else float("nan")
            ax.set_title(f"{weights_title} {name}\nmean {mean:.2f} where seen", fontsize=8)
        dominant = np.full(V.NUM_PATCHES, np.nan)
        stack = np.stack([np.nan_to_num(np.asarray(weights[n], dtype=np.float64), nan=-1.0) for n in names])
        seen = (stack >= 0).any(0)
        dominant[seen] = stack[:, seen].argmax(0)
        ax = axes[1][len(names)]
        tab = matplotlib.colormaps["tab10"].resampled(10)
        colors = matplotlib.colors.ListedColormap([tab(k) for k in range(len(names))]).with_extremes(
            bad=(0.35, 0.35, 0.35, 0.9))
        ax.imshow(sample.crop)
        ax.imshow(np.ma.masked_invalid(dominant.reshape(V.GRID, V.GRID)), cmap=colors, vmin=-0.5,
                  vmax=len(names) - 0.5, alpha=0.7, extent=(0, 224, 224, 0), interpolation="nearest")
        ax.set_title("largest weight", fontsize=8)
        handles = [matplotlib.patches.Patch(color=tab(k), label=n) for k, n in enumerate(names)]
        ax.legend(handles=handles, fontsize=6, loc="lower right", framealpha=0.8)
        axes[1][-1].axis("off")
        fig.colorbar(image, ax=axes[1][-1], fraction=0.6, label="w_k(p); grey: not seen")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title or f"{sample.store.name}: image {sample.index} ({sample.source}), view {sample.view}, "
                 f"crop {sample.box.tolist()}", fontsize=9)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def write_panel(store_path, data, *, index: int, view: int = 0, out_png, epoch: int | None = None,
                weights: dict | None = None) -> Path:
    """``load_sample`` + ``render_panel``: the picture of one sample, without gate weights
    unless they are given."""
    sample = load_sample(store_path, data, index=index, view=view, epoch=epoch)
    return render_panel(sample, out_png, weights=weights)
