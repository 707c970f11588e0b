"""Online training sources: the teachers run on every step instead of being read from a store.
``online-replay`` (``train.loader.OnlineSource``) runs them on the store's views, so its batches
equal the cached source's; ``online-fresh`` (``FreshSource``, the paper's setting) on a crop, flip
and teacher masks drawn per (image, epoch), its teachers and adapter statistics from ``data.store``
or ``data.teachers_from`` (docs/method.md "Three ways to train"). Order, student masks and ranks
are the loader's ``Plan``: a batch is a pure function of (seed, epoch, step), for any world size."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from core import dist
from core.precision import resolve_amp
from data import views as V
from store.features import FeatureStore, StoreError
from store.teacherstore import stored_build
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
    """The teachers the store was made with, rebuilt from its build records (random init with
    the recorded seed, or the official file it names; the recorded architecture and model
    arguments) unless ``prebuilt`` holds them, and checked against the digests and build records
    it keeps; StoreError when one differs."""
    from teachers.vit import rebuild_teacher
    teachers, prebuilt = {}, prebuilt or {}
    for name in names:
        ts = fs.teacher(name)
        c, build = ts.config, ts.build
        t = (prebuilt[name].to(device) if name in prebuilt else
             rebuild_teacher(name, build, checkpoint=None if c["untrained"] else c["source"], device=device))
        if t.digest != c["checkpoint_digest"] or stored_build(name, t.build) != build:
            raise StoreError(f"online teacher {name} ({t.source}) is not the one the store {fs.path} was made "
                             f"with (digest {t.digest[:12]} vs {c['checkpoint_digest'][:12]}, build {t.build} vs "
                             f"{build})")
        teachers[name] = t
    return teachers


def teachers_from(spec: str, names, *, seed: int, device: str) -> dict:
    """Teachers without a store: ``spec`` is "random-init" (the descriptors' default
    architectures seeded by ``seed``, as ``extract --random-init --seed``) or a folder holding
    the official files (a timm teacher's weights are timm's pretrained ones)."""
    from teachers.checkpoints import TEACHERS as SPECS
    from teachers.vit import build_teacher
    if spec == "random-init":
        return {n: build_teacher(n, random_init=True, seed=seed, device=device) for n in names}
    folder = Path(spec)
    official = [n for n in names if n in SPECS]         # a timm teacher takes its pretrained weights from timm
    missing = [str(folder / SPECS[n].filename) for n in official if not (folder / SPECS[n].filename).is_file()]
    if missing:
        raise FileNotFoundError(f"data.teachers_from={spec}: missing official checkpoint file(s) {missing}")
    return {n: build_teacher(n, checkpoint=folder / SPECS[n].filename if n in SPECS else None, device=device)
            for n in names}


def sample_stats(teachers: dict, data, *, seed: int, views: int, num_images: int, decoder: str, device: str,
                 num_threads: int, path: Path, amp: str | None = None) -> dict:
    """{name: (mean (C,), components (C, C))} from ``compute_stats`` on a keyed sample.

    Rank 0 computes them once and writes ``path`` (with a key of what they depend on); every
    rank then reads that file, so all ranks and a resumed run share the same adapters. A file
    whose key differs (other teachers, data, seed or sample size) is refused, never replaced.
    ``amp``: the teachers' precision for the pass (``Extractor``)."""
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
                           num_threads=num_threads, amp=amp)
            st = compute_stats(ex, num_images=num_images)
            arrays[f"{name}.mean"], arrays[f"{name}.components"] = st["mean"], st["components"]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
    dist.barrier()
    with np.load(path) as f:
        return {n: (f[f"{n}.mean"], f[f"{n}.components"]) for n in teachers}


def build_online_source(cfg, plan: Plan, *, fresh: bool, device: str, store=None, run_dir=None,
                        prebuilt: dict | None = None, **kw):
    """(source, {name: (mean, components)}) for ``online-replay`` (fresh=False) or
    ``online-fresh`` (fresh=True); ``store``: the run's store, a train/runstore.RunStore opened
    for it (None: none); ``prebuilt``: teachers already built (checked against the store);
    ``kw`` go to the source (decoder, num_threads)."""
    names = list(teacher_names(cfg))
    amp = resolve_amp(cfg.train.amp, device)         # the teachers' precision, the statistics' pass too
    if store is not None:
        teachers = teachers_of_store(store.fs, names, device=device, prebuilt=prebuilt)
        stats = {n: store.stats[n] for n in names}
    elif not fresh:
        raise ValueError("data.source=online-replay replays the store's views: set data.store")
    elif not cfg.data.teachers_from:
        raise ValueError("data.source=online-fresh without data.store needs data.teachers_from "
                         "('random-init' or a folder of official checkpoint files)")
    else:
        if run_dir is None:
            raise ValueError("online-fresh without data.store keeps its adapter statistics in the run folder; "
                             "pass run_dir")
        teachers = teachers_from(cfg.data.teachers_from, names, seed=cfg.data.seed, device=device)
        stats = sample_stats(teachers, plan.data, seed=cfg.data.seed, views=cfg.data.views,
                             num_images=cfg.data.stats_images, decoder=cfg.data.decoder, device=device,
                             num_threads=kw.get("num_threads", 2), path=Path(run_dir) / STATS_FILE, amp=amp)
    cls = FreshSource if fresh else OnlineSource
    return cls(plan, teachers=teachers, amp=amp, device=device, **kw), stats
