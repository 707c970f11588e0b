"""The demo's settings and the work of its stages (demo/pipeline.py runs them in order)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.config import TypedConfig, check_choices, check_nonneg, check_positive
from core.run import INFO, load_checkpoint, saved_config, settings_diff
from data.decoders import DECODERS, resolve_decoder
from store.codecs import CODECS
from core.errors import ExpectedError
from teachers.descriptors import PAPER_TEACHERS

TEACHERS = PAPER_TEACHERS
MOVABLE = {"data.images", "data.store", "train.out_dir"}    # paths: OUT may move between runs (as train/loop)
IMAGENET_IMAGES = 1_281_167


class DemoError(ExpectedError, RuntimeError):
    """The demo cannot go on (settings differ from OUT's, a store fails verification, ...)."""


@dataclass
class DemoSettings(TypedConfig):
    """What the demo makes: a typed config (core/config.py), resolved in OUT/config.yaml."""

    copies: int = 4                 # training images = 13 photos x copies (crops)
    heldout_copies: int = 1         # held-out images = 9 other photos x heldout_copies (none trained on)
    max_side: int = 256             # long side of the photos in pixels
    views: int = 1                  # cached views per training image (each epoch reads slot 0)
    seed: int = 0
    steps: int = 60                 # student steps
    batch_size: int = 16
    lr: float = 5e-4                # peak learning rate (base_lr = lr * 256 / batch) (choice)
    codec: str = "adapter"          # extract's default: 192 int8 coefficients per token on the statistics' basis
    view_pixels: str = "jpeg"       # the training store keeps its views; training reads them (data.pixels=views)
    decoder: str = "auto"           # auto (DALI where installed, else PIL), dali, pil or torchvision; OUT/config.yaml
                                    # records the resolved one
    stats_images: int = 16          # images whose tokens give each teacher's adapter statistics
    teacher_batch: int = 16
    panels: int = 3                 # held-out samples shown with their gate weights
    bench_steps: int = 2            # timed steps per throughput row (0: skip the measurement)
    train_overrides: tuple[str, ...] = ()   # extra KEY=VALUE for the train config

    def validate(self) -> "DemoSettings":
        try:
            check_positive(self, ["copies", "heldout_copies", "max_side", "views", "steps", "batch_size", "lr",
                                  "stats_images", "teacher_batch", "panels"])
            check_nonneg(self, ["bench_steps"])
            check_choices(self, {"decoder": DECODERS, "codec": CODECS, "view_pixels": ("none", "jpeg", "raw")})
            self.decoder = resolve_decoder(self.decoder)
        except ValueError as error:
            raise DemoError(f"demo setting: {error}") from None
        return self


def teacher_sources(checkpoints) -> dict[str, str | None]:
    """{teacher: official file path, or None for a random-init teacher}."""
    from teachers.checkpoints import TEACHERS as SPECS
    out = {}
    for name in TEACHERS:
        path = Path(checkpoints) / SPECS[name].filename if checkpoints else None
        out[name] = str(path.resolve()) if path is not None and path.is_file() else None
    return out


def _teacher_done(store: Path, data, name: str, source: str | None, views: int, seed: int,
                  view_pixels: str = "none") -> bool:
    from store.features import DataInfo, FeatureStore, StoreError
    from store.viewpixels import ViewPixels
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
    vp = ViewPixels.open(fs) if view_pixels != "none" else None
    return ts.has_stats and not ts.missing() and (view_pixels == "none" or (vp is not None and not vp.missing()))


def demo_teacher(name: str, *, sources: dict, settings: DemoSettings, device: str, built: dict):
    """The demo's teacher ``name`` (its official file, or random-init), built once into ``built``."""
    from teachers.vit import build_teacher

    if name not in built:
        built[name] = (build_teacher(name, checkpoint=sources[name], device=device) if sources[name] else
                       build_teacher(name, random_init=True, seed=settings.seed, device=device))
    return built[name]


def extract_all(store: Path, data, *, views: int, stats_images: int, sources: dict, settings: DemoSettings,
                device: str, built: dict, progress: bool, rate: dict | None = None, view_pixels: str = "none",
                stats_from: Path | None = None) -> tuple[str, bool]:
    """Run the missing teachers over ``data`` into ``store`` (``settings.codec``, ``view_pixels``;
    ``stats_from``: the store whose statistics the teachers encode with, see ``run_extraction``);
    returns (stage note, all reused). A teacher already complete is not even built; ``built``
    caches the teachers that were. ``rate``, when given and empty, receives
    {"images_per_second": ``teacher_rate``} of the first teacher built."""
    from extract.config import ExtractConfig
    from extract.runner import run_extraction
    from train.throughput import teacher_rate

    done, rates = [], []
    for name in TEACHERS:
        if _teacher_done(store, data, name, sources[name], views, settings.seed, view_pixels):
            done.append(name)
            continue
        if name not in built:
            demo_teacher(name, sources=sources, settings=settings, device=device, built=built)
            if rate is not None and not rate:
                rate.update(teacher=name, images_per_second=teacher_rate(built[name], device=device))
        s = run_extraction(ExtractConfig(store=store, views=views, seed=settings.seed, codec=settings.codec,
                                         batch_size=settings.teacher_batch, device=device, decoder=settings.decoder,
                                         threads=2, stats_images=stats_images, view_pixels=view_pixels,
                                         stats_from=stats_from), teacher=built[name], data=data, progress=progress)
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
                 "data.streams=1", f"data.pixels={'source' if settings.view_pixels == 'none' else 'views'}",
                 "data.shuffle_window=2", f"data.teachers=[{','.join(TEACHERS)}]", f"train.batch_size={settings.batch_size}",
                 "train.log_every=5", f"train.ckpt_every={epochs}", f"schedule.epochs={epochs}",
                 f"schedule.warmup_epochs={max(1, epochs // 10)}", f"optim.base_lr={base_lr!r}",
                 f"train.out_dir={run_dir}", *settings.train_overrides]
    return load_config(None, overrides)


def folder_diff(folder: Path, config: dict, *, compare: dict, movable=()) -> list[str] | None:
    """What differs between the run folder ``folder`` (its config.yaml and run.json, as
    core/run.py writes them) and ``config`` plus the ``compare`` values: one line per key,
    "key: FOLDER has A, now B"; None when the folder records no config."""
    saved = saved_config(folder)
    if saved is None:
        return None
    saved.pop("derived", None)
    info = json.loads((folder / INFO).read_text()) if (folder / INFO).is_file() else {}
    diff = settings_diff(saved, config, movable=movable) + settings_diff({k: info.get(k) for k in compare}, compare)
    return [d.replace(": checkpoint ", f": {folder} has ", 1) for d in diff]


def train_or_reuse(cfg, run_dir: Path, *, steps: int, device: str, progress: bool) -> tuple[dict, str]:
    """Train, resume or reuse the run in ``run_dir`` (a core/run.py run folder); returns (info, note).
    A run with another config or step count is refused, naming the keys."""
    from train.loop import train
    ck_path = run_dir / "last.pt"
    resume = ck_path.is_file()
    if resume:
        diff = folder_diff(run_dir, cfg.to_dict(), compare={"total_steps": steps}, movable=MOVABLE)
        if diff:
            raise DemoError(f"{run_dir} holds a run with another config (delete it or use another --out):\n  "
                            + "\n  ".join(diff))
        step = int(load_checkpoint(ck_path)["step"])
        if step >= steps and (run_dir / "student.safetensors").is_file():
            return {"steps": step}, f"reused finished run ({step} steps) in {run_dir}"
    summary = train(cfg, out_dir=run_dir, max_steps=steps, resume=resume, device=device,
                    ckpt_steps=max(10, steps // 3), progress=progress)
    last = summary.get("last") or {}
    note = (f"{'resumed' if resume else 'trained'} to step {summary['steps']}"
            + (f", {last['images_per_second']:.1f} img/s at the end" if "images_per_second" in last else ""))
    return {"steps": summary["steps"]}, note


def codec_sizes(fs, data, *, teachers: dict, num_images: int, views: int, device: str = "cpu",
                decoder: str = "pil", samples: int = 16) -> dict:
    """Bytes per (image, view) for each codec, measured on the views of the store ``fs`` (open).

    For each teacher ({name: Teacher}), its float tokens of the first ``samples`` images'
    slot-0 views (as extraction computes them: the store's crops, masks and teacher input)
    are encoded with every codec (the coefficient codecs on the store's statistics); ``zstd``
    is the payload compressed with zstd level 1 (the store's compressor) plus the small arrays
    uncompressed. ``rel_error`` is ||decode(encode(t)) - t|| / ||t|| against those tokens.
    """
    import numcodecs
    import torch

    from extract.estimate import bytes_per_sample
    from extract.runner import Extractor
    from store import codecs
    from store.features import PIXELS

    store = fs.path
    zstd = numcodecs.Zstd(level=1)
    rows = {c: {"codec": c, "raw_bytes": 0, "zstd_bytes": 0.0, "err": 0.0, "norm": 0.0} for c in codecs.CODECS}
    n = min(samples, fs.num_samples)
    index = np.arange(n)
    for name, teacher in teachers.items():
        ts = fs.teacher(name)
        ex = Extractor(teacher, data, seed=fs.seed, views=fs.views, batch_size=n, device=device, decoder=decoder,
                       num_threads=1, teacher_input=ts.input)
        tok = ex.tokens(ex.view_batch(index, data.read_many(index), slot=0)).cpu()           # (n, T, 768)
        for c, row in rows.items():
            pca = codecs.statistics(c, ts.stats)
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
    pixels = sum(p.stat().st_size for p in files if p.relative_to(store).parts[0] == PIXELS)
    codec = fs.teacher(next(iter(teachers))).codec
    own = next(r for r in out if r["codec"] == codec)
    return {"rows": out, "measured_samples": n, "actual_bytes": actual, "stats_bytes": stats,
            "pixels_bytes": pixels, "codec": codec, "projected_bytes": own["demo_bytes"]}


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
    decoding and step, over the whole run); ceiling: ``train.throughput.measure`` of the step alone
    on batches in memory (3 rounds of ``bench_steps`` after 1 warm-up step); online:
    ``train.throughput.measure`` with the three teachers (the expensive row: 1 round of
    max(1, bench_steps // 2) steps), reusing ``teachers`` ({name: Teacher}) already built by
    the extract stage; those ran there, so the online row has no warm-up step unless it has
    to build its teachers (a warm-up there would cost three ViT-B forwards of a batch, about
    a third of the stage)."""
    if settings.bench_steps < 1:
        return {"skipped": "bench_steps=0 (measurement turned off)"}
    from train.throughput import measure
    cached = training_throughput(metrics, batch_size=settings.batch_size)
    if cached is None:
        return {"skipped": "the training stage logged no throughput to give the cached row"}
    warmup, online_warmup = 1, 0 if teachers else 1
    common = dict(data=data, store=store, batch_size=settings.batch_size, steps=settings.bench_steps,
                  warmup=warmup, device=device, decoder=settings.decoder, threads=2, views=settings.views,
                  streams=1, overrides=settings.train_overrides)
    try:
        ceiling = measure(**common, rounds=3, modes=("ceiling",))
        online = measure(**dict(common, steps=max(1, settings.bench_steps // 2), warmup=online_warmup), rounds=1,
                         modes=("online",), teachers=teachers)
    except ValueError as error:                       # measure's own "too little data" refusal
        return {"skipped": str(error)}
    rows = [cached, *ceiling, *online]
    for r in rows:
        r["vs_online"] = r["images_per_second"] / online[0]["images_per_second"]
        r["vs_ceiling"] = r["images_per_second"] / ceiling[0]["images_per_second"]
    return {"rows": rows, "device": device, "batch_size": settings.batch_size, "steps": settings.bench_steps,
            "online_steps": online[0]["steps"], "warmup": warmup,
            "online_warmup": online_warmup, "cached_intervals": cached["intervals"]}


