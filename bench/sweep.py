"""K learners on one data pass (``train(..., variants=...)``) against K separate runs, with the
data path alone beside them, in one run (docs/performance.md, "K learners on one data pass").

    python bench/sweep.py                     # 96 ImageNet-like photos, K = 1, 2, 4, 3 rounds, a table
    python bench/sweep.py --max-k 8           # ... and K = 8
    python bench/sweep.py --json rows.json    # also the rows
    python bench/sweep.py --data D --store S  # on your own prepared data and store
    python bench/sweep.py --set model.depth=4 # any train config override, for every learner"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name: overrides of the base config (the first K are the learners of row K)
VARIANTS = ("base:", "uniform:gate.mode=uniform", "mse:loss.kind=mse", "seed1:train.seed=1",
            "agreement:gate.mode=agreement", "seed2:train.seed=2", "mse_uniform:loss.kind=mse gate.mode=uniform",
            "seed3:train.seed=3")


def synthetic_store(root: Path, *, images: int, shard_size: int) -> tuple[Path, Path]:
    """(data, store) of the built-in data under ``root``: ``samples/imagenet_like.py`` photos,
    ``prepare``, and a three-teacher store of adapter-space int8 coefficients (seeded-noise tokens on
    an exact synthetic basis) with the stored 224 px JPEG views (bench/datapath.py's writers)."""
    from bench.datapath import write_store, write_view_pixels
    from samples.imagenet_like import write_imagenet_like
    from data.shards import prepare

    data = prepare(write_imagenet_like(root / "photos", count=images), root / "data", shard_size=shard_size,
                   progress=False)
    store = write_store(root / "store", data, codec="adapter", view_pixels="jpeg")
    write_view_pixels(store, data, "jpeg")
    return data.root, store


def base_config(data, store, *, batch_size: int, threads: int, overrides=()):
    from train.config import load_config
    return load_config(None, [f"data.images={data}", f"data.store={store}", f"train.batch_size={batch_size}",
                              f"data.num_workers={threads}", "adapters.mode=frozen", *overrides])


def time_data_path(cfg, *, steps: int, device: str = "cpu") -> float:
    """Seconds of ``steps`` batches of the run's source (the loop's epochs from step 0, each
    batch materialised on ``device``), no learner; the source is built before the clock starts."""
    from data.shards import ImageSet
    from train.loader import Plan
    from train.runstore import open_run_store
    from train.sources import build_source

    data = ImageSet.open(cfg.data.images)
    cfg, store = open_run_store(cfg, data)
    plan = Plan.of(cfg, data, store)
    source, _ = build_source(cfg, plan, device=device, store=store)
    step, t = 0, time.perf_counter()
    while step < steps:
        epoch, start = divmod(step, plan.steps_per_epoch)
        it = source.epoch(epoch, start_step=start)
        for _, batch in it:
            out = source.materialize(batch, device)
            step += 1
            if step >= steps:
                break
        it.close()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    assert out["images"].shape[0] == plan.local_batch
    return time.perf_counter() - t


def time_learners(cfg, k: int, *, steps: int, out: Path, device: str = "cpu") -> dict:
    """One ``train`` of K learners (K = 1: a single run) for ``steps`` steps in ``out``: its
    step-loop seconds and the learners' names; RuntimeError if a learner did not finish."""
    from train.loop import train
    from train.sweep import parse_variant

    variants = None if k == 1 else [parse_variant(v) for v in VARIANTS[:k]]
    summary = train(cfg, out_dir=out, max_steps=steps, progress=False, device=device, variants=variants)
    bad = {n: x["status"] for n, x in summary["learners"].items() if x["status"] != "done" or x["steps"] != steps}
    if summary["steps"] != steps or bad:
        raise RuntimeError(f"K={k}: {summary['steps']} of {steps} steps; learners not done: {bad}")
    names = [VARIANTS[0].split(":")[0]] if k == 1 else list(summary["learners"])
    return dict(seconds=summary["seconds"], learners=names)


def measure(data, store, *, ks=(1, 2, 4), steps: int = 8, rounds: int = 3, batch_size: int = 8, threads: int = 2,
            overrides=(), root: Path, device: str = "cpu", warmup: bool = True) -> list[dict]:
    """One row per K, and one for the data path alone (the same batch source iterated and
    materialised for the same steps without a learner), each timed once per round with the rounds
    rotated, after an untimed 2-step single run; run folders go under ``root``. K = 1 is a plain
    single run, K > 1 a sweep of the first K of ``VARIANTS`` (the base config first)."""
    if 1 not in ks:
        raise ValueError("the rows compare with K = 1 (separate runs): include it in ks")
    if len(VARIANTS) < max(ks):
        raise ValueError(f"at most K = {len(VARIANTS)} (bench/sweep.py VARIANTS)")
    cfg = base_config(data, store, batch_size=batch_size, threads=threads, overrides=overrides)
    if warmup:
        time_learners(cfg, 1, steps=2, out=root / "warmup", device=device)
    items = ["data", *ks]
    times = {x: [] for x in items}
    names = {}
    for r in range(rounds):
        for x in items[r % len(items):] + items[:r % len(items)]:
            if x == "data":
                times[x].append(time_data_path(cfg, steps=steps, device=device))
                continue
            got = time_learners(cfg, x, steps=steps, out=root / f"round{r}_k{x}", device=device)
            times[x].append(got["seconds"])
            names[x] = got["learners"]
    med = {x: statistics.median(v) for x, v in times.items()}
    load = list(os.getloadavg())
    rows = []
    for k in ks:
        sec = med[k]
        rows.append(dict(
            k=k, learners=len(names[k]), names=names[k], seconds=sec, rounds_seconds=times[k],
            s_per_step=sec / steps, images_per_s=k * batch_size * steps / sec,
            images_per_s_per_learner=batch_size * steps / sec, vs_separate=sec / (k * med[1]),
            datapath_seconds=med["data"], datapath_rounds_seconds=times["data"], datapath_share=med["data"] / sec,
            steps=steps, rounds=rounds, batch_size=batch_size, threads=threads, torch_threads=torch.get_num_threads(),
            overrides=list(overrides), device=str(device), loadavg=load, cpus=os.cpu_count()))
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = ["| K | wall s (rounds) | s/step | images/s total | images/s per learner | x K runs | data share |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    r0 = rows[0]
    spread = ", ".join(f"{v:.2f}" for v in r0["datapath_rounds_seconds"])
    lines.append(f"| data path alone | {r0['datapath_seconds']:.2f} ({spread}) | "
                 f"{r0['datapath_seconds'] / r0['steps']:.3f} | "
                 f"{r0['batch_size'] * r0['steps'] / r0['datapath_seconds']:.0f} | - | - | 1.00 |")
    for r in rows:
        spread = ", ".join(f"{v:.2f}" for v in r["rounds_seconds"])
        lines.append(f"| {r['k']} | {r['seconds']:.2f} ({spread}) | {r['s_per_step']:.3f} | {r['images_per_s']:.1f} | "
                     f"{r['images_per_s_per_learner']:.1f} | {r['vs_separate']:.2f} | {r['datapath_share']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--store", type=Path)
    ap.add_argument("--images", type=int, default=96, help="ImageNet-like photos for the built-in data")
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-k", type=int, default=4, choices=[1, 2, 4, 8], help="rows K = 1, 2, 4 up to this")
    ap.add_argument("--threads", type=int, default=2, help="decoder threads (data.num_workers)")
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="train config override")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--root", type=Path, help="build the data and run folders here and keep them (default: a temp dir)")
    ap.add_argument("--json", type=Path, help="write the rows here (a list of objects)")
    a = ap.parse_args(argv)
    from bench.demo import _rates

    torch.set_num_threads(a.torch_threads)
    ks = [k for k in (1, 2, 4, 8) if k <= a.max_k]
    load = os.getloadavg()
    before = _rates(a.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = a.root or Path(tmp)
        data, store = a.data, a.store
        if data is None or store is None:
            print(f"building {a.images} ImageNet-like photos and their store (adapter codec, JPEG views) ...",
                  flush=True)
            t = time.perf_counter()
            data, store = synthetic_store(root / "fixture", images=a.images, shard_size=a.shard_size)
            print(f"  built in {time.perf_counter() - t:.0f} s", flush=True)
        rows = measure(data, store, ks=ks, steps=a.steps, rounds=a.rounds, batch_size=a.batch_size,
                       threads=a.threads, overrides=a.set, root=root / "runs", device=a.device)
    after = _rates(a.device)
    teacher = dict(masked=(before[0] + after[0]) / 2, full=(before[1] + after[1]) / 2)
    for r in rows:
        r["teacher_images_per_s"] = teacher
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"CPU, {os.cpu_count()} CPUs"
    print(f"\nK learners on one data pass, {name}, torch threads {torch.get_num_threads()} (set), decoder threads "
          f"{a.threads}, batch {a.batch_size}, {a.steps} steps, {a.rounds} rotated rounds, median round; store "
          f"{store}; overrides {' '.join(a.set) or '(none)'}")
    print(f"this machine: one ViT-B teacher forward (mae, random init, batch 8, fp32) {before[0]:.1f} / {after[0]:.1f} "
          f"images/s masked (before / after), {before[1]:.1f} / {after[1]:.1f} full; load average "
          f"{load[0]:.2f} before, {rows[0]['loadavg'][0]:.2f} after, on {os.cpu_count()} CPUs")
    print(format_rows(rows))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
        print(f"rows written to {a.json}")
    return rows


if __name__ == "__main__":
    main()
