"""Extraction: the teachers' masked forward against the full 196-patch forward, and the codecs
(bytes per (image, view), fidelity, block write and read rates), in one run; what each table
measures: docs/performance.md, "Extraction".

    python bench/extract.py                       # photos from scikit-image, untrained teachers
    python bench/extract.py --device cuda         # GPU: bf16 autocast, plus the matmul peak and MFU
    python bench/extract.py --checkpoints DIR     # official teacher files (names: docs/teachers.md)"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract.runner import Extractor, token_stats  # noqa: E402
from teachers.vit import build_teacher  # noqa: E402
from store import codecs  # noqa: E402
from store.features import DataInfo, FeatureStore  # noqa: E402
from teachers.descriptors import PAPER_TEACHERS, descriptor  # noqa: E402

TEACHERS = PAPER_TEACHERS


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def forward_rates(teacher, batches, *, device, rounds: int = 3) -> tuple[float, float]:
    """(masked, full) images per second of the teacher alone on decoded batches: the two are
    timed in turn ``rounds`` times after a warm-up batch, and each keeps its best round."""
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if torch.device(device).type == "cuda" else None
    inputs = [(vb.images.to(device), torch.from_numpy(vb.visible).to(device)) for vb in batches]
    n = sum(len(b.index) for b in batches[1:])
    best = {False: 0.0, True: 0.0}
    with torch.inference_mode(), (amp or torch.autocast("cpu", enabled=False)):
        for full in (False, True):                  # warm-up
            teacher.forward_full(inputs[0][0]) if full else teacher(*inputs[0])
        for _ in range(rounds):
            for full in (False, True):
                _sync(device)
                t = time.perf_counter()
                for images, vis in inputs[1:]:
                    teacher.forward_full(images) if full else teacher(images, vis)
                _sync(device)
                best[full] = max(best[full], n / (time.perf_counter() - t))
    return best[False], best[True]


def du(path: Path) -> int:
    """Bytes of the per-sample arrays (the statistics, a fixed 2.4 MB per teacher, excluded)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and "stats" not in f.parts)


def _adapt(tokens: torch.Tensor, st: dict) -> torch.Tensor:
    """The frozen adapter's view of tokens: LayerNorm of the top-192 principal coordinates."""
    w = torch.from_numpy(st["components"][:192]).float()
    y = (tokens - torch.from_numpy(st["mean"]).float()) @ w.T
    return torch.nn.functional.layer_norm(y, (192,))


def codec_rows(tokens: dict, ds, *, root: Path, pca_dim: int, stats: dict) -> list[dict]:
    """Write every teacher's tokens with each codec into a store; measure size, fidelity, speed."""
    rows = []
    n = len(next(iter(tokens.values())))
    for codec in codecs.CODECS:
        path = root / f"store-{codec}"
        fs = FeatureStore.create_or_open(path, data=DataInfo.of(ds), views=1, seed=0)
        t_write = t_read = 0.0
        cos_all, rel_all, acos_all = [], [], []
        for name, tok in tokens.items():
            ts = fs.create_teacher(name, dict(codec=codec, n_visible=tok.shape[1] - 1, pca_dim=pca_dim,
                                              mask_ratio=0.0, checkpoint_digest="bench", untrained=True))
            st = stats[name]
            ts.write_stats(st["mean"], st["components"], st["eigenvalues"], st["count"], indices=st["indices"])
            for k, (first, count) in enumerate(fs.shards):
                t = time.perf_counter()
                payload = codecs.encode(codec, tok[first:first + count], pca=ts.pca)
                idx = np.arange(first, first + count)
                ts.write_block(0, k, index=idx, view=np.zeros(count), boxes=np.zeros((count, 4)),
                               flips=np.zeros(count, bool), visible=np.zeros((count, tok.shape[1] - 1)),
                               payload=payload)
                t_write += time.perf_counter() - t
            for k, (first, count) in enumerate(fs.shards):
                t = time.perf_counter()
                b = ts.read_block(0, k)
                got = ts.decode({key: b[key] for key in ts.payload_keys})
                t_read += time.perf_counter() - t
                ref = tok[first:first + count].float()
                cos_all.append(torch.nn.functional.cosine_similarity(got, ref, dim=-1).flatten())
                acos_all.append(torch.nn.functional.cosine_similarity(_adapt(got, st), _adapt(ref, st), dim=-1).flatten())
                rel_all.append(((got - ref).norm() / ref.norm()).item())
        cos, acos = torch.cat(cos_all), torch.cat(acos_all)
        size = sum(du(path / name) for name in tokens)
        rows.append(dict(codec=codec, bytes_per_sample=size / n, mean_cos=cos.mean().item(),
                         min_cos=cos.min().item(), rel_err=float(np.mean(rel_all)),
                         adapter_min_cos=acos.min().item(),
                         write_img_s=n * len(tokens) / t_write, read_img_s=n * len(tokens) / t_read))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--decoder", default="dali", choices=["dali", "pil"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batches", type=int, default=4, help="timed forward batches (plus one warm-up)")
    ap.add_argument("--copies", type=int, default=16, help="photo copies (13 photos each) for the codec table")
    ap.add_argument("--pca-dim", type=int, default=256)
    ap.add_argument("--checkpoints", type=Path, default=None, help="folder with the official teacher files")
    args = ap.parse_args()
    from samples.photos import write_photo_tree
    from data.shards import prepare

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos = write_photo_tree(tmp / "photos", max_side=500, copies=args.copies)
        # one block per teacher: a partial last shard would be stored padded to its inner chunk
        ds = prepare(photos, tmp / "data", shard_size=13 * args.copies, progress=False)
        rate_rows, tokens, stats = [], {}, {}
        for name in TEACHERS:
            ckpt = None
            if args.checkpoints:
                from teachers.checkpoints import TEACHERS as SPECS
                ckpt = args.checkpoints / SPECS[name].filename
            teacher = build_teacher(name, checkpoint=ckpt, random_init=ckpt is None, seed=0, device=args.device)
            ex = Extractor(teacher, ds, seed=0, views=1, batch_size=args.batch_size, device=args.device,
                           decoder=args.decoder)
            idx = np.arange(min(len(ds), args.batch_size * (args.batches + 1)))
            batches = [ex.view_batch(idx[a:a + args.batch_size], ds.read_many(idx[a:a + args.batch_size]), 0)
                       for a in range(0, len(idx), args.batch_size)]
            masked, full = forward_rates(teacher, batches, device=args.device)
            rate_rows.append((name, teacher.untrained, batches[0].visible.shape[1], masked, full))
            tok = torch.cat([t for _, t in ex.batches(np.arange(len(ds)), 0)]).cpu()
            tokens[name] = tok
            stats[name] = dict(token_stats([tok]), indices=np.arange(len(ds)))   # every image, slot 0
        dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
        print(f"\nTeacher forward ({dev}, batch {args.batch_size}, {args.batches} timed batches, best of 3 rounds)")
        print("| teacher | weights | visible patches | masked img/s | full img/s | speed-up |")
        print("|---|---|---:|---:|---:|---:|")
        for name, untrained, nv, masked, full in rate_rows:
            print(f"| {name} | {'untrained' if untrained else 'official'} | {nv} | {masked:.1f} | {full:.1f} | "
                  f"{masked / full:.2f}x |")
        if args.device.startswith("cuda"):
            from train.loop import _peak_flops
            peak = _peak_flops(torch.device(args.device))
            print(f"\nmeasured bf16 matmul peak: {peak / 1e12:.0f} TFLOP/s")
            for name, _, nv, masked, _ in rate_rows:
                c = descriptor(name).width
                flops = 12 * (2 * (nv + 1) * 12 * c * c + 4 * (nv + 1) ** 2 * c)
                print(f"  {name}: teacher forward at {masked * flops / 1e12:.0f} TFLOP/s = "
                      f"{masked * flops / peak:.1%} of the measured peak")
        rows = codec_rows(tokens, ds, root=tmp, pca_dim=args.pca_dim, stats=stats)
        print(f"\nCodecs over the three teachers ({len(ds)} images, 1 view, as stored)")
        print("| codec | bytes per (image, view) | mean cos | worst cos | rel. error | worst cos after frozen adapter "
              "| write img/s | read img/s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['codec']} | {r['bytes_per_sample'] / 1024:.0f} KiB | {r['mean_cos']:.6f} | {r['min_cos']:.6f} | "
                  f"{r['rel_err']:.2e} | {r['adapter_min_cos']:.6f} | {r['write_img_s']:.0f} | {r['read_img_s']:.0f} |")


if __name__ == "__main__":
    main()
