"""What a training run learned, as numbers and pictures: CKA, gate maps, figures, Markdown.

- ``load_run``: rebuild a run's objective (student, decoder, adapters) from RUN/last.pt; the
  frozen adapters are rebuilt from the statistics of the store the run trained on.
- ``sample_batch``: samples of a store as an objective batch (PIL reference decoder).
- ``gate_maps``: per-position gate weights w_k(p) of one sample, as the panel shows them.
- ``cka_scores``: linear CKA between the student's encoder tokens and the fused teacher
  targets on some views, for a trained and an untrained student. The number falls to the
  untrained level if distillation does nothing, so it is the demo's quality check.
- ``plot_losses``/``plot_gate_shares`` and ``write_markdown``: the demo report.

The fused targets of the CKA use the run's adapters and its gate without the student
affinity term (``consensus`` -> ``agreement``, ``affinity`` -> ``uniform``), so they depend on
no student: the same target matrix serves the trained and the untrained student, and the
two numbers differ only in the students' features. Per-teacher columns compare with one
teacher's adapted tokens where that teacher saw the patch.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from store import views as V
from store.decode import normalize_uint8
from store.features import FeatureStore, StoreError
from store.inspect import SampleView, load_sample

__all__ = ["linear_cka", "load_run", "load_samples", "sample_batch", "gate_maps", "cka_scores", "plot_losses",
           "plot_gate_shares", "read_metrics", "write_markdown"]


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) between two feature sets of the same N examples.

    x: (N, D1), y: (N, D2) float (any dtype; computed in float64). Both are centred over N;
    CKA = ||y^T x||_F^2 / (||x^T x||_F ||y^T y||_F), in [0, 1], 1 for features equal up to
    an orthogonal transform and an isotropic scale.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs (N, D1) and (N, D2), got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"linear_cka needs at least 2 examples, got {x.shape[0]}")
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = (y.T @ x).square().sum()
    norm = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(cross / norm) if norm > 0 else 0.0


def load_run(run_dir, *, device: str = "cpu", store_path=None, trained: bool = True):
    """(config, objective in eval mode) of the run in ``run_dir``.

    The student side comes from RUN/last.pt (``trained=False`` keeps the seeded initial
    weights of the same config: the untrained baseline). Frozen adapters are not in the
    checkpoint; they are rebuilt from the statistics of ``store_path`` (default: the run's
    ``data.store``), which must be the store the run trained on.
    """
    from train.config import Config
    from train.objective import build_objective

    run_dir = Path(run_dir)
    ck_path = run_dir / "last.pt"
    if not ck_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no checkpoint (last.pt); is it a training run folder?")
    ck = torch.load(ck_path, map_location="cpu", weights_only=False)
    cfg = Config.from_dict(ck["meta"]["config"])
    store_path = Path(store_path or cfg.data.store)
    try:
        fs = FeatureStore.open(store_path, views=cfg.data.views, seed=cfg.data.seed)
    except StoreError as error:
        raise StoreError(f"{run_dir} trained on the store {store_path}, which is needed for its adapters: "
                         f"{error}") from None
    stats = {}
    for name in cfg.data.teachers:
        st = fs.teacher(name).stats
        stats[name] = (st["mean"], st["components"])
    objective = build_objective(cfg, stats)
    if trained:
        objective.student_side().load_state_dict(ck["model"])
    return cfg, objective.to(device).eval()


def sample_batch(samples: list[SampleView], teachers, *, device: str = "cpu") -> dict:
    """An objective batch (train/objective.py) from samples loaded ``with_tokens``.

    Returns {"index" (B,), "view" (B,), "images" (B, 3, 224, 224) float32 normalised,
    "student_visible" (B, n) int64, "teachers": {name: {"cls" (B, 768), "patch" (B, n_k, 768),
    "index" (B, n_k) int64}}} on ``device``.
    """
    if not samples:
        raise ValueError("sample_batch: no samples")
    missing = [n for n in teachers if samples[0].tokens is None or n not in samples[0].tokens]
    if missing:
        raise StoreError(f"{samples[0].store}: lacks the tokens of teacher(s) {missing} that the run uses")
    crops = torch.from_numpy(np.stack([s.crop for s in samples]))
    out = {"index": torch.tensor([s.index for s in samples]), "view": torch.tensor([s.view for s in samples]),
           "images": normalize_uint8(crops),
           "student_visible": torch.from_numpy(np.stack([s.student_visible for s in samples])),
           "teachers": {}}
    for name in teachers:
        tok = torch.from_numpy(np.stack([s.tokens[name] for s in samples]))
        out["teachers"][name] = {"cls": tok[:, 0], "patch": tok[:, 1:],
                                 "index": torch.from_numpy(np.stack([s.teacher_visible[name] for s in samples]))}
    return _to(out, device)


def _to(batch: dict, device) -> dict:
    out = {k: v.to(device) for k, v in batch.items() if k != "teachers"}
    out["teachers"] = {n: {k: v.to(device) for k, v in t.items()} for n, t in batch["teachers"].items()}
    return out


def load_samples(store_path, data, *, indices, views=None, epoch: int | None = None,
                 teachers=None) -> list[SampleView]:
    """``load_sample(..., with_tokens=True)`` for each index (view 0 unless ``views``)."""
    views = [0] * len(indices) if views is None else list(views)
    return [load_sample(store_path, data, index=int(i), view=int(v), epoch=epoch, teachers=teachers,
                        with_tokens=True) for i, v in zip(indices, views)]


@torch.no_grad()
def gate_maps(objective, batch: dict) -> list[dict]:
    """Per-sample gate weights: [{teacher: (196,) float64, NaN where the teacher did not see p}]
    from ``objective.forward(batch, return_weights=True)`` (weights (K, B, 197), slot 0 = CLS)."""
    w = objective(batch, return_weights=True)["weights"].float().cpu().numpy()      # (K, B, 197)
    out = []
    for b in range(w.shape[1]):
        maps = {}
        for k, name in enumerate(objective.teacher_names):
            seen = np.zeros(V.NUM_PATCHES, dtype=bool)
            seen[batch["teachers"][name]["index"][b].cpu().numpy()] = True
            maps[name] = np.where(seen, w[k, b, 1:], np.nan)
        out.append(maps)
    return out


def _adapted_grid(objective, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapted teacher tokens on the 197-slot grid: (K, B, 197, D) and seen (K, B, 197) bool."""
    dense, seen = [], []
    for name in objective.teacher_names:
        t = batch["teachers"][name]
        tokens = torch.cat([t["cls"].float().unsqueeze(1), t["patch"].float()], dim=1)
        a = objective.adapters[name](tokens)                                          # (B, 1 + n_k, D)
        b = a.shape[0]
        slots = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=a.device), t["index"] + 1], dim=1)
        grid = torch.zeros(b, 1 + V.NUM_PATCHES, a.shape[-1], dtype=a.dtype, device=a.device)
        dense.append(grid.scatter(1, slots.unsqueeze(-1).expand(-1, -1, a.shape[-1]), a))
        seen.append(torch.zeros(b, 1 + V.NUM_PATCHES, dtype=torch.bool, device=a.device).scatter(1, slots, True))
    return torch.stack(dense), torch.stack(seen)


# The gate of the CKA targets: the run's gate without its student-affinity term.
STUDENT_FREE_GATE = {"consensus": "agreement", "agreement": "agreement", "affinity": "uniform",
                     "uniform": "uniform"}


@torch.no_grad()
def cka_scores(trained, untrained, batch: dict) -> dict:
    """Linear CKA of the trained and the untrained student against the fused targets and
    against each teacher, over CLS + the student-visible patches of every sample in ``batch``.

    trained, untrained: CoMADObjective (same config). Returns {"fused": {"trained", "untrained"},
    "<teacher>": {...}, "tokens": N (rows of the fused comparison), "gate": the target's gate mode}.
    Positions of the student that no teacher saw have no target and are left out.
    """
    from train.gate import fuse, gate_weights

    dense, seen = _adapted_grid(trained, batch)                                        # (K, B, 197, D)
    mode = STUDENT_FREE_GATE[trained.gate_mode]
    w = gate_weights(student=dense[0], adapted=dense, seen=seen, mode=mode, tau=trained.gate_tau)
    y = fuse(adapted=dense, weights=w)                                                 # (B, 197, D)
    slots = torch.cat([torch.zeros_like(batch["student_visible"][:, :1]), batch["student_visible"] + 1], 1)
    pick = slots.unsqueeze(-1)

    def take(grid):                                                                    # (B, 197, D) -> (B, 1+n, D)
        return torch.gather(grid, 1, pick.expand(-1, -1, grid.shape[-1]))

    feats = {}
    for label, objective in (("trained", trained), ("untrained", untrained)):
        cls, patch = objective.student(batch["images"], batch["student_visible"])
        feats[label] = torch.cat([cls.unsqueeze(1), patch], dim=1).float()            # (B, 1+n, D)
    has_target = torch.gather(seen.any(0), 1, slots)                                   # (B, 1+n)
    out = {"fused": {k: linear_cka(f[has_target], take(y)[has_target]) for k, f in feats.items()},
           "tokens": int(has_target.sum()), "gate": mode}
    for k, name in enumerate(trained.teacher_names):
        mask = torch.gather(seen[k], 1, slots)
        out[name] = {lab: linear_cka(f[mask], take(dense[k])[mask]) for lab, f in feats.items()}
    return out


# ---- figures ------------------------------------------------------------------------
def read_metrics(path) -> list[dict]:
    """RUN/metrics.jsonl as a list of dicts (one per logged step)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (has the run logged a step?)")
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_losses(rows: list[dict], out_png) -> Path:
    """Total, token and spatial loss against step, one panel each (their scales differ)."""
    plt = _pyplot()
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3), dpi=110)
    for ax, (key, label) in zip(axes, (("loss", "total"), ("loss_token", "token KL (visible tokens)"),
                                       ("loss_spatial", "spatial KL (14x14 maps)"))):
        ax.plot(steps, [r[key] for r in rows], marker=".", lw=1)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss")
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


# ---- Markdown -------------------------------------------------------------------------
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
    """Write the demo report (README.md) from the ``info`` dict that train/demo.py gathers."""
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
                  f"`bench.train.measure` after {tp['warmup']} warm-up step (ceiling: the median of 3 rounds of "
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
