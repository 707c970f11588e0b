"""Training throughput: cached store vs online teachers vs the in-memory ceiling, with the same
objective, batch and steps, in one run (rows: docs/performance.md, "Training"); the table is
``train.throughput.measure``'s, which the demo and bench/gpu_check.py call too.

    python bench/train.py                      # builds a small photo set + store in a temp dir
    python bench/train.py --data D --store S   # on your own prepared data and store
    python bench/train.py --device cuda        # GPU: DALI GPU decoder, bf16 autocast
    python bench/train.py --views 4            # the built-in store with 4 views (epochs read slot e mod 4)
    python bench/train.py --no-new-path        # the built-in data without the second (new data path) store"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from teachers.descriptors import PAPER_TEACHERS  # noqa: E402
from train.throughput import measure  # noqa: E402


def make_demo_store(root: Path, *, copies: int = 16, views: int = 1, progress: bool = True,
                    new_path: bool = False) -> tuple[Path, Path]:
    """A photo set at ImageNet-like size (long side 500) and a 3-teacher untrained store
    (fp16 tokens, ``root/store``); ``new_path`` also extracts ``root/store_views`` from the
    same teachers: the adapter-space codec with the views' pixels stored as JPEG."""
    from extract.config import ExtractConfig
    from extract.runner import run_extraction
    from teachers.vit import build_teacher
    from samples.photos import write_photo_tree
    from data.shards import prepare

    photos = write_photo_tree(root / "photos", max_side=500, copies=copies)
    data = prepare(photos, root / "data", shard_size=64, progress=progress)
    for name in PAPER_TEACHERS:
        teacher = build_teacher(name, random_init=True, seed=0)
        common = dict(views=views, seed=0, batch_size=16, decoder="dali", stats_images=64, device="cpu")
        run_extraction(ExtractConfig(store=root / "store", codec="fp16", view_pixels="none", **common),
                       teacher=teacher, data=data, progress=progress)
        if new_path:
            run_extraction(ExtractConfig(store=root / "store_views", codec="adapter", view_pixels="jpeg", **common),
                           teacher=teacher, data=data, progress=progress)
    return root / "data", root / "store"


def format_rows(rows: list[dict]) -> str:
    lines = ["| path | images/s (median round) | rounds | x online | / ceiling | student TFLOP/s |",
             "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        spread = ", ".join(f"{v:.1f}" for v in r["spread"])
        ratios = " | ".join("-" if r[k] is None else f"{r[k]:.2f}" for k in ("vs_online", "vs_ceiling"))
        lines.append(f"| {r['mode']} | {r['images_per_second']:.1f} | {spread} | {ratios} | {r['student_tflops']:.4f} |")
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
    ap.add_argument("--other-store", action="append", default=[], metavar="MODE=STORE",
                    help="one more cached row from another store of the same data (e.g. cached-views=S2: "
                         "the adapter codec with view pixels); repeatable")
    ap.add_argument("--no-new-path", dest="new_path", action="store_false",
                    help="built-in data: skip the second store (adapter codec + JPEG view pixels) and its "
                         "cached-views row")
    ap.add_argument("--modes", default="cached,online,ceiling",
                    help="the rows, of cached, online and ceiling (online needs a store of real teachers)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, store = args.data, args.store
        others = dict(o.split("=", 1) for o in args.other_store)
        if data is None or store is None:
            print("building a photo set and an untrained 3-teacher store" + (
                " (and the new data path's store)" if args.new_path else "") + " ...", flush=True)
            data, store = make_demo_store(Path(tmp), copies=args.copies, views=args.views or 1,
                                          new_path=args.new_path)
            if args.new_path:
                others.setdefault("cached-views", Path(tmp) / "store_views")
        try:
            rows = measure(data=data, store=store, batch_size=args.batch_size, steps=args.steps,
                           warmup=args.warmup, rounds=args.rounds, device=args.device, decoder=args.decoder,
                           threads=args.threads, views=args.views or "auto",
                           other_stores=others,
                           modes=tuple(args.modes.split(",")))
        except ValueError as error:               # too little data for the steps asked
            raise SystemExit(str(error)) from None
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\ntraining throughput on {name}, batch {args.batch_size}, {args.rounds} rounds of {args.steps} "
          f"timed steps, decoder {args.decoder}")
    print(format_rows(rows))


if __name__ == "__main__":
    main()
