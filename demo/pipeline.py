"""`demo`: the whole product on the bundled photos in a few minutes, and a report of what it did.

Stages, each printing one line with its time: photos, prepare, extract (the three teachers with
`extract`'s defaults; the held-out store on the training store's statistics), verify, train,
evaluate (held-out loss of the trained vs the untrained student), throughput, sizes, report
(OUT/report/README.md and report.html). A rerun reuses what is done; OUT is a run folder whose
config.yaml holds the ``DemoSettings``, and a rerun with other settings is refused naming them.
Teachers are random-init unless ``checkpoints`` holds their official files."""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from core.io import git_commit, git_dirty, write_atomic
from core.run import CONFIG, INFO, read_metrics
from demo.stages import (MOVABLE, DemoError, DemoSettings, codec_sizes, demo_teacher, extract_all,
                         folder_diff, measure_throughput, teacher_sources, train_config, train_or_reuse)
from samples.photos import write_photo_splits
from train.config import teacher_names

__all__ = ["run_demo"]


def open_folder(out: Path, settings: DemoSettings, sources: dict) -> None:
    """OUT as a run folder (core/run.py's files): config.yaml holds the resolved settings and
    run.json the git commit and the teachers' sources. A rerun with other settings or other
    teachers is refused, naming every differing key."""
    teachers = {n: s or "random-init" for n, s in sources.items()}
    diff = folder_diff(out, settings.to_dict(), compare={"teachers": teachers})
    if diff:
        raise DemoError(f"{out} was made with other demo settings; use another --out (or delete it):\n  "
                        + "\n  ".join(diff))
    if diff is None:
        if (out / "demo.json").is_file():
            raise DemoError(f"{out} was made by an older demo (demo.json, no {CONFIG}); use another --out "
                            "(or delete it)")
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / CONFIG, settings.to_yaml())
        write_atomic(out / INFO, json.dumps(dict(git_commit=git_commit(), git_dirty=git_dirty(), teachers=teachers),
                                            indent=2) + "\n")


def run_demo(*, out, checkpoints=None, settings: DemoSettings | None = None, device: str = "cpu",
             progress: bool = True, echo: Callable[[str], None] = print) -> dict:
    """Run every stage into ``out``; returns {"report": path, "stages": [...], "reused": [...], ...}."""
    import torch

    from demo import report
    from store.features import FeatureStore
    from store.verify import verify_store
    from data.shards import prepare
    from train import diagnostics as diag
    from train import plots
    from data.order import steps_per_epoch

    settings = (settings or DemoSettings()).validate()
    out = Path(out).resolve()
    sources = teacher_sources(checkpoints)
    open_folder(out, settings, sources)
    stages, reused, n_stages = [], [], 9
    built: dict = {}
    from teachers.checkpoints import TEACHERS as SPECS
    echo("teachers: " + "; ".join(
        f"{n} from {src}" if src else
        f"{n} UNTRAINED (random init; no {Path(checkpoints) / SPECS[n].filename if checkpoints else '--checkpoints'})"
        for n, src in sources.items()))

    def stage(name: str, fn):
        t0, c0 = time.perf_counter(), time.process_time()
        note = fn()
        seconds = time.perf_counter() - t0
        stages.append({"stage": name, "seconds": seconds, "cpu_seconds": time.process_time() - c0, "note": note})
        echo(f"[{len(stages)}/{n_stages}] {name:<10} {seconds:6.1f} s  {note}")

    # 1-2: photos and shards
    trees = {}

    def photos():
        train_tree, held_tree, was = write_photo_splits(
            out / "photos", copies=settings.copies, heldout_copies=settings.heldout_copies, max_side=settings.max_side)
        trees.update(train=train_tree, heldout=held_tree)
        if was:
            reused.append("photos")
        return f"{'reused' if was else 'wrote'} {train_tree} and {held_tree}"
    stage("photos", photos)

    data = {}

    def pack():
        notes = []
        for split in ("train", "heldout"):
            done = (out / "data" / split / "manifest.json").is_file()      # a finished prepare
            msgs = []
            data[split] = prepare(trees[split], out / "data" / split, shard_size=13, progress=False, workers=0,
                                  echo=msgs.append)
            notes.append(f"{split}: {len(data[split])} images" + (" (reused; prepare: nothing to do)" if done else ""))
            if done:
                reused.append(f"prepared {split} shards")
        return "; ".join(notes)
    stage("prepare", pack)

    # 3-4: teacher stores
    stores = {"train": out / "features" / "train", "heldout": out / "features" / "heldout"}
    views = {"train": settings.views, "heldout": 1}
    # the held-out store is read with the training store's adapters: it takes that store's
    # statistics (a coefficient codec then encodes on their basis) and keeps no views (the
    # evaluation decodes its crops, which its teachers then ran on)
    split_kw = {"train": dict(view_pixels=settings.view_pixels),
                "heldout": dict(stats_from=stores["train"])}

    rate: dict = {}

    def extract():
        notes = []
        for split in ("train", "heldout"):
            note, all_done = extract_all(stores[split], data[split], views=views[split],
                                         stats_images=settings.stats_images, sources=sources, settings=settings,
                                         device=device, built=built, progress=progress, rate=rate,
                                         **split_kw[split])
            if all_done:
                reused.append(f"{split} feature store (all teachers complete)")
            notes.append(f"{split}: {note}")
        if rate:
            notes.append(f"this machine: one {rate['teacher']} teacher forward (masked, as extracted) "
                         f"{rate['images_per_second']:.2f} img/s")
        return "; ".join(notes)
    stage("extract", extract)
    if settings.bench_steps < 1:
        built.clear()                 # free the teachers before training; else kept for the online row

    def verify():
        for split in ("train", "heldout"):
            problems, _ = verify_store(stores[split], data[split], progress=False)
            if problems:
                raise DemoError(f"verify {stores[split]}:\n  " + "\n  ".join(problems))
        return "both stores complete and consistent with their data"
    stage("verify", verify)

    # 5: training
    spe = steps_per_epoch([[int(s["first"]), int(s["count"])] for s in data["train"].shards],
                          global_batch=settings.batch_size, streams=1)
    run_dir = out / "run"
    cfg = train_config(settings, data=out / "data" / "train", store=stores["train"], run_dir=run_dir,
                       steps_per_epoch=spe)
    run = {}

    def train_stage():
        info, note = train_or_reuse(cfg, run_dir, steps=settings.steps, device=device, progress=progress)
        run.update(info)
        if note.startswith("reused"):
            reused.append(f"training run ({info['steps']} steps)")
        return note
    stage("train", train_stage)

    # 6-8: measurements, reused when nothing they depend on changed
    m_path = out / "report" / "measurements.json"
    key = {"config": {s: {k: v for k, v in sec.items() if f"{s}.{k}" not in MOVABLE}
                      for s, sec in cfg.to_dict().items()}, "steps": run["steps"], "settings": settings.to_dict(), "device": device,
           "sources": sources, "mtime_ns": (run_dir / "last.pt").stat().st_mtime_ns}
    old = json.loads(m_path.read_text()) if m_path.is_file() else {}
    fresh = old.get("key") != json.loads(json.dumps(key))
    meas = {} if fresh else old
    held_idx = np.arange(len(data["heldout"]))
    objectives = {}

    @functools.cache
    def opened(split: str):
        """The split's store, opened once for the stages after training."""
        return FeatureStore.open(stores[split])

    def objective(kind: str):
        if kind not in objectives:
            objectives[kind] = diag.load_run(run_dir, device=device, trained=(kind == "trained"),
                                             store=opened("train"))[1]
        return objectives[kind]

    def evaluate():
        if "cka" in meas and "heldout_loss" in meas:
            reused.append("held-out evaluation")
            return "reused: " + _quality_note(meas)
        samples = diag.load_samples(opened("heldout"), data["heldout"], indices=held_idx, epoch=0,
                                    teachers=list(teacher_names(cfg)), adapters_from=opened("train"))
        batch = diag.sample_batch(samples, teacher_names(cfg), device=device)
        with torch.no_grad():
            meas["heldout_loss"] = diag.heldout_losses(objective("trained"), objective("untrained"), batch)
            meas["cka"] = diag.cka_scores(objective("trained"), objective("untrained"), batch)
        return f"on {len(held_idx)} held-out views: " + _quality_note(meas)
    stage("evaluate", evaluate)

    def throughput():
        if meas.get("throughput", {}).get("rows"):
            reused.append("throughput measurement")
            return "reused the measurement of an earlier run"
        meas["throughput"] = measure_throughput(data=out / "data" / "train", store=stores["train"],
                                                settings=settings, device=device,
                                                metrics=read_metrics(run_dir / "metrics.jsonl"),
                                                teachers=built)
        rows = meas["throughput"].get("rows")
        if not rows:
            return f"skipped: {meas['throughput']['skipped']}"
        return ", ".join(f"{r['mode']} {r['images_per_second']:.1f} img/s" for r in rows)
    stage("throughput", throughput)

    def sizes():
        was = "sizes" in meas
        if was:
            reused.append("store size measurement")
        else:
            teachers = {n: demo_teacher(n, sources=sources, settings=settings, device=device, built=built)
                        for n in teacher_names(cfg)}
            meas["sizes"] = codec_sizes(opened("train"), data["train"], teachers=teachers,
                                        num_images=len(data["train"]), views=settings.views, device=device,
                                        decoder=settings.decoder)
        s = meas["sizes"]
        per_codec = ", ".join(f"{r['codec']} {r['zstd_bytes'] / 1024:.0f} KiB" for r in s["rows"])
        return ("reused: " if was else "") + per_codec + \
            f" per (image, view); store on disk {s['actual_bytes'] / 2**20:.1f} MiB"
    stage("sizes", sizes)
    built.clear()
    m_path.parent.mkdir(parents=True, exist_ok=True)
    m_path.write_text(json.dumps({"key": key, **{k: meas[k] for k in ("heldout_loss", "cka", "throughput", "sizes")}}, indent=1))

    # 9: report
    report_dir = out / "report"

    def make_report():
        rows = read_metrics(run_dir / "metrics.jsonl")
        plots.plot_losses(rows, report_dir / "losses.png")
        plots.plot_gate_shares(rows, report_dir / "gates.png")
        pick = np.unique(np.linspace(0, len(held_idx) - 1, max(1, settings.panels)).round().astype(int))
        samples = diag.load_samples(opened("heldout"), data["heldout"], indices=held_idx[pick], epoch=0,
                                    teachers=list(teacher_names(cfg)), adapters_from=opened("train"))
        maps = diag.gate_maps(objective("trained"), diag.sample_batch(samples, teacher_names(cfg), device=device))
        panels = []
        for s, w in zip(samples, maps):
            name = f"panel_{s.index:04d}.png"
            plots.render_panel(s, report_dir / name, weights=w, weights_title="w",
                               title=f"held-out image {s.index} ({s.source}), trained student after {run['steps']} steps")
            panels.append(name)
        history_path = report_dir / "stages.jsonl"                  # one line per demo invocation
        history = [json.loads(ln) for ln in history_path.read_text().splitlines()] if history_path.is_file() else []
        history.append({s["stage"]: s["seconds"] for s in stages})
        history_path.write_text("".join(json.dumps(h) + "\n" for h in history))
        info = {"teachers": {n: {"untrained": s is None, "source": s} for n, s in sources.items()},
                "first_stages": history[0] if len(history) > 1 else None,
                "data": {"train": len(data["train"]), "heldout": len(data["heldout"]), "views": settings.views},
                "device": device, "stages": stages + [{"stage": "report", "seconds": float("nan"),
                                                       "note": "these files"}],
                "run": {"steps": run["steps"], "batch_size": settings.batch_size, "lr": settings.lr,
                        "final": rows[-1], "dir": str(run_dir)},
                "heldout_loss": meas["heldout_loss"], "cka": meas["cka"], "throughput": meas["throughput"],
                "sizes": meas["sizes"], "panels": panels, "reused": list(reused)}
        md, page = report.write_report(report_dir, info)
        return f"{md} and {page.name} ({len(panels)} panels; stages before this one " \
               f"{sum(s['seconds'] for s in stages):.1f} s)"
    stage("report", make_report)
    return {"report": report_dir / "README.md", "html": report_dir / "report.html", "stages": stages,
            "reused": reused, "heldout_loss": meas["heldout_loss"], "cka": meas["cka"], "throughput": meas["throughput"], "sizes": meas["sizes"], "run_dir": run_dir,
            "teacher_rate": rate.get("images_per_second")}


def _quality_note(meas: dict) -> str:
    """The evaluate stage's line: held-out loss and fused-target CKA, trained vs untrained."""
    loss, cka = meas["heldout_loss"], meas["cka"]["fused"]
    return (f"loss trained {loss['trained']['total']:.3f}, untrained {loss['untrained']['total']:.3f}; "
            f"linear CKA with the fused targets trained {cka['trained']:.3f}, untrained {cka['untrained']:.3f}")
