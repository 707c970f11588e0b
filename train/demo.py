"""`demo`: the whole product on real photos in a few minutes, and a report of what it did.

Stages (each prints one line with its time; a second run reuses what the first made):

 1. photos       scikit-image photos as two ImageFolder trees: training (``copies`` crops of
                 each of the 13 photos) and held-out (``heldout_copies`` further crops);
 2. prepare      both trees packed into shards (a finished prepare says "nothing to do");
 3. extract      the three teachers over every (image, view) of both sets (complete
                 teachers are skipped without being built; partial ones resume); the
                 statistics come from the stored tokens (no second teacher pass); the note
                 gives this machine's ViT-B forward rate (``teacher_rate``);
 4. verify       both stores against their data;
 5. train        the student on the cached store (a finished run with the same config is
                 reused, an unfinished one resumed);
 6. evaluate     linear CKA of trained vs untrained student on the held-out views;
 7. throughput   cached (the training stage's own rate) vs online vs in-memory ceiling
                 (``bench.train.measure``; the online row reuses the extract stage's teachers);
 8. sizes        the store's bytes per codec, measured on its own tokens;
 9. report       OUT/report/README.md with figures and panels.

Teachers are untrained (seeded random init) unless ``checkpoints`` holds their official
files (names in ``extract/checkpoints.py``); the report says which. Measurements (stages
6-8) are saved with a key of everything they depend on and reused when it is unchanged.
OUT/demo.json records the settings; a rerun with other settings is refused, naming them.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from store.errors import ExpectedError

TEACHERS = ("mae", "mocov3", "ibot")
MOVABLE = {"data.images", "data.store", "train.out_dir"}    # paths: OUT may move between runs (as train/loop)
IMAGENET_IMAGES = 1_281_167


class DemoError(ExpectedError, RuntimeError):
    """The demo cannot go on (settings differ from OUT's, a store fails verification, ...)."""


@dataclass
class DemoSettings:
    """What the demo makes. Everything here is recorded in OUT/demo.json."""

    copies: int = 4                 # training images = 13 photos x copies (crops)
    heldout_copies: int = 1         # held-out images = 13 x heldout_copies, crops not in training
    max_side: int = 256             # long side of the photos in pixels
    views: int = 2                  # cached views per training image
    seed: int = 0
    steps: int = 150                # student steps
    batch_size: int = 16
    lr: float = 5e-4                # peak learning rate (base_lr = lr * 256 / batch) (choice)
    codec: str = "fp16"
    decoder: str = "dali"           # "dali" or "pil"
    stats_images: int = 16          # images whose tokens give each teacher's adapter statistics
    teacher_batch: int = 16
    panels: int = 3                 # held-out samples shown with their gate weights
    bench_steps: int = 2            # timed steps per throughput row (0: skip the measurement)
    train_overrides: list = field(default_factory=list)   # extra KEY=VALUE for the train config
    teacher_kwargs: dict = field(default_factory=dict)    # timm kwargs of random teachers (tests)

    def check(self) -> "DemoSettings":
        for key in ("copies", "heldout_copies", "views", "steps", "batch_size", "stats_images",
                    "teacher_batch"):
            if getattr(self, key) < 1:
                raise DemoError(f"demo setting {key}={getattr(self, key)} must be >= 1")
        if self.decoder not in ("dali", "pil"):
            raise DemoError(f"demo setting decoder={self.decoder!r}: use 'dali' or 'pil'")
        return self


def teacher_sources(checkpoints) -> dict[str, str | None]:
    """{teacher: official file path, or None for a random-init teacher}."""
    from extract.checkpoints import TEACHERS as SPECS
    out = {}
    for name in TEACHERS:
        path = Path(checkpoints) / SPECS[name].filename if checkpoints else None
        out[name] = str(path.resolve()) if path is not None and path.is_file() else None
    return out


# ---- stages ---------------------------------------------------------------------------------
def teacher_rate(teacher, *, device: str, images: int = 8, full: bool = False) -> float:
    """Images per second of one teacher forward on a batch of ``images`` seeded noise images
    after a warm-up batch of 2: masked as in extraction (its visible patches of view 0, seed
    0), or ``full`` (196 patches); fp32 on the CPU, bf16 autocast on CUDA (as extraction runs).
    The machine's speed, by which the demo's time is normalised (bench/demo.py,
    docs/performance.md); bench/cache_cost.py combines it over its teachers."""
    import torch

    from store import views as V

    g = torch.Generator().manual_seed(0)
    batch = torch.randn(images, 3, 224, 224, generator=g).to(device)
    visible = torch.from_numpy(V.teacher_visible(0, np.arange(images), 0, teacher.name)).to(device)
    dev = torch.device(device)

    def forward(n):
        return teacher.forward_full(batch[:n]) if full else teacher(batch[:n], visible[:n])
    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        forward(2)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        forward(images)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
    return images / (time.perf_counter() - t)


def write_photos(root: Path, settings: DemoSettings) -> tuple[Path, Path, bool]:
    """(train tree, held-out tree, reused). Written once; ``done.json`` marks a finished write."""
    from store.photos import write_photo_tree

    train, heldout, done = root / "train", root / "heldout", root / "done.json"
    want = {"copies": settings.copies, "heldout_copies": settings.heldout_copies, "max_side": settings.max_side}
    if done.is_file():
        return train, heldout, True
    for d in (train, heldout, root / "staging"):
        shutil.rmtree(d, ignore_errors=True)
    staging = write_photo_tree(root / "staging", max_side=settings.max_side,
                               copies=settings.copies + settings.heldout_copies)
    for path in sorted(staging.rglob("*.*")):
        stem = path.stem
        copy = int(stem.rsplit("_c", 1)[1]) if "_c" in stem and stem.rsplit("_c", 1)[1].isdigit() else 0
        dest = (train if copy < settings.copies else heldout) / path.relative_to(staging)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)
    shutil.rmtree(staging)
    done.write_text(json.dumps(want))
    return train, heldout, False


def _teacher_done(store: Path, data, name: str, source: str | None, views: int, seed: int) -> bool:
    from store.features import DataInfo, FeatureStore, StoreError
    if not (store / "zarr.json").exists():
        return False
    try:
        fs = FeatureStore.open(store, data=DataInfo.of(data), views=views, seed=seed)
    except StoreError as error:
        raise DemoError(f"{error}\n  (delete {store} or use another --out)") from None
    if name not in fs.teachers:
        return False
    ts = fs.teacher(name)
    if ts.config.get("source") != (source or "random-init"):
        raise DemoError(f"{store}/{name} was extracted from {ts.config.get('source')}, not "
                        f"{source or 'random-init'}; use another --out")
    return ts.has_stats and not ts.missing()


def extract_all(store: Path, data, *, views: int, stats_images: int, sources: dict, settings: DemoSettings,
                device: str, built: dict, progress: bool, rate: dict | None = None) -> tuple[str, bool]:
    """Run the missing teachers over ``data`` into ``store``; returns (stage note, all reused).
    A teacher already complete is not even built; ``built`` caches the teachers that were.
    ``rate``, when given and empty, receives {"images_per_second": ``teacher_rate``} of the
    first teacher built."""
    from extract.runner import run_extraction
    from extract.teachers import build_teacher

    done, rates = [], []
    for name in TEACHERS:
        if _teacher_done(store, data, name, sources[name], views, settings.seed):
            done.append(name)
            continue
        if name not in built:
            built[name] = (build_teacher(name, checkpoint=sources[name], device=device) if sources[name] else
                           build_teacher(name, random_init=True, seed=settings.seed, device=device,
                                         model_kwargs=settings.teacher_kwargs or None))
            if rate is not None and not rate:
                rate.update(teacher=name, images_per_second=teacher_rate(built[name], device=device))
        s = run_extraction(teacher=built[name], data=data, store_path=store, views=views, seed=settings.seed,
                           codec=settings.codec, batch_size=settings.teacher_batch, device=device,
                           decoder=settings.decoder, num_threads=2, stats_images=stats_images,
                           progress=progress)
        rates.append(f"{name} {s['blocks']} blocks at {s['images_per_second']:.1f} img/s"
                     + (f" ({s['skipped']} already complete)" if s["skipped"] else ""))
    parts = [f"reused complete {', '.join(done)}"] if done else []
    return "; ".join(parts + rates) + f" ({len(data)} images x {views} views)", len(done) == len(TEACHERS)


def train_config(settings: DemoSettings, *, data: Path, store: Path, run_dir: Path, steps_per_epoch: int):
    """The demo's training config (the defaults of train/config.py plus a short schedule)."""
    from train.config import load_config
    epochs = max(1, math.ceil(settings.steps / steps_per_epoch))
    base_lr = settings.lr * 256 / settings.batch_size
    overrides = [f"data.images={data}", f"data.store={store}", f"data.views={settings.views}",
                 f"data.seed={settings.seed}", f"data.decoder={settings.decoder}", "data.num_workers=2",
                 "data.streams=1", "data.shuffle_window=2", f"train.batch_size={settings.batch_size}",
                 "train.log_every=5", f"train.ckpt_every={epochs}", f"schedule.epochs={epochs}",
                 f"schedule.warmup_epochs={max(1, epochs // 10)}", f"optim.base_lr={base_lr!r}",
                 f"train.out_dir={run_dir}", *settings.train_overrides]
    return load_config(None, overrides)


def train_or_reuse(cfg, run_dir: Path, *, steps: int, device: str, progress: bool) -> tuple[dict, str]:
    """Train, resume or reuse the run in ``run_dir``; returns (info, note)."""
    import torch

    from train.loop import train
    ck_path = run_dir / "last.pt"
    resume = False
    if ck_path.is_file():
        meta = torch.load(ck_path, map_location="cpu", weights_only=False)
        step, meta = int(meta["step"]), meta["meta"]
        diff = [f"{s}.{k}: run has {meta['config'].get(s, {}).get(k)!r}, demo wants {v!r}"
                for s, sec in cfg.to_dict().items() for k, v in sec.items()
                if f"{s}.{k}" not in MOVABLE and meta["config"].get(s, {}).get(k) != v]
        if diff or meta["total_steps"] != steps:
            raise DemoError(f"{run_dir} holds a run with another config (delete it or use another --out):\n  "
                            + "\n  ".join(diff or [f"total_steps {meta['total_steps']} vs {steps}"]))
        if step >= steps and (run_dir / "student.safetensors").is_file():
            return {"steps": step}, f"reused finished run ({step} steps) in {run_dir}"
        resume = True
    summary = train(cfg, out_dir=run_dir, max_steps=steps, resume=resume, device=device,
                    ckpt_steps=max(10, steps // 3), progress=progress)
    last = summary.get("last") or {}
    note = (f"{'resumed' if resume else 'trained'} to step {summary['steps']}"
            + (f", {last['images_per_second']:.1f} img/s at the end" if "images_per_second" in last else ""))
    return {"steps": summary["steps"]}, note


def codec_sizes(store: Path, *, teachers, num_images: int, views: int, samples: int = 16) -> dict:
    """Bytes per (image, view) for each codec, measured on the store's own tokens.

    For each teacher, the first ``samples`` images of slot 0 are decoded from the store and
    encoded with every codec; ``zstd`` is the payload compressed with zstd level 1 (the
    store's compressor) plus the small arrays uncompressed. ``rel_error`` is
    ||decode(encode(t)) - t|| / ||t|| against the stored tokens.
    """
    import numcodecs
    import torch

    from extract.estimate import bytes_per_sample
    from store import codecs
    from store.features import FeatureStore

    fs = FeatureStore.open(store)
    zstd = numcodecs.Zstd(level=1)
    rows = {c: {"codec": c, "raw_bytes": 0, "zstd_bytes": 0.0, "err": 0.0, "norm": 0.0} for c in codecs.CODECS}
    measured = 0
    for name in teachers:
        ts = fs.teacher(name)
        n = min(samples, fs.num_samples)
        stored = ts.read_samples(0, np.arange(n))
        tok = ts.decode({k: stored[k] for k in ts.payload_keys}).float()                    # (n, T, 768)
        pca = {"mean": ts.stats["mean"], "basis": ts.stats["components"][:codecs.PCA_DIM]}
        measured = n
        for c, row in rows.items():
            arrays = codecs.encode(c, tok, pca=pca)
            packed = sum(len(zstd.encode(np.ascontiguousarray(a))) for a in arrays.values())
            meta = bytes_per_sample(c, ts.n_visible) - sum(a[0].nbytes for a in arrays.values())
            row["raw_bytes"] += bytes_per_sample(c, ts.n_visible)
            row["zstd_bytes"] += packed / n + meta
            back = codecs.decode(c, arrays, pca=pca)
            row["err"] += float(torch.linalg.vector_norm(back - tok) ** 2)
            row["norm"] += float(torch.linalg.vector_norm(tok) ** 2)
    out = []
    for row in rows.values():
        rel = math.sqrt(row.pop("err") / row.pop("norm"))
        out.append(dict(row, rel_error=rel, demo_bytes=row["zstd_bytes"] * num_images * views,
                        imagenet_bytes=row["zstd_bytes"] * IMAGENET_IMAGES * 4))
    files = [p for p in Path(store).rglob("*") if p.is_file()]
    actual = sum(p.stat().st_size for p in files)
    stats = sum(p.stat().st_size for p in files if "stats" in p.relative_to(store).parts)
    fp16 = next(r for r in out if r["codec"] == "fp16")
    return {"rows": out, "measured_samples": measured, "actual_bytes": actual, "stats_bytes": stats,
            "projected_fp16_bytes": fp16["demo_bytes"]}


def training_throughput(metrics: list[dict], *, batch_size: int) -> dict | None:
    """The cached row from the training stage itself: the median images/s of its logged
    intervals (``train.log_every`` steps each), the first one (start-up) left out unless it is
    the only one; None when nothing was logged."""
    ips = [r["images_per_second"] for r in (metrics[1:] or metrics) if "images_per_second" in r]
    if not ips:
        return None
    return dict(mode="cached", images_per_second=float(np.median(ips)), intervals=len(ips),
                batch_size=batch_size, spread=[float(min(ips)), float(max(ips))], source="training stage")


def measure_throughput(*, data: Path, store: Path, settings: DemoSettings, device: str,
                       metrics: list[dict], teachers: dict | None = None) -> dict:
    """Rows cached / ceiling / online, or {"skipped": why}.

    cached: the training stage's own rate (``training_throughput``: the same store reads,
    decoding and step, over the whole run); ceiling: ``bench.train.measure`` of the step alone
    on batches in memory (3 rounds of ``bench_steps``); online: ``bench.train.measure`` with
    the three teachers (the expensive row: 1 round of max(1, bench_steps // 2) steps after 1
    warm-up), reusing ``teachers`` ({name: Teacher}) already built by the extract stage."""
    if settings.bench_steps < 1:
        return {"skipped": "bench_steps=0 (measurement turned off)"}
    try:
        from bench.train import measure
    except ImportError as error:
        return {"skipped": f"bench/train.py is not available ({error})"}
    cached = training_throughput(metrics, batch_size=settings.batch_size)
    if cached is None:
        return {"skipped": "the training stage logged no throughput to give the cached row"}
    warmup = 1
    common = dict(data=data, store=store, batch_size=settings.batch_size, steps=settings.bench_steps,
                  warmup=warmup, device=device, decoder=settings.decoder, threads=2, views=settings.views,
                  streams=1)
    try:
        ceiling = measure(**common, rounds=3, modes=("ceiling",))
        online = measure(**dict(common, steps=max(1, settings.bench_steps // 2)), rounds=1, modes=("online",),
                         teachers=teachers)
    except SystemExit as error:                       # measure's own "too little data" refusal
        return {"skipped": str(error)}
    rows = [cached, *ceiling, *online]
    for r in rows:
        r["vs_online"] = r["images_per_second"] / online[0]["images_per_second"]
        r["vs_ceiling"] = r["images_per_second"] / ceiling[0]["images_per_second"]
    return {"rows": rows, "device": device, "batch_size": settings.batch_size, "steps": settings.bench_steps,
            "online_steps": online[0]["steps"], "warmup": warmup, "cached_intervals": cached["intervals"]}


# ---- the pipeline -------------------------------------------------------------------------
def _check_settings(out: Path, record: dict) -> None:
    path = out / "demo.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [f"{k}: {out} has {old.get(k)!r}, now {record.get(k)!r}" for k in sorted(set(old) | set(record))
                if old.get(k) != record.get(k)]
        if diff:
            raise DemoError(f"{out} was made with other demo settings; use another --out (or delete it):\n  "
                            + "\n  ".join(diff))
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1, sort_keys=True))


def run_demo(*, out, checkpoints=None, settings: DemoSettings | None = None, device: str = "cpu",
             progress: bool = True, echo: Callable[[str], None] = print) -> dict:
    """Run every stage into ``out``; returns {"report": path, "stages": [...], "reused": [...], ...}."""
    import torch

    from extract.verify import verify_store
    from store.shards import prepare
    from train import report
    from train.loader import steps_per_epoch

    settings = (settings or DemoSettings()).check()
    out = Path(out).resolve()
    sources = teacher_sources(checkpoints)
    _check_settings(out, {**asdict(settings), "teachers": {n: s or "random-init" for n, s in sources.items()}})
    stages, reused, n_stages = [], [], 9
    built: dict = {}
    from extract.checkpoints import TEACHERS as SPECS
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
        train_tree, held_tree, was = write_photos(out / "photos", settings)
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
    stats_images = {"train": settings.stats_images, "heldout": min(4, settings.stats_images)}

    rate: dict = {}

    def extract():
        notes = []
        for split in ("train", "heldout"):
            note, all_done = extract_all(stores[split], data[split], views=views[split],
                                         stats_images=stats_images[split], sources=sources, settings=settings,
                                         device=device, built=built, progress=progress, rate=rate)
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
                      for s, sec in cfg.to_dict().items()}, "steps": run["steps"], "settings": asdict(settings), "device": device,
           "sources": sources, "mtime_ns": (run_dir / "last.pt").stat().st_mtime_ns}
    old = json.loads(m_path.read_text()) if m_path.is_file() else {}
    fresh = old.get("key") != json.loads(json.dumps(key))
    meas = {} if fresh else old
    held_idx = np.arange(len(data["heldout"]))
    objectives = {}

    def objective(kind: str):
        if kind not in objectives:
            objectives[kind] = report.load_run(run_dir, device=device, trained=(kind == "trained"),
                                               store_path=stores["train"])[1]
        return objectives[kind]

    def evaluate():
        if "cka" in meas:
            reused.append("CKA evaluation")
            return f"reused: CKA fused targets trained {meas['cka']['fused']['trained']:.3f} vs untrained " \
                   f"{meas['cka']['fused']['untrained']:.3f}"
        samples = report.load_samples(stores["heldout"], data["heldout"], indices=held_idx, epoch=0,
                                      teachers=list(cfg.data.teachers))
        with torch.no_grad():
            meas["cka"] = report.cka_scores(objective("trained"), objective("untrained"),
                                            report.sample_batch(samples, cfg.data.teachers, device=device))
        c = meas["cka"]["fused"]
        return f"linear CKA with the fused targets on {len(held_idx)} held-out views: trained {c['trained']:.3f}, " \
               f"untrained {c['untrained']:.3f}"
    stage("evaluate", evaluate)

    def throughput():
        if meas.get("throughput", {}).get("rows"):
            reused.append("throughput measurement")
            return "reused the measurement of an earlier run"
        meas["throughput"] = measure_throughput(data=out / "data" / "train", store=stores["train"],
                                                settings=settings, device=device,
                                                metrics=report.read_metrics(run_dir / "metrics.jsonl"),
                                                teachers=built)
        rows = meas["throughput"].get("rows")
        if not rows:
            return f"skipped: {meas['throughput']['skipped']}"
        return ", ".join(f"{r['mode']} {r['images_per_second']:.1f} img/s" for r in rows)
    stage("throughput", throughput)
    built.clear()

    def sizes():
        was = "sizes" in meas
        if was:
            reused.append("store size measurement")
        else:
            meas["sizes"] = codec_sizes(stores["train"], teachers=cfg.data.teachers, num_images=len(data["train"]),
                                        views=settings.views)
        s = meas["sizes"]
        per_codec = ", ".join(f"{r['codec']} {r['zstd_bytes'] / 1024:.0f} KiB" for r in s["rows"])
        return ("reused: " if was else "") + per_codec + \
            f" per (image, view); store on disk {s['actual_bytes'] / 2**20:.1f} MiB"
    stage("sizes", sizes)
    m_path.parent.mkdir(parents=True, exist_ok=True)
    m_path.write_text(json.dumps({"key": key, **{k: meas[k] for k in ("cka", "throughput", "sizes")}}, indent=1))

    # 9: report
    report_dir = out / "report"

    def write_report():
        rows = report.read_metrics(run_dir / "metrics.jsonl")
        report.plot_losses(rows, report_dir / "losses.png")
        report.plot_gate_shares(rows, report_dir / "gates.png")
        pick = np.unique(np.linspace(0, len(held_idx) - 1, max(1, settings.panels)).round().astype(int))
        samples = report.load_samples(stores["heldout"], data["heldout"], indices=held_idx[pick], epoch=0,
                                      teachers=list(cfg.data.teachers))
        from store.inspect import render_panel
        maps = report.gate_maps(objective("trained"), report.sample_batch(samples, cfg.data.teachers,
                                                                          device=device))
        panels = []
        for s, w in zip(samples, maps):
            name = f"panel_{s.index:04d}.png"
            render_panel(s, report_dir / name, weights=w, weights_title="w",
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
                                                       "note": "this file"}],
                "run": {"steps": run["steps"], "batch_size": settings.batch_size, "lr": settings.lr,
                        "final": rows[-1], "dir": str(run_dir)},
                "cka": meas["cka"], "throughput": meas["throughput"], "sizes": meas["sizes"],
                "panels": panels, "reused": list(reused)}
        report.write_markdown(report_dir / "README.md", info)
        return f"{report_dir / 'README.md'} ({len(panels)} panels; stages before this one " \
               f"{sum(s['seconds'] for s in stages):.1f} s)"
    stage("report", write_report)
    return {"report": report_dir / "README.md", "stages": stages, "reused": reused, "cka": meas["cka"],
            "throughput": meas["throughput"], "sizes": meas["sizes"], "run_dir": run_dir,
            "teacher_rate": rate.get("images_per_second")}
