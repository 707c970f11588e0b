"""Benchmark: images per second of the view decoders (PIL reference, serial, in processes and on its
thread pool; DALI; torchvision's decode_jpeg; stored views), same photos.

    python bench/decode.py                         # CPU: PIL and DALI on all cores
    python bench/decode.py --device cuda           # adds DALI and torchvision with the GPU decoder
    python bench/decode.py --views 2048 --threads 8 --batch-size 128
    python bench/decode.py --views 128 --batch-size 32 --threads 2 --repeats 2 --agreement-views 0
    python bench/decode.py --rows pil,pil-pool --repeats 5 --agreement-views 0   # the thread pool's gain

The rows are timed in alternating rounds (every row once per round, the best round kept), so that a
machine whose load drifts slows every row alike; ratios of rows of one run are the figures to
compare. Then how closely DALI agrees with PIL per photo kind. Photos and rows: docs/performance.md,
"Decoding"."""
from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: top-level packages

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
          "retina", "stereo_motorcycle")


def make_photos(*, long_side: int = 500, quality: int = 90) -> list[bytes]:
    """The benchmark photos as JPEG bytes, long side ``long_side`` pixels."""
    import skimage.data
    from PIL import Image

    out = []
    for name in PHOTOS:
        array = getattr(skimage.data, name)()
        array = array[0] if isinstance(array, tuple) else array
        image = Image.fromarray(array).convert("RGB")
        w, h = image.size
        scale = long_side / max(w, h)
        image = image.resize((round(w * scale), round(h * scale)), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out


def kind_photos() -> dict[str, bytes]:
    """One photo per decoding case, for the agreement table."""
    import skimage.data
    from PIL import Image

    def enc(image, fmt, **kw):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **kw)
        return buffer.getvalue()

    coffee = Image.fromarray(skimage.data.coffee()).resize((500, 333), Image.Resampling.LANCZOS)
    camera = skimage.data.camera()
    return {
        "jpeg rgb": enc(coffee, "JPEG", quality=90),
        "jpeg grey": enc(Image.fromarray(camera).resize((500, 500)), "JPEG", quality=90),
        "jpeg cmyk": enc(coffee.convert("CMYK"), "JPEG", quality=90),
        "png rgb": enc(coffee, "PNG"),
        "png grey": enc(Image.fromarray(camera), "PNG"),
        "png palette": enc(coffee.convert("P"), "PNG"),
        "png rgba": enc(Image.fromarray(skimage.data.logo()), "PNG"),
        "png grey+alpha": enc(Image.fromarray(skimage.data.logo()).convert("LA"), "PNG"),
        "png 16-bit grey": enc(Image.fromarray(camera.astype(np.uint16) * 257), "PNG"),
    }


def views_of(datas: list[bytes], count: int, seed: int = 0):
    """``count`` views cycling over ``datas``: (list of bytes, boxes (count, 4), flips (count,))."""
    from PIL import Image

    from data.views import view_params

    dims = np.array([Image.open(io.BytesIO(d)).size for d in datas])
    photo = np.arange(count) % len(datas)
    boxes, flips = view_params(seed, np.arange(count), 0, dims[photo, 0], dims[photo, 1])
    return [datas[p] for p in photo], boxes, flips


def _one_thread():
    import torch

    torch.set_num_threads(1)  # one core per worker, as in a DataLoader worker


def _pil_chunk(args):
    from data.decode import pil_views

    datas, boxes, flips = args
    return pil_views(datas, boxes, flips).shape[0]


def time_pil(datas, boxes, flips, *, procs: int, batch_size: int) -> float:
    """Seconds for PIL to decode all views, in ``procs`` processes (1: this process)."""
    from data.decode import pil_views

    chunks = [(datas[s:s + batch_size], boxes[s:s + batch_size], flips[s:s + batch_size])
              for s in range(0, len(datas), batch_size)]
    if procs == 1:
        start = time.perf_counter()
        for chunk in chunks:
            pil_views(*chunk)
        return time.perf_counter() - start
    # spawn, not fork: a forked child inherits torch's OpenMP pool in a locked state and hangs.
    with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_one_thread) as pool:
        list(pool.map(_pil_chunk, chunks[:procs]))  # warm the workers
        start = time.perf_counter()
        done = sum(pool.map(_pil_chunk, chunks))
        elapsed = time.perf_counter() - start
    assert done == len(datas)
    return elapsed


def time_pil_pool(datas, boxes, flips, *, threads: int, batch_size: int) -> float:
    """Seconds for PIL to decode all views in this process over its pool of ``threads`` threads
    (``pil_views(num_threads=threads)``, as ``make_decoder("pil")`` runs it), after a warm-up batch."""
    from data.decode import pil_views

    pil_views(datas[:batch_size], boxes[:batch_size], flips[:batch_size], num_threads=threads)
    start = time.perf_counter()
    for s in range(0, len(datas), batch_size):
        pil_views(datas[s:s + batch_size], boxes[s:s + batch_size], flips[s:s + batch_size], num_threads=threads)
    return time.perf_counter() - start


def time_torchvision(datas, boxes, flips, *, device: str, threads: int, batch_size: int) -> float:
    """Seconds for torchvision's batched decode_jpeg with the crop, resize and normalisation on
    ``device`` (data/decode/tvjpeg.py) to decode all views, after a warm-up batch."""
    import torch

    from data.decode import TorchvisionViewDecoder

    decoder = TorchvisionViewDecoder(device=device, num_threads=threads)
    decoder(datas[:batch_size], boxes[:batch_size], flips[:batch_size])
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for s in range(0, len(datas), batch_size):
        decoder(datas[s:s + batch_size], boxes[s:s + batch_size], flips[s:s + batch_size])
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_dali(datas, boxes, flips, *, device: str, threads: int, batch_size: int) -> float:
    """Seconds for DALI to decode all views, 2 batches in flight (after one warm-up batch)."""
    import torch

    from data.decode import DaliViewDecoder

    decoder = DaliViewDecoder(batch_size=batch_size, device=device, num_threads=threads, prefetch=2)
    batches = [(datas[s:s + batch_size], boxes[s:s + batch_size], flips[s:s + batch_size])
               for s in range(0, len(datas), batch_size)]
    decoder(*batches[0])
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    done = sum(out.shape[0] for out in decoder.map(batches))
    if device == "cuda":
        torch.cuda.synchronize()
    assert done == len(datas)
    return time.perf_counter() - start


def time_stored(stored: list[bytes], *, form: str, kind: str, device: str, threads: int,
                batch_size: int) -> float:
    """Seconds to decode stored views (bytes of ``form``) with ``kind`` on ``device``."""
    import torch

    from data.decode.stored import make_view_decoder

    decode = make_view_decoder(form, kind, batch_size=batch_size, device=device, num_threads=threads)
    batches = [stored[s:s + batch_size] for s in range(0, len(stored), batch_size)]
    decode(batches[0])
    start = time.perf_counter()
    done = sum(decode(b).shape[0] for b in batches)
    if device == "cuda":
        torch.cuda.synchronize()
    assert done == len(stored)
    return time.perf_counter() - start


def stored_views(datas, boxes, flips, *, form: str) -> list[bytes]:
    """The views as extraction stores them (``extract --view-pixels form``)."""
    from data.decode import pil_views
    from store.viewpixels import encode_view, uint8_views

    return [encode_view(form, v) for v in uint8_views(pil_views(datas, boxes, flips))]


def time_round_trip(datas, boxes, flips, *, batch_size: int) -> float:
    """Seconds of the JPEG view round trip (``store.viewpixels.jpeg_round_trip``, as
    ``Extractor.view_batch`` runs it with ``teacher_input=jpeg``) on views decoded beforehand."""
    from data.decode import pil_views
    from store.viewpixels import jpeg_round_trip

    decoded = [pil_views(datas[s:s + batch_size], boxes[s:s + batch_size], flips[s:s + batch_size])
               for s in range(0, len(datas), batch_size)]
    start = time.perf_counter()
    done = sum(jpeg_round_trip(images)[1].shape[0] for images in decoded)
    seconds = time.perf_counter() - start
    assert done == len(datas)
    return seconds


def agreement(*, views_per_kind: int, batch_size: int, device: str = "cpu") -> list[tuple]:
    """(kind, then for DALI (cpu) and torchvision (on ``device``): mean |decoder - PIL| and the
    max over views of the per-view mean), on the 0..255 scale."""
    from data.decode import DaliViewDecoder, TorchvisionViewDecoder, pil_views

    decoders = (DaliViewDecoder(batch_size=batch_size, device="cpu", num_threads=2, normalize=False),
                TorchvisionViewDecoder(device=device, normalize=False))
    rows = []
    for kind, data in kind_photos().items():
        datas, boxes, flips = views_of([data], views_per_kind, seed=1)
        row = [kind]
        for decoder in decoders:
            per_view = []
            for s in range(0, len(datas), batch_size):
                part = slice(s, s + batch_size)
                got = decoder(datas[part], boxes[part], flips[part]).cpu()
                want = pil_views(datas[part], boxes[part], flips[part], normalize=False)
                per_view.append((got - want).abs().flatten(1).mean(1))
            per_view = np.concatenate([p.numpy() for p in per_view])
            row += [float(per_view.mean()), float(per_view.max())]
        rows.append(tuple(row))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="also time DALI and torchvision on the GPU with cuda")
    parser.add_argument("--views", type=int, default=512, help="views decoded per row")
    parser.add_argument("--batch-size", type=int, default=64, help="views per batch")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="cores for the multi-core rows")
    parser.add_argument("--repeats", type=int, default=3, help="rounds: each row is timed once a round, the best kept")
    parser.add_argument("--rows", default="", help="comma-separated row names to time (default: all of them)")
    parser.add_argument("--agreement-views", type=int, default=64, help="views per photo kind in the agreement table (0: skip)")
    args = parser.parse_args(argv)
    from core.progress import progress_bar

    photos = make_photos()
    datas, boxes, flips = views_of(photos, args.views)
    kb = np.mean([len(p) for p in photos]) / 1e3
    print(f"{len(photos)} JPEG photos, long side 500, mean {kb:.0f} kB; {args.views} views of 224x224; "
          f"batch {args.batch_size}; {os.cpu_count()} cores visible")
    plan = [("pil", 1), ("dali-cpu", 1)]
    if args.threads > 1:
        plan += [("pil", args.threads), ("pil-pool", args.threads), ("dali-cpu", args.threads)]
    if args.device == "cuda":
        plan += [("dali-cuda", args.threads), ("torchvision-cuda", args.threads)]
    plan += [("stored-pil", 1), ("stored-dali-cpu", 1), ("stored-raw", 1), ("view-round-trip", 1)]
    if args.threads > 1:
        plan.append(("stored-dali-cpu", args.threads))
    if args.device == "cuda":
        plan.append(("stored-dali-cuda", args.threads))
    if args.rows:
        wanted = set(args.rows.split(","))
        unknown = wanted - {name for name, _ in plan}
        if unknown:
            parser.error(f"--rows: no row {sorted(unknown)} in this run; its rows: {sorted({n for n, _ in plan})}")
        plan = [(name, workers) for name, workers in plan if name in wanted]
    stored = {}
    if any(name.startswith("stored-") for name, _ in plan):
        stored = {form: stored_views(datas, boxes, flips, form=form) for form in ("jpeg", "raw")}

    def once(name: str, workers: int) -> float:
        if name.startswith("stored-"):
            kind = name.split("-")[1]
            form, device = ("raw", "cpu") if kind == "raw" else ("jpeg", name.split("-")[-1])
            return time_stored(stored[form], form=form, kind="pil" if kind in ("pil", "raw") else "dali",
                               device="cpu" if device == "pil" else device, threads=workers,
                               batch_size=args.batch_size)
        if name == "view-round-trip":
            return time_round_trip(datas, boxes, flips, batch_size=args.batch_size)
        if name == "pil":
            return time_pil(datas, boxes, flips, procs=workers, batch_size=args.batch_size)
        if name == "pil-pool":
            return time_pil_pool(datas, boxes, flips, threads=workers, batch_size=args.batch_size)
        if name == "torchvision-cuda":
            return time_torchvision(datas, boxes, flips, device="cuda", threads=workers, batch_size=args.batch_size)
        return time_dali(datas, boxes, flips, device=name.split("-")[1], threads=workers,
                         batch_size=args.batch_size)

    best = {row: float("inf") for row in plan}
    for _ in progress_bar(range(args.repeats), desc="rounds", unit="round"):
        for row in plan:
            best[row] = min(best[row], once(*row))
    rows = [(name, workers, best[name, workers]) for name, workers in plan]
    if stored:
        print(f"stored views: JPEG q95 mean {np.mean([len(b) for b in stored['jpeg']]) / 1e3:.1f} kB, "
              f"raw {224 * 224 * 3 / 1e3:.1f} kB")
    print(f"\n| {'decoder':<16} | {'threads/procs':>13} | {'images/s':>9} | {'ms/image/core':>13} |")
    print(f"|{'-' * 18}|{'-' * 15}:|{'-' * 10}:|{'-' * 14}:|")  # not a teacher fact
    for name, workers, seconds in rows:
        rate = args.views / seconds
        print(f"| {name:<16} | {workers:>13} | {rate:>9.0f} | {1e3 * workers / rate:>13.2f} |")
    if ("pil", 1) in best and ("pil-pool", args.threads) in best:
        print(f"PIL pool ({args.threads} threads) / PIL serial: "
              f"{best['pil', 1] / best['pil-pool', args.threads]:.2f}x the images/s, best of {args.repeats} "
              "alternating rounds")

    if args.agreement_views:
        print(f"\nDALI (cpu) and torchvision ({args.device}) vs PIL, {args.agreement_views} views per kind, "
              "|difference| on 0..255:")
        print(f"| {'kind':<16} | {'DALI mean':>9} | {'worst view':>10} | {'tv mean':>7} | {'worst view':>10} |")
        print(f"|{'-' * 18}|{'-' * 10}:|{'-' * 11}:|{'-' * 8}:|{'-' * 11}:|")
        for kind, mean, worst, tv_mean, tv_worst in agreement(views_per_kind=args.agreement_views,
                                                              batch_size=args.batch_size, device=args.device):
            print(f"| {kind:<16} | {mean:>9.3f} | {worst:>10.3f} | {tv_mean:>7.3f} | {tv_worst:>10.3f} |")


if __name__ == "__main__":
    main()
