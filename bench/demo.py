"""The first command's time, normalised to a reference machine: ``python cli.py demo`` from scratch
with its defaults, its stage table (wall and process CPU seconds), and this machine's ViT-B
forward rate (random-init mae, batch 8, fp32; masked and full) before, inside and after it. The
normalised total, ``total x masked rate / 3``, is the time on a machine whose masked ViT-B forward
runs at 3 images/s (docs/performance.md, "The first command").

    python bench/demo.py                 # a fresh demo in a temporary folder
    python bench/demo.py --out DIR       # ... in DIR (must not exist yet; kept afterwards)"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REFERENCE_RATE = 3.0      # images/s of one ViT-B forward on the reference machine of the demo's target


def _rates(device: str) -> tuple[float, float]:
    """(masked, full) images/s of a fresh random-init teacher, the paper's first (mae, a ViT-B/16)."""
    from teachers.vit import build_teacher
    from teachers.descriptors import PAPER_TEACHERS
    from train.throughput import teacher_rate
    teacher = build_teacher(PAPER_TEACHERS[0], random_init=True, seed=0, device=device)
    return teacher_rate(teacher, device=device), teacher_rate(teacher, device=device, full=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    from demo.pipeline import run_demo

    if args.out is not None and args.out.exists():
        raise SystemExit(f"{args.out} exists: bench/demo.py times a demo from scratch")
    load = os.getloadavg()
    before = _rates(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "demo"
        t0 = time.perf_counter()
        result = run_demo(out=out, device=args.device, progress=False)
        total = time.perf_counter() - t0
    after = _rates(args.device)
    inside = result.get("teacher_rate")
    masked = [r for r in (before[0], inside, after[0]) if r]
    rate = sum(masked) / len(masked)
    full = (before[1] + after[1]) / 2
    load_after = os.getloadavg()

    print("\n| stage | seconds | CPU seconds |")
    print("|---|---:|---:|")
    for s in result["stages"]:
        print(f"| {s['stage']} | {s['seconds']:.1f} | {s.get('cpu_seconds', float('nan')):.1f} |")
    print(f"| total (run_demo) | {total:.1f} | {sum(s.get('cpu_seconds', 0.0) for s in result['stages']):.1f} |")
    print(f"\nViT-B forward images/s (mae, batch 8, fp32): masked before {before[0]:.2f}, in the demo "
          f"{'-' if inside is None else f'{inside:.2f}'}, after {after[0]:.2f} (mean {rate:.2f}); "
          f"full before {before[1]:.2f}, after {after[1]:.2f} (mean {full:.2f})")
    print(f"load average (1, 5, 15 min): before {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, "
          f"after {load_after[0]:.1f} {load_after[1]:.1f} {load_after[2]:.1f} on {os.cpu_count()} CPUs")
    for label, r in (("masked", rate), ("full", full)):
        print(f"total {total:.1f} s = {total / 60:.2f} min; normalised to {REFERENCE_RATE:g} img/s ({label}): "
              f"{total * r / REFERENCE_RATE:.1f} s = {total * r / REFERENCE_RATE / 60:.2f} min")


if __name__ == "__main__":
    main()
