"""Online training sources: the teachers run on every step instead of being read from a store.

Two modes (``data.source``; docs/method.md "Three ways to train"):

- ``online-replay``: the teachers see the views the cache serves (``Plan.view_of``: view
  (e + i) mod V of image i at epoch e when a run uses all V of the store's) -- the same crops, flips and masks as the cache, so its batches equal the cached
  source's (``train.loader.OnlineSource``). The reference of the cached == online proof.
- ``online-fresh``: every (image, epoch) gets its own crop, flip and teacher masks, drawn by
  ``data.views.fresh_view_params`` / ``fresh_teacher_visible`` from (seed, index, epoch)
  (``FreshSource``). The paper's setting. It needs no token store: the teachers' identity
  and adapter statistics come from ``data.store`` when one is given, otherwise from
  ``data.teachers_from`` (official files or random init) and a statistics sample computed
  once before training (``extract.runner.compute_stats``) and kept in the run folder, so a
  resumed run uses the very same adapters.

Batch order, student masks and the split over ranks are the loader's (``Plan``), so a
fresh-view batch is a pure function of (seed, epoch, step): deterministic, resumable and the
same for any world size.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from core import dist
from data import views as V
from store.features import DataInfo, FeatureStore, StoreError
from train.config import teacher_names
from train.loader import OnlineSource, Plan

SOURCES = ("cached", "online-replay", "online-fresh")
STATS_FILE = "teacher_stats.npz"


class FreshSource(OnlineSource):
    """Online batches with a fresh view per (image, epoch); see the module docstring.

    A CPU batch is {"index" (B,), "view" (B,) (the epoch: the key of the view), "images"
    (B, 3, 224, 224), "student_visible" (B, n), "teachers": {name: {"visible" (B, n_k)}}}.
    """

    def _batches(self, epoch: int, start_step: int):
        plan = self.plan
        for step, _, index in plan.batch_indices(epoch):
            if step < start_step:
                continue
            boxes, flips = V.fresh_view_params(plan.seed, index, epoch, plan.data.widths[index],
                                               plan.data.heights[index])
            yield step, {
                "index": torch.from_numpy(index), "view": torch.full((len(index),), epoch, dtype=torch.int64),
                "images": self._images(index, boxes, flips),
                "student_visible": torch.from_numpy(V.student_visible(plan.seed, index, epoch,
                                                                      n_visible=plan.n_student)),
                "teachers": {name: {"visible": torch.from_numpy(V.fresh_teacher_visible(plan.seed, index, epoch,
                                                                                        name))}
                             for name in self.teachers},
            }


def teachers_of_store(fs: FeatureStore, names, *, device: str, prebuilt: dict | None = None) -> dict:
    """The teachers the store was made with, rebuilt (random init or official file) unless
    ``prebuilt`` holds them, and checked against the digests it records; StoreError when one
    differs."""
    from teachers.vit import build_teacher
    teachers, prebuilt = {}, prebuilt or {}
    for name in names:
        c = fs.teacher(name).config
        t = (prebuilt[name].to(device) if name in prebuilt else
             build_teacher(name, random_init=True, seed=fs.seed, device=device) if c["untrained"]
             else build_teacher(name, checkpoint=c["source"], device=device))
        if t.digest != c["checkpoint_digest"]:
            raise StoreError(f"online teacher {name} ({t.source}) is not the one the store {fs.path} was made "
                             f"with (digest {t.digest[:12]} vs {c['checkpoint_digest'][:12]})")
        teachers[name] = t
    return teachers


def teachers_from(spec: str, names, *, seed: int, device: str, random_depth: int = 12) -> dict:
    """Teachers without a store: ``spec`` is "random-init" (seeded by ``seed``, as
    ``extract --random-init --seed``; ``random_depth`` blocks) or a folder holding the
    official files."""
    from teachers.checkpoints import TEACHERS as SPECS
    from teachers.vit import build_teacher
    if spec == "random-init":
        kwargs = None if random_depth == 12 else {"depth": random_depth}
        return {n: build_teacher(n, random_init=True, seed=seed, device=device, model_kwargs=kwargs) for n in names}
    folder = Path(spec)
    missing = [str(folder / SPECS[n].filename) for n in names if not (folder / SPECS[n].filename).is_file()]
    if missing:
        raise FileNotFoundError(f"data.teachers_from={spec}: missing official checkpoint file(s) {missing}")
    return {n: build_teacher(n, checkpoint=folder / SPECS[n].filename, device=device) for n in names}


def sample_stats(teachers: dict, data, *, seed: int, views: int, num_images: int, decoder: str, device: str,
                 num_threads: int, path: Path) -> dict:
    """{name: (mean (C,), components (C, C))} from ``compute_stats`` on a keyed sample.

    Rank 0 computes them once and writes ``path`` (with a key of what they depend on); every
    rank then reads that file, so all ranks and a resumed run share the same adapters. A file
    whose key differs (other teachers, data, seed or sample size) is refused, never replaced."""
    from extract.runner import Extractor, compute_stats
    key = json.dumps({"data": data.digest, "seed": seed, "views": views, "num_images": num_images,
                      "teachers": {n: t.digest for n, t in sorted(teachers.items())}}, sort_keys=True)

    def held() -> str | None:
        if not path.is_file():
            return None
        with np.load(path) as f:
            return str(f["key"])

    if held() not in (None, key):
        raise StoreError(f"{path} holds the adapter statistics of other teachers, data, seed or sample size "
                         f"than this run's ({held()} vs {key}); use another --out")
    if dist.rank() == 0 and held() is None:
        arrays = {"key": np.array(key)}
        for name, t in teachers.items():
            ex = Extractor(t, data, seed=seed, views=views, batch_size=32, device=device, decoder=decoder,
                           num_threads=num_threads)
            st = compute_stats(ex, num_images=num_images)
            arrays[f"{name}.mean"], arrays[f"{name}.components"] = st["mean"], st["components"]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
    dist.barrier()
    with np.load(path) as f:
        return {n: (f[f"{n}.mean"], f[f"{n}.components"]) for n in teachers}


def build_online_source(cfg, plan: Plan, *, fresh: bool, device: str, run_dir=None, prebuilt: dict | None = None,
                        **kw):
    """(source, {name: (mean, components)}) for ``online-replay`` (fresh=False) or
    ``online-fresh`` (fresh=True); ``prebuilt``: teachers already built (checked against the
    store); ``kw`` go to the source (decoder, num_threads)."""
    names = list(teacher_names(cfg))
    amp = torch.device(device).type == "cuda" and cfg.train.amp == "bf16"
    if cfg.data.store:
        fs = (FeatureStore.open(cfg.data.store, views=plan.store_views, seed=cfg.data.seed) if not fresh
              else FeatureStore.open(cfg.data.store, data=DataInfo.of(plan.data)))
        teachers = teachers_of_store(fs, names, device=device, prebuilt=prebuilt)
        stats = {n: (fs.teacher(n).stats["mean"], fs.teacher(n).stats["components"]) for n in names}
    elif not fresh:
        raise ValueError("data.source=online-replay replays the store's views: set data.store")
    elif not cfg.data.teachers_from:
        raise ValueError("data.source=online-fresh without data.store needs data.teachers_from "
                         "('random-init' or a folder of official checkpoint files)")
    else:
        if run_dir is None:
            raise ValueError("online-fresh without data.store keeps its adapter statistics in the run folder; "
                             "pass run_dir")
        teachers = teachers_from(cfg.data.teachers_from, names, seed=cfg.data.seed, device=device,
                                 random_depth=cfg.data.random_teacher_depth)
        stats = sample_stats(teachers, plan.data, seed=cfg.data.seed, views=cfg.data.views,
                             num_images=cfg.data.stats_images, decoder=cfg.data.decoder, device=device,
                             num_threads=kw.get("num_threads", 2), path=Path(run_dir) / STATS_FILE)
    cls = FreshSource if fresh else OnlineSource
    return cls(plan, teachers=teachers, amp=amp, device=device, **kw), stats
