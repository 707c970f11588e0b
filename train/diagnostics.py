"""What a training run learned, as numbers (`cli.py inspect --run`, the demo, bench/cache_cost.py).

``load_run`` rebuilds a run's objective from RUN/last.pt; ``load_samples``/``sample_batch`` make
stored samples an objective batch; ``gate_maps`` gives a sample's per-position gate weights;
``heldout_losses`` (the demo's quality check) and ``cka_scores`` score a trained and an untrained
student against the same student-free fused targets (docs/performance.md, "The first command")."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from core.run import load_checkpoint
from data import views as V
from data.decode import normalize_uint8
from store.features import FeatureStore, StoreError
from store.inspect import SampleView, load_sample_views, open_store
from train.config import teacher_names
from train.objective import STUDENT_FREE_GATE, distill_losses, fused_targets

__all__ = ["linear_cka", "load_run", "load_samples", "sample_batch", "gate_maps", "cka_scores",
           "heldout_losses"]


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


def load_run(run_dir, *, device: str = "cpu", store: FeatureStore | None = None, trained: bool = True):
    """(config, objective in eval mode) of the run in ``run_dir``.

    The student side comes from RUN/last.pt (``trained=False`` keeps the seeded initial
    weights of the same config: the untrained baseline). Frozen adapters are not in the
    checkpoint; they are rebuilt from the statistics of ``store``, a FeatureStore already open
    (a sweep's report, the demo), else of the run's ``data.store``, opened here; it must be the
    store the run trained on.
    """
    from train.config import Config
    from train.objective import build_objective

    run_dir = Path(run_dir)
    ck_path = run_dir / "last.pt"
    if not ck_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no checkpoint (last.pt); is it a training run folder?")
    ck = load_checkpoint(ck_path)
    cfg = Config.from_dict(ck["meta"]["config"])
    if store is None:
        try:
            store = FeatureStore.open(cfg.data.store, seed=cfg.data.seed)
        except StoreError as error:
            raise StoreError(f"{run_dir} trained on the store {cfg.data.store}, which is needed for its adapters: "
                             f"{error}") from None
    elif store.seed != cfg.data.seed:
        raise StoreError(f"{run_dir} trained with data.seed={cfg.data.seed}, but {store.path} was extracted with "
                         f"seed {store.seed}; is it the store the run trained on?")
    if not 1 <= int(cfg.data.views) <= store.views:     # a run may train on the first v of the store's V views
        raise StoreError(f"{run_dir} trained on {cfg.data.views} views of {store.path}, which holds {store.views}; "
                         "is it the store the run trained on?")
    stats = {}
    for name in teacher_names(cfg):
        st = store.teacher(name).stats
        stats[name] = (st["mean"], st["components"])
    objective = build_objective(cfg, stats)
    if trained:
        objective.student_side().load_state_dict(ck["model"])
    return cfg, objective.to(device).eval()


def sample_batch(samples: list[SampleView], teachers, *, device: str = "cpu") -> dict:
    """An objective batch (train/objective.py) from samples loaded ``with_tokens``.

    Returns {"index" (B,), "view" (B,), "images" (B, 3, 224, 224) float32 normalised,
    "student_visible" (B, n) int64, "teachers": {name: {"cls" (B, C_k), "patch" (B, n_k, C_k),
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


def load_samples(store, data, *, indices, views=None, epoch: int | None = None,
                 teachers=None, adapters_from=None) -> list[SampleView]:
    """``load_sample(..., with_tokens=True)`` for each index (view 0 unless ``views``), the store
    (a path, or a FeatureStore already open) and its view pixels opened once for all of them
    (store/inspect.py ``load_sample_views``). ``adapters_from``: the store (a path, or a
    FeatureStore already open) whose statistics built the adapters that will read these tokens
    (``load_run``'s), when it is not ``store``; its basis must be theirs
    (``train.requirements.check_same_basis``, StoreError)."""
    fs = open_store(store, data)
    if adapters_from is not None:
        from train.requirements import check_same_basis

        ref = adapters_from if isinstance(adapters_from, FeatureStore) else FeatureStore.open(adapters_from)
        for name in teachers or fs.teachers:
            check_same_basis(fs.teacher(name), ref.teacher(name))
    return load_sample_views(fs, data, indices=indices, views=views, epoch=epoch, teachers=teachers,
                             with_tokens=True)


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


def _student_free_targets(objective, batch: dict):
    """(adapted grid, fused targets (B, 197, D), gate mode) of ``batch`` under ``objective``'s
    adapters and its gate without the student affinity term: the same targets for any student."""
    grid = objective.adapted_grid(batch)
    mode = STUDENT_FREE_GATE[objective.gate_mode]
    y, _ = fused_targets(grid.dense, grid.seen, mode=mode, tau=objective.gate_tau)
    return grid, y, mode


def _student_slots(batch: dict) -> torch.Tensor:
    """(B, 1 + n) grid slots of CLS and the student-visible patches."""
    return torch.cat([torch.zeros_like(batch["student_visible"][:, :1]), batch["student_visible"] + 1], 1)


def _gather_slots(grid: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """grid (B, 197[, D]) at ``slots`` (B, S) -> (B, S[, D])."""
    if grid.ndim == 2:
        return torch.gather(grid, 1, slots)
    return torch.gather(grid, 1, slots.unsqueeze(-1).expand(-1, -1, grid.shape[-1]))


@torch.no_grad()
def heldout_losses(trained, untrained, batch: dict) -> dict:
    """The objective's token and spatial losses of the trained and the untrained student on
    ``batch`` against the same student-free fused targets (``_student_free_targets``), the
    quantity distillation lowers: {"trained": {"token", "spatial", "total"}, "untrained": {...},
    "gate": the target's gate mode}. ``total`` = token + spatial_weight x spatial (no
    reconstruction term: the adapters are the run's, frozen or trained, in both rows)."""
    grid, y, mode = _student_free_targets(trained, batch)
    has_target, visible = grid.seen.any(0), batch["student_visible"]
    out = {"gate": mode}
    for label, objective in (("trained", trained), ("untrained", untrained)):
        side = objective.student_side()
        cls, patch = side.student(batch["images"], visible)
        tok, sp = distill_losses(cls, patch, side.decoder(cls, patch, visible), visible=visible, targets=y,
                                 has_target=has_target, kind=objective.loss_kind, tau=objective.tau,
                                 tau_spatial=objective.tau_spatial)
        out[label] = {"token": float(tok), "spatial": float(sp),
                      "total": float(tok) + objective.spatial_weight * float(sp)}
    return out


@torch.no_grad()
def cka_scores(trained, untrained, batch: dict) -> dict:
    """Linear CKA of the trained and the untrained student against the fused targets and
    against each teacher (its adapted tokens where it saw the patch), over CLS + the
    student-visible patches of every sample in ``batch``.

    trained, untrained: CoMADObjective (same config). Returns {"fused": {"trained", "untrained"},
    "<teacher>": {...}, "tokens": N (rows of the fused comparison), "gate": the target's gate mode}.
    Positions of the student that no teacher saw have no target and are left out.
    """
    grid, y, mode = _student_free_targets(trained, batch)                              # y (B, 197, D)
    dense, seen = grid.dense, grid.seen                                                # (K, B, 197[, D])
    slots = _student_slots(batch)

    feats = {}
    for label, objective in (("trained", trained), ("untrained", untrained)):
        cls, patch = objective.student(batch["images"], batch["student_visible"])
        feats[label] = torch.cat([cls.unsqueeze(1), patch], dim=1).float()            # (B, 1+n, D)
    has_target = _gather_slots(seen.any(0), slots)                                     # (B, 1+n)
    target = _gather_slots(y, slots)[has_target]
    out = {"fused": {k: linear_cka(f[has_target], target) for k, f in feats.items()},
           "tokens": int(has_target.sum()), "gate": mode}
    for k, name in enumerate(trained.teacher_names):
        mask = _gather_slots(seen[k], slots)
        out[name] = {lab: linear_cka(f[mask], _gather_slots(dense[k], slots)[mask]) for lab, f in feats.items()}
    return out
