"""What the teacher cache costs: the same student trained three ways (cached, online-replay,
online-fresh; docs/method.md, "Three ways to train"), scored on held-out views; what a run can and
cannot show: docs/performance.md, "What the cache costs".

    python bench/cache_cost.py                          # CPU, demo photos, shallow random teachers
    python bench/cache_cost.py --views 1 2 4 --json cost.json
    python bench/cache_cost.py --data D --heldout H --checkpoints CKPT --teacher-depth 12 --device cuda --decoder dali --batch-size 256 --steps 5000 --views 1 2 4 --out WORK"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract.config import ExtractConfig  # noqa: E402
from extract.runner import run_extraction  # noqa: E402
from teachers.vit import build_teacher  # noqa: E402
from data import views as V  # noqa: E402
from data.shards import ImageSet, prepare  # noqa: E402
from teachers.descriptors import PAPER_TEACHERS  # noqa: E402
from train import diagnostics  # noqa: E402
from train.config import load_config  # noqa: E402
from train.loader import CachedSource, OnlineSource, Plan  # noqa: E402
from train.runstore import RunStore  # noqa: E402
from core.optim import lr_schedule  # noqa: E402
from core.precision import autocast_dtype, grad_scaler  # noqa: E402
from train.learner import make_optimizer, train_step  # noqa: E402
from train.objective import build_objective  # noqa: E402
from train.online import FreshSource  # noqa: E402

TEACHERS = PAPER_TEACHERS


def demo_data(root: Path, *, copies: int, heldout_copies: int, max_side: int = 256) -> tuple[ImageSet, ImageSet]:
    """The demo's photo sets (train: 13 photos x copies crops, held-out: 9 other photos x
    heldout_copies crops)."""
    from samples.photos import write_photo_splits
    train_tree, held_tree, _ = write_photo_splits(root / "photos", copies=copies, heldout_copies=heldout_copies,
                                                  max_side=max_side)
    return (prepare(train_tree, root / "data" / "train", shard_size=13, progress=False, workers=0),
            prepare(held_tree, root / "data" / "heldout", shard_size=13, progress=False, workers=0))


def make_teachers(names, *, checkpoints, depth: int, device: str) -> dict:
    """Official teachers from ``checkpoints`` (a folder of teachers/checkpoints.py files), else
    seeded random-init ones with ``depth`` blocks."""
    from teachers.checkpoints import TEACHERS as SPECS
    if checkpoints:
        return {n: build_teacher(n, checkpoint=Path(checkpoints) / SPECS[n].filename, device=device) for n in names}
    kwargs = None if depth == 12 else {"depth": depth}
    return {n: build_teacher(n, random_init=True, seed=0, device=device, model_kwargs=kwargs) for n in names}


def teacher_rate(teachers: dict, *, device: str, batch: int = 8) -> float:
    """Images/s of the teachers together (one forward of each per image): the per-teacher
    rates of ``train.throughput.teacher_rate`` (masked, random views) combined, 1 / sum(1 / r)."""
    from train.throughput import teacher_rate as one_rate
    return 1.0 / sum(1.0 / one_rate(t, device=device, images=batch) for t in teachers.values())


def run_config(args, *, data: Path, store: Path | None, views: int, source: str):
    """The student's config (train/config.py defaults; the bench's batch, lr and teachers)."""
    lr = args.lr * 256 / args.batch_size
    return load_config(None, [f"data.images={data}", f"data.store={store or ''}", f"data.views={views}",
                              f"data.source={source}", f"data.teachers=[{','.join(args.teachers)}]",
                              f"data.decoder={args.decoder}", f"data.num_workers={args.threads}",
                              "data.streams=1", "data.shuffle_window=2", f"train.batch_size={args.batch_size}",
                              f"optim.base_lr={lr!r}", "schedule.epochs=1", "schedule.warmup_epochs=0"])


def train_one(source, *, cfg, stats, steps: int, device: str) -> tuple:
    """Train a fresh student (cfg.train.seed) for ``steps`` on ``source``; (objective, seconds)."""
    objective = build_objective(cfg, stats).to(device)
    opt = make_optimizer(cfg, objective)
    lrs = lr_schedule(total_steps=steps, warmup_steps=max(1, steps // 10), peak=cfg.derived()["lr"])
    amp = autocast_dtype(cfg.train.amp, device)
    scaler = grad_scaler(amp, device)
    step, t0 = 0, time.perf_counter()
    spe = source.plan.steps_per_epoch
    while step < steps:
        for _, cpu_batch in source.epoch(step // spe, start_step=step % spe):
            train_step(objective, opt, source.materialize(cpu_batch, device), lr=float(lrs[step]),
                       clip_grad=cfg.train.clip_grad, amp=amp, scaler=scaler)
            step += 1
            if step == steps:
                break
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return objective.eval(), time.perf_counter() - t0


@torch.no_grad()
def held_out_scores(objective, untrained, batch: dict) -> dict:
    cka = diagnostics.cka_scores(objective, untrained, batch)
    parts = objective(batch)
    return {"cka_fused": cka["fused"]["trained"], "cka_fused_untrained": cka["fused"]["untrained"],
            "token_loss": float(parts["loss_token"]), "tokens": cka["tokens"]}


def measure(args, work: Path, echo=print) -> dict:
    device = args.device
    if args.data:
        train_set, held_set = ImageSet.open(args.data), ImageSet.open(args.heldout)
    else:
        train_set, held_set = demo_data(work, copies=args.copies, heldout_copies=1)
    echo(f"data: {len(train_set)} training images, {len(held_set)} held-out images")
    teachers = make_teachers(args.teachers, checkpoints=args.checkpoints, depth=args.teacher_depth, device=device)
    rates = {"used": teacher_rate(teachers, device=device)}
    if not args.checkpoints and args.teacher_depth != 12:
        first = PAPER_TEACHERS[0]               # a full-depth ViT-B/16
        rates["vit_b16"] = teacher_rate({first: build_teacher(first, random_init=True, seed=0, device=device)},
                                        device=device, batch=4)
    echo("teacher images/s: " + ", ".join(f"{k} {v:.1f}" for k, v in rates.items()))

    def extract(data, store, views):
        t = time.perf_counter()
        for name, teacher in teachers.items():
            run_extraction(ExtractConfig(store=store, views=views, seed=0, batch_size=args.teacher_batch,
                                         device=device, decoder=args.decoder, threads=args.threads,
                                         stats_images=args.stats_images, codec="fp16", view_pixels="none"),
                           teacher=teacher, data=data, progress=False)
        return time.perf_counter() - t

    held_store = work / "features" / "heldout"
    extract(held_set, held_store, 1)
    stores, extract_seconds = {}, {}
    for v in args.views:
        stores[v] = work / "features" / f"train_v{v}"
        extract_seconds[v] = extract(train_set, stores[v], v)
        echo(f"extracted the V={v} store in {extract_seconds[v]:.1f} s")
    from store.features import FeatureStore
    fs = FeatureStore.open(stores[args.views[0]])
    stats = {n: (fs.teacher(n).stats["mean"], fs.teacher(n).stats["components"]) for n in args.teachers}

    samples = diagnostics.load_samples(held_store, held_set, indices=np.arange(len(held_set)), epoch=0,
                                  teachers=list(args.teachers))
    held_batch = diagnostics.sample_batch(samples, args.teachers, device=device)
    cfg = run_config(args, data=train_set.root, store=stores[args.views[0]], views=args.views[0], source="cached")
    untrained = build_objective(cfg, stats).to(device).eval()
    amp = torch.device(device).type == "cuda"
    kw = dict(decoder=args.decoder, device=device, num_threads=args.threads)

    runs = [("online-fresh", None)] + [(m, v) for v in args.views for m in ("cached", "online-replay")]
    rows = []
    for mode, v in runs:
        plan = Plan(train_set, seed=0, views=v or 1, batch_size=args.batch_size, window=2, streams=1)
        if plan.steps_per_epoch < 1:
            raise SystemExit("too little data for one batch")
        if mode == "cached":
            store = RunStore.open(stores[v], train_set, seed=0, teachers=args.teachers, pixels="source")
            source = CachedSource(plan, store, **kw)
        else:
            cls = FreshSource if mode == "online-fresh" else OnlineSource
            source = cls(plan, teachers=teachers, amp=amp, **kw)
        objective, seconds = train_one(source, cfg=cfg, stats=stats, steps=args.steps, device=device)
        row = {"mode": mode, "views": v, "steps": args.steps, "batch_size": args.batch_size,
               "epochs": args.steps / plan.steps_per_epoch, "train_seconds": seconds,
               "images_per_second": args.steps * args.batch_size / seconds,
               "extract_seconds": extract_seconds[v] if mode == "cached" else None,
               **held_out_scores(objective, untrained, held_batch)}
        rows.append(row)
        echo(f"{mode:<13} V={v or '-'}: CKA {row['cka_fused']:.3f}, token loss {row['token_loss']:.4f}, "
             f"{row['images_per_second']:.1f} img/s")
    return {"rows": rows, "teacher_images_per_second": rates, "device": device,
            "machine": torch.cuda.get_device_name(device) if amp else f"CPU ({torch.get_num_threads()} threads)",
            "train_images": len(train_set), "heldout_images": len(held_set),
            "teachers": {"names": list(args.teachers), "checkpoints": args.checkpoints,
                         "depth": None if args.checkpoints else args.teacher_depth},
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}


def format_table(result: dict) -> str:
    lines = ["| mode | V | held-out CKA, fused targets (untrained) | held-out token loss | train images/s "
             "| store extraction s |", "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        ext = f"{r['extract_seconds']:.1f}" if r["extract_seconds"] is not None else "-"
        lines.append(f"| {r['mode']} | {r['views'] or '-'} | {r['cka_fused']:.3f} ({r['cka_fused_untrained']:.3f}) | "
                     f"{r['token_loss']:.4f} | {r['images_per_second']:.1f} | {ext} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="prepared training images (default: the demo photos)")
    ap.add_argument("--heldout", type=Path, help="prepared held-out images (with --data)")
    ap.add_argument("--checkpoints", type=Path, help="folder of the official teacher files (default: random init)")
    ap.add_argument("--teacher-depth", type=int, default=1, help="blocks of random-init teachers (12: ViT-B/16)")
    ap.add_argument("--teachers", nargs="+", default=list(TEACHERS), choices=list(V.TEACHER_IDS))
    ap.add_argument("--views", type=int, nargs="+", default=[2], help="V of the cached and replay rows (one "
                    "store each)")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    ap.add_argument("--copies", type=int, default=2, help="demo photos: training crops per photo")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--decoder", default="pil", choices=["dali", "pil"])
    ap.add_argument("--threads", type=int, default=2, help="decoder threads")
    ap.add_argument("--teacher-batch", type=int, default=16)
    ap.add_argument("--stats-images", type=int, default=16, help="images of the adapter statistics")
    ap.add_argument("--out", type=Path, help="keep the photos and stores here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, help="also write the result as JSON")
    args = ap.parse_args(argv)
    if (args.data is None) != (args.heldout is None):
        ap.error("--data and --heldout go together")
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args, args.out or Path(tmp))
    result["total_seconds"] = time.perf_counter() - t0
    result["load_average"] = {"start": load0, "end": os.getloadavg()[0], "cpus": os.cpu_count()}
    rates = ", ".join(f"{k} {v:.1f}" for k, v in result["teacher_images_per_second"].items())
    print(f"\nwhat the cache costs on {result['machine']}: {result['train_images']} training / "
          f"{result['heldout_images']} held-out images, {args.steps} steps of {args.batch_size}, teachers "
          f"{'official' if args.checkpoints else f'random-init, {args.teacher_depth} blocks'}; teacher images/s "
          f"(all teachers per image): {rates}; {result['total_seconds']:.0f} s in all; load average "
          f"{load0:.1f} at the start, {result['load_average']['end']:.1f} at the end on {os.cpu_count()} CPUs")
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
