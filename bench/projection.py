"""Projection of a full ImageNet-1K run on one node from the format, the FLOP counts and stated
rates (each an argument, printed); ``--datapath`` adds which resource bounds each data path,
from the rows ``bench/datapath.py --json`` measured, and a sweep of K learners on the default
path (docs/running.md, section 6).

    python bench/projection.py                       # the format and FLOP tables
    python bench/projection.py --datapath docs/datapath_cpu.json   # + which resource bounds each path
    python bench/projection.py --gpus 8 --peak-tflops 700 --decode-per-gpu 2500 ...
    python bench/projection.py --datapath docs/datapath_cpu.json --sweep 1 2 4 8   # sweep rows' K"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import json  # noqa: E402

from extract.estimate import bytes_per_sample  # noqa: E402
from data import views as V  # noqa: E402
from teachers.descriptors import PAPER_TEACHERS, VIT_B_WIDTH  # noqa: E402
from train.config import Config  # noqa: E402
from train.flops import step_flops_per_image  # noqa: E402

TEACHERS = PAPER_TEACHERS


def teacher_flops(n_visible: int, d: int = VIT_B_WIDTH, depth: int = 12) -> float:
    """Forward FLOPs of a ViT-B on CLS + n visible patches (matmuls, attention, patch embed)."""
    t = n_visible + 1
    return depth * (24 * t * d * d + 4 * t * t * d) + 2 * V.NUM_PATCHES * (3 * 16 * 16) * d


def datapath_rows(measured: list[dict], *, samples: float, gpus: int, student_s: float, teacher_s: float,
                  decode_per_gpu: float, cpu_cores: int, read_gbs: float, host_memory_gb: float,
                  images: int, views: int) -> list[dict]:
    """Hours each resource needs for ``samples`` sample-epochs, per path, and the bound.

    student_s / teacher_s: node seconds of compute per sample (all GPUs together).
    decode: nvJPEG on the GPUs; ``decode_per_gpu`` crops/s at the pixels ``today`` decodes
    per sample, and time proportional to the pixels decoded (the stated assumption; a raw
    path decodes nothing). host CPU: the measured CPU seconds per sample of reading and
    batching (decoding is on the GPU) over ``cpu_cores`` cores. store read: the measured
    bytes per sample-epoch at ``read_gbs``; ``in memory`` rows hold the whole store (every
    view slot, features + pixels) in host memory when it fits in ``host_memory_gb``, so
    that only the first epoch reads the store. Online: the teachers' compute, today's
    decoding and the original JPEG bytes only."""
    by = {r["name"]: r for r in measured}
    today = by["today"]
    px_rate = decode_per_gpu * today["pixels_per_sample"] * gpus          # pixels/s of the node's nvJPEG
    h = 3600.0
    out = []

    def row(name, r, *, compute, online=False, memory=False):
        decode = samples * r["pixels_per_sample"] / px_rate / h
        host = None if online else samples * (r["cpu_s_per_sample"]["read"] + r["cpu_s_per_sample"]["batch"]) \
            / cpu_cores / h
        nbytes = r["photos"]["mean_bytes"] if online else r["bytes_per_sample"]
        total = nbytes * images * views                                        # the whole store (V slots)
        fits = memory and total <= host_memory_gb * 1e9
        epochs_read = images * views if fits else samples                     # first pass only, if it fits
        read = nbytes * epochs_read / (read_gbs * 1e9) / h
        times = {"compute": compute / h, "decode": decode, "host CPU": host or 0.0, "store read": read}
        bound = max(times, key=times.get)
        out.append(dict(name=name, **{k: v for k, v in times.items()}, host_measured=host is not None,
                        bound=bound, hours=times[bound], held_gb=total / 1e9 if memory else None, fits=fits))

    for r in measured:
        row(f"cached, {r['name']} ({r['codec']})", r, compute=samples * student_s)
    for r in measured:
        row(f"cached, {r['name']} ({r['codec']}), store in host memory", r, compute=samples * student_s, memory=True)
    row("online (baseline)", today, compute=samples * (student_s + teacher_s), online=True)
    base = out[-1]["hours"]
    for o in out:
        o["x_online"] = base / o["hours"]
    return out


def format_datapath(rows: list[dict]) -> str:
    lines = ["| run (300 epochs) | student / teachers | decode (nvJPEG) | host CPU | store read | bound | x online |",
             "|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        read = f"{r['store read']:.2f} h"
        if r["held_gb"] is not None:
            read += f" ({r['held_gb']:.0f} GB {'held' if r['fits'] else 'does not fit'})"
        host = f"{r['host CPU']:.2f} h" if r["host_measured"] else "-"
        lines.append(f"| {r['name']} | {r['compute']:.2f} h | {r['decode']:.2f} h | {host} | {read} | "
                     f"{r['bound']} {r['hours']:.2f} h | {r['x_online']:.1f}x |")
    return "\n".join(lines)


SWEEP_ROW = "cached, view_jpeg (adapter)"      # the default path (extract --codec adapter --view-pixels jpeg)


def sweep_rows(row: dict, ks=(1, 2, 4, 8)) -> list[dict]:
    """A sweep of K learners on the data pass of ``row`` (one of ``datapath_rows``), in hours:
    every resource overlaps as there (the run takes its largest), the data pass's (decode, host
    CPU, store read) once, the student's compute K times (each learner's whole step: the
    adapters they share counted K times, an upper bound). ``free``: K learners cost no more
    than one run (K x compute <= the data pass); ``x_separate``: the sweep's hours over K
    separate runs of ``row``'s."""
    data = max(row["decode"], row["host CPU"], row["store read"])
    out = []
    for k in ks:
        times = {"compute": k * row["compute"], "decode": row["decode"], "host CPU": row["host CPU"],
                 "store read": row["store read"]}
        bound = max(times, key=times.get)
        hours = times[bound]
        out.append(dict(k=k, compute=times["compute"], data=data, bound=bound, hours=hours,
                        separate=k * row["hours"], x_separate=hours / (k * row["hours"]),
                        free=times["compute"] <= data))
    return out


def free_learners(row: dict) -> int:
    """The most learners whose compute the data pass of ``row`` covers (at least 1)."""
    data = max(row["decode"], row["host CPU"], row["store read"])
    return max(1, int(data // row["compute"])) if row["compute"] > 0 else 1


def format_sweep(rows: list[dict]) -> str:
    lines = ["| learners K (300 epochs) | students' compute | data pass | bound | sweep | K separate runs "
             "| sweep / separate |", "|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['k']} | {r['compute']:.2f} h | {r['data']:.2f} h | {r['bound']} {r['hours']:.2f} h | "
                     f"{r['hours']:.2f} h | {r['separate']:.2f} h | {r['x_separate']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
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
    ap.add_argument("--datapath", type=Path, help="rows of bench/datapath.py --json (measured data path)")
    ap.add_argument("--cpu-cores", type=int, default=96, help="assumed host cores reading and batching")
    ap.add_argument("--host-memory-gb", type=float, default=1536.0, help="assumed host memory for the store")
    ap.add_argument("--sweep", type=int, nargs="+", default=[1, 2, 4, 8], metavar="K",
                    help="with --datapath: the learners of the projected sweep rows")
    a = ap.parse_args(argv)

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
    if a.datapath is None:
        return None
    measured = json.loads(a.datapath.read_text())
    rows = datapath_rows(measured, samples=samples_t, gpus=a.gpus, student_s=sf / (peak * a.student_mfu),
                         teacher_s=tf / (peak * a.teacher_mfu), decode_per_gpu=a.decode_per_gpu,
                         cpu_cores=a.cpu_cores, read_gbs=a.read_gbs, host_memory_gb=a.host_memory_gb,
                         images=a.images, views=a.views)
    m = {r["name"]: r for r in measured}
    load = " / ".join(f"{x:.2f}" for x in measured[0]["loadavg"])
    print(f"\nmeasured ({a.datapath}; {measured[0]['cpus']} CPUs, load average {load}): "
          + "; ".join(f"{n} {r['bytes_per_sample'] / 1e3:.1f} KB/sample-epoch, {r['pixels_per_sample']:.0f} px "
                      f"decoded, host read+batch {(r['cpu_s_per_sample']['read'] + r['cpu_s_per_sample']['batch']) * 1e3:.2f}"
                      " ms/sample" for n, r in m.items()))
    print(f"assumed: nvJPEG time proportional to the pixels decoded ({a.decode_per_gpu:.0f}/s per GPU at "
          f"today's {m['today']['pixels_per_sample']:.0f} px), {a.cpu_cores} host cores at the measured per-core "
          f"cost, {a.host_memory_gb:.0f} GB host memory, V={a.views}\n")
    print(format_datapath(rows))
    base = next((r for r in rows if r["name"] == SWEEP_ROW), None)
    if base is not None:
        data = max(base["decode"], base["host CPU"], base["store read"])
        print(f"\nprojected sweep of K learners on one data pass ({SWEEP_ROW}; train --variant): the data pass "
              f"{data:.2f} h ({max(('decode', 'host CPU', 'store read'), key=base.get)}) once, each learner's "
              f"student compute {base['compute']:.2f} h; the data pass carries K <= {free_learners(base)} learners "
              "for free\n")
        print(format_sweep(sweep_rows(base, a.sweep)))
    return rows


if __name__ == "__main__":
    main()
