"""Every figure of the project, drawn with matplotlib (Agg) to PNG files: a run's loss curves
(``plot_losses``: RUN/loss.png, the demo report's losses.png), each teacher's mean gate weight
against step (``plot_gate_shares``) and one stored sample's panel (``render_panel``: the view,
each teacher's and the student's mask, with gate weights w_k(p) per teacher and which teacher
weighs most; `cli.py inspect`, the demo report's panels)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from data import views as V
from store.inspect import SampleView, mask_image

__all__ = ["plot_gate_shares", "plot_losses", "render_panel"]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_losses(rows, out_png) -> Path | None:
    """Total, token and spatial loss against step, one panel each (their scales differ).

    rows: RUN/metrics.jsonl as rows (``core.run.read_metrics``) or the path of that file, or
    {label: rows} for several runs (a sweep's learners: one line each, with a legend); the keys
    the rows lack get no panel. Returns None (and writes nothing) when there are no rows."""
    if isinstance(rows, (str, Path)):
        from core.run import read_metrics
        rows = read_metrics(rows)
    runs = {k: v for k, v in rows.items() if v} if isinstance(rows, Mapping) else ({"": rows} if rows else {})
    first = next(iter(runs.values()), [])
    panels = [(k, label) for k, label in (("loss", "total"), ("loss_token", "token loss (CLS + visible tokens)"),
                                          ("loss_spatial", "spatial loss (14x14 maps)")) if first and k in first[0]]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(10 * len(panels) / 3, 3), dpi=110, squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for name, run in runs.items():
            ax.plot([r["step"] for r in run], [r.get(key, float("nan")) for r in run], marker=".", lw=1,
                    label=name or None)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("loss")
    if len(runs) > 1:
        axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)


def plot_gate_shares(rows: list[dict], out_png) -> Path:
    """Each teacher's mean gate weight (its share of the fused targets) against step."""
    plt = _pyplot()
    names = [k.split("/", 1)[1] for k in rows[0] if k.startswith("gate/")]
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=110)
    for name in names:
        ax.plot(steps, [r[f"gate/{name}"] for r in rows], marker=".", lw=1, label=name)
    ax.axhline(1 / max(1, len(names)), color="grey", lw=0.8, ls="--", label="uniform")
    ax.set_xlabel("step")
    ax.set_ylabel("mean gate weight")
    ax.set_title("teachers' share of the fused targets", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)


def render_panel(sample: SampleView, out_png, *, weights: dict | None = None,
                 weights_title: str = "gate weight", title: str | None = None) -> Path:
    """Draw the panel to ``out_png`` (PNG, matplotlib Agg).

    weights: {teacher: (196,) float in [0, 1], NaN where the teacher did not see p}, the
    per-position gate weights (row-major 14 x 14), or None to leave that row out.
    """
    plt = _pyplot()
    import matplotlib

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
