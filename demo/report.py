"""The demo report: OUT/report/README.md from what the stages measured (demo/pipeline.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["write_markdown"]


def _table(header: list[str], rows: list[list], *, align: str | None = None) -> str:
    """A Markdown table; ``align`` has one letter per column, "l" or "r" (default: "lrr...r")."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _stage_table(stages: list[dict], first: dict | None) -> str:
    """This invocation's stages; with ``first`` (stage -> seconds of the first invocation, which
    did the work this one reused), a column with those times too."""
    def sec(x):
        return f"{x:.1f}" if x is not None and np.isfinite(x) else "-"
    if first is None:
        return _table(["stage", "seconds", "what happened"],
                      [[s["stage"], sec(s["seconds"]), s["note"]] for s in stages], align="lrl")
    return _table(["stage", "first run (s)", "this run (s)", "what happened in this run"],
                  [[s["stage"], sec(first.get(s["stage"])), sec(s["seconds"]), s["note"]] for s in stages],
                  align="lrrl")


def write_markdown(path, info: dict) -> Path:
    """Write the demo report (README.md) from the ``info`` dict that demo/pipeline.py gathers."""
    t = info["teachers"]
    untrained = [n for n, v in t.items() if v["untrained"]]
    lines = ["# CoMAD demo report", ""]
    if untrained:
        lines += [f"**The teachers {', '.join(untrained)} are UNTRAINED (random initialisation)**: no official "
                  "checkpoint was given (`--checkpoints DIR`). Everything below exercises the real pipeline, "
                  "but the student distils random features; its numbers say nothing about the paper's.", ""]
    lines += ["Teachers: " + ", ".join(f"{n} ({'random init' if v['untrained'] else v['source']})"
                                        for n, v in t.items()) + ".", "",
              f"Data: {info['data']['train']} training images and {info['data']['heldout']} held-out images "
              f"(scikit-image photos; the held-out ones are crops never used in training), "
              f"{info['data']['views']} cached views per training image, device `{info['device']}`.", "",
              "## Stages", "", _stage_table(info["stages"], info.get("first_stages")), ""]
    run = info["run"]
    lines += ["## Training", "",
              f"{run['steps']} steps of batch {run['batch_size']} (lr {run['lr']:.2g}, cached store), final loss "
              f"{run['final']['loss']:.4f} (token {run['final']['loss_token']:.4f}, spatial "
              f"{run['final']['loss_spatial']:.4f}); run folder `{run['dir']}`.", "",
              "![losses](losses.png)", "", "![gate shares](gates.png)", ""]
    c = info["cka"]
    names = [n for n in t]
    lines += ["## Quality check: linear CKA on held-out views", "",
              f"Linear CKA between the student's encoder tokens (CLS + its 49 visible patches) and the fused "
              f"teacher targets at the same positions, over {c['tokens']} tokens of the held-out views (student "
              "positions no teacher saw have no target); the untrained student is the same config and seed "
              "before any step. The targets use the run's adapters and its gate without the student-affinity "
              f"term (`{c['gate']}` weights), so they are the same for both rows. Per-teacher columns compare "
              "with one teacher's adapted tokens where it saw the patch. If distillation were broken, the "
              "trained row would stay at the untrained level.", "",
              _table(["student", "fused targets", *names],
                     [[lab, f"{c['fused'][lab]:.3f}", *[f"{c[n][lab]:.3f}" for n in names]]
                      for lab in ("trained", "untrained")]), "",
              f"Trained minus untrained, fused targets: {c['fused']['trained'] - c['fused']['untrained']:+.3f}. "
              "At this scale (tens of images, untrained teachers, a few hundred steps) the margin is small; "
              "the per-teacher columns need not rise, since the student is pulled toward the fused target, "
              "not toward any one teacher.", ""]
    lines += ["## Gate weights on held-out views", "",
              "Each panel: the view (decoded crop), each teacher's mask (dimmed = hidden), the student's mask, "
              "and below the per-position gate weight w_k(p) of each teacher (grey: that teacher did not see "
              "the patch) and which teacher weighs most.", ""]
    lines += [f"![panel]({p})" for p in info["panels"]] + [""]
    lines += ["## Training throughput", ""]
    tp = info["throughput"]
    if tp.get("rows"):
        lines += [f"Measured in this demo on `{tp['device']}`, batch {tp['batch_size']}: the cached row is the "
                  "training stage's own rate (the median of "
                  f"{tp.get('cached_intervals', '?')} logged intervals of the run; the first, with the start-up, is "
                  "left out when there are others); ceiling and online are "
                  f"`train.throughput.measure` after {tp['warmup']} warm-up step (ceiling: the median of 3 rounds of "
                  f"{tp['steps']} timed steps; online: 1 round of {tp.get('online_steps', tp['steps'])}). Short "
                  "measurements, noisy on a shared CPU.", "",
                  _table(["path", "images/s", "x online", "/ ceiling"],
                         [[r["mode"], f"{r['images_per_second']:.1f}",
                           "-" if r.get("vs_online") is None else f"{r['vs_online']:.2f}",
                           "-" if r.get("vs_ceiling") is None else f"{r['vs_ceiling']:.2f}"] for r in tp["rows"]]),
                  "", "cached: store blocks + DALI decoding + the step; online: the same decoding plus the three "
                  "teachers every step; ceiling: the step alone on batches already in memory.", ""]
    else:
        lines += [f"Not measured: {tp.get('skipped', 'unknown reason')}.", ""]
    sz = info["sizes"]
    lines += ["## Store size per codec", "",
              f"Measured by encoding {sz['measured_samples']} stored (image, view) samples of every teacher with "
              "each codec and compressing with zstd level 1 (the store's compressor); per (image, view) for the "
              "three teachers together; the error is relative to the stored fp16 tokens. The demo store itself "
              f"is fp16: its files hold {sz['actual_bytes'] / 2**20:.1f} MiB, of which "
              f"{sz['stats_bytes'] / 2**20:.1f} MiB are the adapter statistics and "
              f"{(sz['actual_bytes'] - sz['stats_bytes']) / 2**20:.1f} MiB the samples (projected from the "
              f"measurement: {sz['projected_fp16_bytes'] / 2**20:.1f} MiB).", "",
              _table(["codec", "raw KiB", "zstd KiB", "rel. error", "this demo (MiB)",
                      "ImageNet-1K x 4 views (TiB)"],
                     [[r["codec"], f"{r['raw_bytes'] / 1024:.1f}", f"{r['zstd_bytes'] / 1024:.1f}",
                       f"{r['rel_error']:.4f}", f"{r['demo_bytes'] / 2**20:.1f}",
                       f"{r['imagenet_bytes'] / 2**40:.2f}"] for r in sz["rows"]]), ""]
    if info.get("reused"):
        lines += ["## Reused from an earlier run", "", *[f"- {r}" for r in info["reused"]], ""]
    path = Path(path)
    path.write_text("\n".join(lines))
    return path
