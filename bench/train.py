"""Training throughput: cached store vs online teachers vs the in-memory ceiling, in one run.

    python bench/train.py                      # builds a small photo set + store in a temp dir
    python bench/train.py --data D --store S   # on your own prepared data and store
    python bench/train.py --device cuda        # GPU: DALI GPU decoder, bf16 autocast
    python bench/train.py --views 4            # the built-in store with 4 views (epochs read slot e mod 4)

All three rows use the same objective, batch size, steps and machine:

- cached:  CachedSource (store blocks + DALI decoding in a prefetch thread) + the step;
- online:  OnlineSource (the same decoding) + the three teachers' forward + the step;
- ceiling: the step alone on batches already materialised in memory (images and targets
  on the device): what the student costs when data is free.

Prints a table; ``measure(...)`` returns its rows for the demo report.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.config import load_config  # noqa: E402
from train.flops import step_flops_per_image  # noqa: E402
from train.loader import Plan, resolve_data  # noqa: E402
from train.loop import build_source, make_optimizer, train_step  # noqa: E402
from train.objective import build_objective  # noqa: E402


def make_demo_store(root: Path, *, copies: int = 16, views: int = 1, progress: bool = True) -> tuple[Path, Path]:
    """A photo set at ImageNet-like size (long side 500) and a 3-teacher untrained store."""
    from extract.runner import run_extraction
    from extract.teachers import build_teacher
    from store.photos import write_photo_tree
    from store.shards import prepare

    photos = write_photo_tree(root / "photos", max_side=500, copies=copies)
    data = prepare(photos, root / "data", shard_size=64, progress=progress)
    for name in ("mae", "mocov3", "ibot"):
        run_extraction(teacher=build_teacher(name, random_init=True, seed=0), data=data,
                       store_path=root / "store", views=views, seed=0, batch_size=16, decoder="dali",
                       progress=progress, stats_images=64)
    return root / "data", root / "store"


def _time_steps(objective, opt, batches, *, amp: bool, device, clip_grad: float) -> float:
    """Seconds for the steps over ``batches`` (an iterator of materialised batches)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t = time.perf_counter()
    for b in batches:
        train_step(objective, opt, b, lr=1e-4, clip_grad=clip_grad, amp=amp)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t


def measure(*, data, store, batch_size: int = 16, steps: int = 8, warmup: int = 2, rounds: int = 3,
            device: str = "cpu", decoder: str = "dali", threads: int = 2, views: int | str = "auto",
            streams: int = 1, modes=("cached", "online", "ceiling"), teachers: dict | None = None) -> list[dict]:
    """Rows {mode, images_per_second, seconds, steps, batch_size, ...} measured in this process.
    ``teachers``: {name: Teacher} already built, for the online row (``build_source``).

    The modes are timed in turn, ``rounds`` times (A B C A B C ...), each round over ``steps``
    steps after ``warmup`` untimed ones, and each row keeps its median round: on a noisy
    machine this compares the paths under the same conditions. ``views``: the store's V
    (``auto``) or a number that must equal it. The ceiling's batches are the first
    ``warmup + steps`` of epoch 0, materialised once."""
    from store.shards import ImageSet
    images = ImageSet.open(data)
    cfg = load_config(None, [f"data.images={data}", f"data.store={store}", f"data.views={views}",
                             f"data.decoder={decoder}", f"data.num_workers={threads}", f"data.streams={streams}",
                             "data.shuffle_window=2", f"train.batch_size={batch_size}"])
    cfg = resolve_data(cfg, images)
    plan = Plan(images, seed=0, views=cfg.data.views, batch_size=batch_size, window=2, streams=streams)
    need = warmup + steps
    if plan.steps_per_epoch < need:
        raise SystemExit(f"the data gives {plan.steps_per_epoch} steps of {batch_size} per epoch; "
                         f"need {need}: use more data or a smaller batch")
    amp, clip = torch.device(device).type == "cuda", cfg.train.clip_grad
    setups = {}
    for mode in modes:
        source, stats = build_source(cfg, plan, online=(mode == "online"), device=device, teachers=teachers)
        objective = build_objective(cfg, stats).to(device)
        batches = None
        if mode == "ceiling":
            epoch = source.epoch(0)
            batches = [source.materialize(b, device) for _, b in itertools.islice(epoch, need)]
            epoch.close()
        setups[mode] = (source, objective, make_optimizer(cfg, objective), batches)
    times = {mode: [] for mode in modes}
    for r in range(rounds):
        for mode, (source, objective, opt, batches) in setups.items():
            if batches is not None:
                _time_steps(objective, opt, batches[:warmup], amp=amp, device=device, clip_grad=clip)
                times[mode].append(_time_steps(objective, opt, batches[warmup:], amp=amp, device=device, clip_grad=clip))
                continue
            it = iter(source.epoch(r))
            warm = (source.materialize(next(it)[1], device) for _ in range(warmup))
            _time_steps(objective, opt, warm, amp=amp, device=device, clip_grad=clip)
            timed = (source.materialize(next(it)[1], device) for _ in range(steps))
            times[mode].append(_time_steps(objective, opt, timed, amp=amp, device=device, clip_grad=clip))
            it.close()
    rows = []
    for mode in modes:
        sec = sorted(times[mode])[len(times[mode]) // 2]
        rows.append(dict(mode=mode, images_per_second=steps * batch_size / sec, seconds=sec, steps=steps,
                         rounds=rounds, batch_size=batch_size, device=str(device), decoder=decoder,
                         spread=[steps * batch_size / t for t in times[mode]]))
    ceiling = next((r["images_per_second"] for r in rows if r["mode"] == "ceiling"), None)
    online = next((r["images_per_second"] for r in rows if r["mode"] == "online"), None)
    from store import views as V
    flops = step_flops_per_image(cfg, n_visible=cfg.data.student_visible, teacher_tokens={
        n: 1 + V.num_visible(V.MASK_RATIOS[n]) for n in cfg.data.teachers})["total"]
    for r in rows:
        r["vs_online"] = r["images_per_second"] / online if online else None
        r["vs_ceiling"] = r["images_per_second"] / ceiling if ceiling else None
        r["student_tflops"] = r["images_per_second"] * flops / 1e12
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = ["| path | images/s (median round) | rounds | x online | / ceiling | student TFLOP/s |",
             "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        spread = ", ".join(f"{v:.1f}" for v in r["spread"])
        lines.append(f"| {r['mode']} | {r['images_per_second']:.1f} | {spread} | {r['vs_online']:.2f} | "
                     f"{r['vs_ceiling']:.2f} | {r['student_tflops']:.4f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--store", type=Path)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="the modes are timed in turn this many times")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--decoder", default="dali", choices=["dali", "pil"])
    ap.add_argument("--threads", type=int, default=2, help="decoder threads")
    ap.add_argument("--copies", type=int, default=16, help="photo copies for the built-in data (13 per copy)")
    ap.add_argument("--views", type=int, default=None,
                    help="views per image: extracted into the built-in store (default 1); with --store, "
                         "must equal the store's (default: the store's)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, store = args.data, args.store
        if data is None or store is None:
            print("building a photo set and an untrained 3-teacher store ...", flush=True)
            data, store = make_demo_store(Path(tmp), copies=args.copies, views=args.views or 1)
        rows = measure(data=data, store=store, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                       rounds=args.rounds, device=args.device, decoder=args.decoder, threads=args.threads,
                       views=args.views or "auto")
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\ntraining throughput on {name}, batch {args.batch_size}, {args.rounds} rounds of {args.steps} "
          f"timed steps, decoder {args.decoder}")
    print(format_rows(rows))


if __name__ == "__main__":
    main()
