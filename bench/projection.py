"""Projection of a full ImageNet-1K run from the format, the FLOP counts and stated rates.

    python bench/projection.py                       # the table in docs/running.md
    python bench/projection.py --gpus 8 --peak-tflops 700 --decode-per-gpu 2500 ...

Exact: store bytes per (image, view) (extract/estimate.py: bytes_per_sample), FLOPs of the
teachers' masked forward and of the student's step (train/flops.py: step_flops_per_image).
Assumed (arguments, each printed): the card's bf16 matmul rate, the fraction of it the
teacher and the student reach, JPEG decode rate per GPU, and the node's store bandwidth.
Replace them with what bench/extract.py, bench/train.py and `extract --estimate` measure
on your hardware.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract.estimate import bytes_per_sample  # noqa: E402
from store import views as V  # noqa: E402
from train.config import Config  # noqa: E402
from train.flops import step_flops_per_image  # noqa: E402

TEACHERS = ("mae", "mocov3", "ibot")


def teacher_flops(n_visible: int, d: int = 768, depth: int = 12) -> float:
    """Forward FLOPs of a ViT-B on CLS + n visible patches (matmuls, attention, patch embed)."""
    t = n_visible + 1
    return depth * (24 * t * d * d + 4 * t * t * d) + 2 * 196 * (3 * 16 * 16) * d


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1_281_167)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--peak-tflops", type=float, default=700.0, help="assumed bf16 matmul rate per GPU")
    ap.add_argument("--teacher-mfu", type=float, default=0.5, help="assumed fraction of the peak, teachers")
    ap.add_argument("--student-mfu", type=float, default=0.15, help="assumed fraction of the peak, student")
    ap.add_argument("--decode-per-gpu", type=float, default=2500.0, help="assumed JPEG crops decoded per s per GPU")
    ap.add_argument("--write-gbs", type=float, default=2.0, help="assumed store write bandwidth, GB/s")
    ap.add_argument("--read-gbs", type=float, default=10.0, help="assumed store read bandwidth, GB/s")
    a = ap.parse_args()

    n_vis = [V.num_visible(V.MASK_RATIOS[t]) for t in TEACHERS]
    tf = sum(teacher_flops(n) for n in n_vis)
    sf = step_flops_per_image(Config(), n_visible=V.STUDENT_VISIBLE,
                              teacher_tokens={t: 1 + n for t, n in zip(TEACHERS, n_vis)})["total"]
    peak = a.gpus * a.peak_tflops * 1e12
    decode = a.gpus * a.decode_per_gpu
    samples_x = a.images * a.views
    samples_t = a.images * a.epochs
    print(f"assumed: {a.gpus} GPUs at {a.peak_tflops:.0f} TFLOP/s bf16, teacher {a.teacher_mfu:.0%} / student "
          f"{a.student_mfu:.0%} of it, {a.decode_per_gpu:.0f} decodes/s per GPU, store write {a.write_gbs} GB/s, "
          f"read {a.read_gbs} GB/s")
    print(f"exact: teachers {tf / 1e9:.1f} GFLOP per (image, view); student step {sf / 1e9:.2f} GFLOP per image; "
          f"online/cached compute {(tf + sf) / sf:.1f}x\n")
    print("| codec | store V=1 | store V=" + str(a.views) + " | per epoch read |")
    print("|---|---:|---:|---:|")
    sizes = {}
    for codec in ("fp16", "int8", "pca"):
        b = sum(bytes_per_sample(codec, n) for n in n_vis)
        sizes[codec] = b
        print(f"| {codec} | {b * a.images / 1e12:.2f} TB | {b * samples_x / 1e12:.2f} TB | "
              f"{b * a.images / 1e12:.2f} TB |")
    h = 3600.0
    print(f"\n| stage ({a.gpus} GPUs) | compute | decoding | disk | bound |")
    print("|---|---:|---:|---:|---:|")
    for codec in ("fp16", "pca"):
        comp = tf * samples_x / (peak * a.teacher_mfu) / h
        dec = len(TEACHERS) * samples_x / decode / h
        disk = sizes[codec] * samples_x / (a.write_gbs * 1e9) / h
        print(f"| extraction V={a.views}, {codec} | {comp:.2f} h | {dec:.2f} h | {disk:.2f} h write | "
              f"{max(comp, dec, disk):.2f} h |")
    for codec in ("fp16", "pca"):
        comp = sf * samples_t / (peak * a.student_mfu) / h
        dec = samples_t / decode / h
        disk = sizes[codec] * samples_t / (a.read_gbs * 1e9) / h
        print(f"| {a.epochs} epochs cached, {codec} | {comp:.2f} h | {dec:.2f} h | {disk:.2f} h read | "
              f"{max(comp, dec, disk):.2f} h |")
    comp = (tf / (peak * a.teacher_mfu) + sf / (peak * a.student_mfu)) * samples_t / h
    dec = samples_t / decode / h
    print(f"| {a.epochs} epochs online | {comp:.2f} h | {dec:.2f} h | none | {max(comp, dec):.2f} h |")


if __name__ == "__main__":
    main()
