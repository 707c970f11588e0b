"""The cached training data path alone (read + decode + batch into tensors, no model), for three
paths: ``today`` (the original JPEG's crop decoded, fp16 tokens), ``view_jpeg`` (stored 224 px
JPEG views, adapter-space int8) and ``raw`` (stored raw views, the same features); what each
column measures: docs/performance.md, "Data path".

    python bench/datapath.py                  # 384 ImageNet-like photos, 3 rounds, a table
    python bench/datapath.py --json rows.json # also the rows, for bench/projection.py
    python bench/datapath.py --quick          # 48 photos, 1 round (the test)
    python bench/datapath.py --checksum-cost  # + each path on stores without checksums"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from store import codecs  # noqa: E402
from data import views as V  # noqa: E402
from data.decode import make_decoder  # noqa: E402
from data.decode.pixels import SIZE  # noqa: E402
from teachers.descriptors import PAPER_TEACHERS, VIT_B_WIDTH  # noqa: E402

TEACHERS = PAPER_TEACHERS
PATHS = {"today": ("fp16", "original"), "view_jpeg": ("adapter", "jpeg"), "raw": ("adapter", "raw")}
STORES = {"today": "fp16", "view_jpeg": "jpeg", "raw": "raw"}
EMBED = VIT_B_WIDTH


# -- fixtures -------------------------------------------------------------------------
def _synthetic_stats(seed: int) -> dict:
    """A random orthonormal basis with decreasing eigenvalues (what the adapter codec needs)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(EMBED, EMBED, generator=g))
    eig = torch.logspace(1, -3, EMBED)
    return dict(mean=np.zeros(EMBED, np.float32), components=q.T.contiguous().numpy(),
                eigenvalues=eig.numpy().astype(np.float32))


def write_store(path: Path, data, *, codec: str, seed: int = 0, views: int = 1, view_pixels: str = "none") -> Path:
    """A three-teacher store of ``data`` in ``codec`` with seeded-noise tokens, written by the
    product's writer (extract/runner.open_teacher_store, TeacherStore.write_block, codecs);
    ``view_pixels`` creates the (empty) view pixels group first, as extraction does, so the
    teachers are recorded as running on those views (``write_view_pixels`` fills it)."""
    from extract.runner import open_teacher_store
    from teachers.vit import default_build

    for t, name in enumerate(TEACHERS):
        teacher = SimpleNamespace(name=name, source="bench/datapath.py synthetic tokens",
                                  digest=f"synthetic-{name}-{seed}", untrained=True, embed_dim=EMBED,
                                  build=default_build(name, seed=seed))
        ts, _ = open_teacher_store(store_path=path, data=data, teacher=teacher, views=views, seed=seed,
                                   codec=codec, pca_dim=codecs.PCA_DIM, precision="fp32", view_pixels=view_pixels)
        st = _synthetic_stats(seed + t)
        n_vis = V.num_visible(V.MASK_RATIOS[name])
        # recorded as estimated from every image's slot-0 tokens (the basis is exact, not estimated),
        # so that training accepts it for the coefficient codecs (train/requirements.py check_codec)
        ts.write_stats(st["mean"], st["components"], st["eigenvalues"], len(data) * (1 + n_vis),
                       indices=np.arange(len(data)))
        ts = type(ts)(ts.root, ts.group)          # reopen: the codec's statistics are now there
        g = torch.Generator().manual_seed(seed * 1000 + t)
        for slot in range(views):
            for k, (first, count) in enumerate(ts.root.shards):
                index = np.arange(first, first + count)
                view = V.view_of_slot(index, slot, views)
                boxes, flips = V.view_params(seed, index, view, data.widths[index], data.heights[index])
                tokens = torch.randn(count, n_vis + 1, EMBED, generator=g)
                payload = codecs.encode(codec, tokens, pca=ts.pca)
                ts.write_block(slot, k, index=index, view=view, boxes=boxes, flips=flips,
                               visible=V.teacher_visible(seed, index, view, name), payload=payload)
    return Path(path)


def write_view_pixels(store: Path, data, form: str, *, seed: int = 0, views: int = 1) -> None:
    """Each (slot, shard) block's views as the teacher saw them (crop, resize, flip: the PIL
    reference decoder's uint8 pixels) through the extraction's writer
    (store/viewpixels.ViewPixels.write_block: ``STORE/pixels/slot-<s>/shard-<k>.tar``)."""
    from data.decode.pil import pil_view
    from store.features import FeatureStore
    from store.viewpixels import ViewPixels

    vp = ViewPixels.create_or_open(FeatureStore.open(store), form)
    for slot in range(views):
        for k, s in enumerate(data.shards):
            first, count = int(s["first"]), int(s["count"])
            index = np.arange(first, first + count)
            view = V.view_of_slot(index, slot, views)
            boxes, flips = V.view_params(seed, index, view, data.widths[index], data.heights[index])
            pixels = np.stack([pil_view(data.read(int(i)), box, bool(flip)) for i, box, flip in zip(index, boxes, flips)])
            vp.write_block(slot, k, index=index, pixels=pixels)


@contextlib.contextmanager
def unchecked_format():
    """Stores created meanwhile are written as format_version 2 wrote them: no crc32c on any
    array (the bench reads their view tars with ``check=False``, as version 2 code did)."""
    from unittest import mock

    from zarr.codecs import ZstdCodec

    from store import features

    with mock.patch.multiple(features, FORMAT_VERSION=2, PAYLOAD_COMPRESSORS=None,
                             SMALL_COMPRESSORS=(ZstdCodec(level=1),)):
        yield


def build_fixture(root: Path, *, count: int, shard_size: int, seed: int = 0, unchecked: bool = False) -> dict:
    """The photos, their packed data and the stores; with ``unchecked`` also each store written
    as format_version 2 (``unchecked_format``), keyed ``<store>-unchecked``."""
    from samples.imagenet_like import size_summary, write_imagenet_like
    from data.shards import prepare

    photos = write_imagenet_like(root / "photos", count=count, seed=seed)
    data = prepare(photos, root / "data", shard_size=shard_size, progress=False)
    stores = {}
    for suffix in ("", "-unchecked") if unchecked else ("",):
        with unchecked_format() if suffix else contextlib.nullcontext():
            stores[f"fp16{suffix}"] = write_store(root / f"store_fp16{suffix}", data, codec="fp16", seed=seed)
            # the same adapter-space features (same seed), with each form of view pixels
            for form in ("jpeg", "raw"):
                stores[f"{form}{suffix}"] = write_store(root / f"store_{form}{suffix}", data, codec="adapter",
                                                        seed=seed, view_pixels=form)
                write_view_pixels(stores[f"{form}{suffix}"], data, form, seed=seed)
    return dict(data=data, stores=stores, photos=size_summary(photos))


# -- the paths ------------------------------------------------------------------------
class Path_:
    """One data path: blocks of (features, pixels) read per shard, batches gathered by
    fancy indexing, decoded, turned into tensors; CPU and wall seconds per stage. ``checks``:
    False reads the stores written without checksums (``unchecked_format``), views unchecked."""

    def __init__(self, name: str, fx: dict, *, batch_size: int, threads: int, checks: bool = True):
        from store.features import FeatureStore

        self.base, self.checks = name, checks
        self.name = name if checks else f"{name} (no checksums)"
        codec, self.pixels = PATHS[name]
        self.data = fx["data"]
        from data.decode.stored import make_view_decoder
        from store.viewpixels import ViewPixels

        fs = FeatureStore.open(fx["stores"][STORES[name] + ("" if checks else "-unchecked")])
        self.teachers = [fs.teacher(t) for t in TEACHERS]
        self.batch_size = batch_size
        if self.pixels == "original":
            self.decode = make_decoder("dali", batch_size=batch_size, device="cpu", num_threads=threads)
        else:       # as training reads stored views: uint8, normalised on the device (train/loader.py)
            self.view_pixels = ViewPixels.open(fs)
            assert self.view_pixels.form == self.pixels
            self.decode = make_view_decoder(self.pixels, "dali", batch_size=batch_size, device="cpu",
                                            num_threads=threads, normalize=False)

    def _read(self, shard: int):
        """Features and pixels of one block (slot 0) and the bytes read."""
        blocks = [ts.read_block(0, shard) for ts in self.teachers]
        nbytes = sum(a.nbytes for b in blocks for a in b.values())
        index = blocks[0]["index"]
        if self.pixels == "original":
            pixels = self.data.read_many(index)
            nbytes += sum(len(d) for d in pixels)
        else:
            got, pixels = self.view_pixels.read_block(0, shard, check=self.checks)
            assert np.array_equal(got, index)
            nbytes += sum(len(d) for d in pixels)
        return blocks, pixels, nbytes

    def epoch(self, order: np.random.Generator, shards=None) -> dict:
        """One pass over ``shards`` (default all) in a random order; per-stage seconds."""
        cpu = dict(read=0.0, decode=0.0, batch=0.0)
        n_images = n_bytes = n_pixels = n_crop = 0
        shards = range(len(self.teachers[0].root.shards)) if shards is None else shards
        wall = time.perf_counter()
        for shard in order.permutation(list(shards)):
            c = time.process_time()
            blocks, pixels, nbytes = self._read(int(shard))
            cpu["read"] += time.process_time() - c
            n_bytes += nbytes
            rows_all = order.permutation(len(blocks[0]["index"]))
            for a in range(0, len(rows_all), self.batch_size):
                rows = rows_all[a:a + self.batch_size]
                c = time.process_time()
                feats = [{k: torch.from_numpy(b[k][rows]) for k in ("visible", *ts.payload_keys)}
                         for b, ts in zip(blocks, self.teachers)]
                index = torch.from_numpy(blocks[0]["index"][rows])
                c2 = time.process_time()
                cpu["batch"] += c2 - c
                boxes, flips = blocks[0]["boxes"][rows], blocks[0]["flips"][rows]
                if self.pixels == "original":
                    images = self.decode([pixels[r] for r in rows], boxes, flips)
                    n_pixels += int((self.data.widths[index.numpy()] * self.data.heights[index.numpy()]).sum())
                    n_crop += int((boxes[:, 2] * boxes[:, 3]).sum())
                    assert images.shape == (len(rows), 3, SIZE, SIZE)
                else:
                    images = self.decode([pixels[r] for r in rows])
                    assert images.shape == (len(rows), SIZE, SIZE, 3) and images.dtype == torch.uint8
                    if self.pixels == "jpeg":
                        n_pixels += SIZE * SIZE * len(rows)
                        n_crop += SIZE * SIZE * len(rows)
                cpu["decode"] += time.process_time() - c2
                assert images.shape[0] == feats[0]["visible"].shape[0] == len(rows)
                n_images += len(rows)
        return dict(wall=time.perf_counter() - wall, cpu=cpu, images=n_images, bytes=n_bytes,
                    pixels=n_pixels, crop=n_crop)

    def mask_seconds(self) -> float:
        """CPU seconds per sample of comparing the blocks' masks with the keyed draw, which training
        does on a run's first read of each block (train/loader.py), blocks read beforehand."""
        cpu, root = 0.0, self.teachers[0].root
        for shard in range(len(root.shards)):
            blocks = [ts.read_block(0, shard) for ts in self.teachers]
            c = time.process_time()
            for ts, block in zip(self.teachers, blocks):
                ts.check_masks(0, shard, block)
            cpu += time.process_time() - c
        return cpu / root.num_samples


def measure(fx: dict, *, rounds: int, batch_size: int, threads: int, seed: int = 0) -> list[dict]:
    """Rows for every path, timed in alternating rounds (A B C A B C ...), one epoch over the data
    per round after an untimed warm-up, each path keeping its median round; then, where ``fx``
    holds stores without checksums (``build_fixture(unchecked=True)``), every path on them."""
    checks = (True, False) if any(k.endswith("-unchecked") for k in fx["stores"]) else (True,)
    paths = [Path_(name, fx, batch_size=batch_size, threads=threads, checks=c) for c in checks for name in PATHS]
    order = np.random.default_rng(seed)
    for p in paths:
        p.epoch(order, shards=[0])                  # warm-up: DALI pipelines built, files opened
    runs = {p.name: [] for p in paths}
    for _ in range(rounds):
        for p in paths:
            runs[p.name].append(p.epoch(order))
    load = os.getloadavg()
    rows = []
    for p in paths:
        rs = sorted(runs[p.name], key=lambda r: sum(r["cpu"].values()))
        med = rs[len(rs) // 2]
        n, cpu = med["images"], sum(med["cpu"].values())
        rows.append(dict(
            name=p.name, codec=PATHS[p.base][0], pixels_from=PATHS[p.base][1], checksums=p.checks,
            images_per_s_per_core=n / cpu, images_per_s=n / med["wall"],
            bytes_per_sample=med["bytes"] / n, pixels_per_sample=med["pixels"] / n,
            crop_pixels_per_sample=med["crop"] / n,
            cpu_s_per_sample={k: v / n for k, v in med["cpu"].items()},
            decode_cpu_s_per_pixel=(med["cpu"]["decode"] / med["pixels"]) if med["pixels"] else None,
            rounds_images_per_s_per_core=[r["images"] / sum(r["cpu"].values()) for r in runs[p.name]],
            read_cpu_s_per_sample_min=min(r["cpu"]["read"] / r["images"] for r in runs[p.name]),
            images=n, rounds=rounds, batch_size=batch_size, threads=threads, loadavg=list(load),
            cpus=os.cpu_count(), photos=fx["photos"]))
    today = rows[0]
    for r in rows:
        r["x_today_per_core"] = r["images_per_s_per_core"] / today["images_per_s_per_core"]
        r["bytes_vs_today"] = r["bytes_per_sample"] / today["bytes_per_sample"]
    without = {r["name"]: r for r in rows if not r["checksums"]}
    for r, p in zip(rows, paths):
        u = without.get(f"{r['name']} (no checksums)")
        if u is None:
            continue
        # What the checks cost: they change the read stage only, so its CPU (the least of the
        # rounds: a shared machine only adds to it) with checks minus without, as a share of the
        # images/s per core of the path without them; the whole rows' medians are printed beside.
        r["checks_cpu_s_per_sample"] = r["read_cpu_s_per_sample_min"] - u["read_cpu_s_per_sample_min"]
        r["checksum_cost"] = 1 - 1 / (1 + r["checks_cpu_s_per_sample"] * u["images_per_s_per_core"])
        # the masks, on a block's first read in a run (train/loader.py), the same way
        r["masks_cpu_s_per_sample"] = min(p.mask_seconds() for _ in range(rounds))
        r["masks_cost"] = 1 - 1 / (1 + r["masks_cpu_s_per_sample"] * u["images_per_s_per_core"])
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = ["| path | images/s per core (rounds) | x today | images/s wall | bytes/sample-epoch | x today "
             "| pixels decoded/sample | CPU ms/sample read / decode / batch |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        spread = ", ".join(f"{v:.0f}" for v in r["rounds_images_per_s_per_core"])
        c = r["cpu_s_per_sample"]
        lines.append(f"| {r['name']} | {r['images_per_s_per_core']:.0f} ({spread}) | {r['x_today_per_core']:.2f} | "
                     f"{r['images_per_s']:.0f} | {r['bytes_per_sample'] / 1e3:.1f} KB | {r['bytes_vs_today']:.3f} | "
                     f"{r['pixels_per_sample']:.0f} | {c['read'] * 1e3:.2f} / {c['decode'] * 1e3:.2f} / "
                     f"{c['batch'] * 1e3:.2f} |")
    return "\n".join(lines)


def format_checksum_cost(rows: list[dict]) -> str:
    """Each path with and without the read-time checks (rows with ``checksum_cost``), and what
    comparing the masks adds on a block's first read in a run."""
    by = {r["name"]: r for r in rows}
    lines = ["| path | images/s per core, median: checked / without | read CPU ms/sample, least: checked / "
             "without | checks: ms/sample (cost) | masks, a block's first read: ms/sample (cost) |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        if "checksum_cost" in r:
            u = by[f"{r['name']} (no checksums)"]
            lines.append(f"| {r['name']} | {r['images_per_s_per_core']:.0f} / {u['images_per_s_per_core']:.0f} | "
                         f"{r['read_cpu_s_per_sample_min'] * 1e3:.3f} / {u['read_cpu_s_per_sample_min'] * 1e3:.3f} | "
                         f"{r['checks_cpu_s_per_sample'] * 1e3:.3f} ({100 * r['checksum_cost']:.1f}%) | "
                         f"{r['masks_cpu_s_per_sample'] * 1e3:.3f} ({100 * r['masks_cost']:.1f}%) |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=384, help="ImageNet-like photos to generate")
    ap.add_argument("--shard-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="DALI decoder threads")
    ap.add_argument("--json", type=Path, help="write the rows here (a list of objects)")
    ap.add_argument("--root", type=Path, help="build the fixtures here and keep them (default: a temp dir); "
                    "ROOT/data, ROOT/store_fp16 and ROOT/store_jpeg also serve bench/train.py")
    ap.add_argument("--quick", action="store_true", help="48 photos, 1 round, batch 16 (the test)")
    ap.add_argument("--checksum-cost", action="store_true",
                    help="also time every path on stores without checksums (docs/performance.md)")
    a = ap.parse_args(argv)
    if a.quick:
        a.images, a.rounds, a.shard_size, a.batch_size = 48, 1, 16, 16
    with tempfile.TemporaryDirectory() as tmp:
        print(f"building {a.images} ImageNet-like photos, three stores and their view pixels ...", flush=True)
        t = time.perf_counter()
        fx = build_fixture(a.root or Path(tmp), count=a.images, shard_size=a.shard_size, unchecked=a.checksum_cost)
        print(f"  built in {time.perf_counter() - t:.0f} s; photos: {fx['photos']}", flush=True)
        rows = measure(fx, rounds=a.rounds, batch_size=a.batch_size, threads=a.threads)
    print(f"\ndata path alone, CPU, DALI threads {a.threads}, batch {a.batch_size}, {a.rounds} alternating rounds "
          f"of one epoch ({rows[0]['images']} images), median round; load average "
          + " / ".join(f"{x:.2f}" for x in rows[0]["loadavg"]) + f" on {os.cpu_count()} CPUs")
    print(format_rows(rows))
    if a.checksum_cost:
        print("\nread-time checks (crc32c of the arrays, the view tars against their records): "
              "each path against itself on stores without them")
        print(format_checksum_cost(rows))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
        print(f"rows written to {a.json}")
    return rows


if __name__ == "__main__":
    main()
