"""`extract --estimate`: bytes on disk and hours for a run, from a short run of the real pipeline
(decode, masked teacher forward, codec encode, copy to the host) over a few batches after one
warm-up batch. The bytes are what the store writes (docs/format.md), uncompressed (the zstd'ed
small arrays are slightly over-counted): tokens and per-sample arrays, the teacher's statistics
once and, with ``--view-pixels``, the views' tars once per store (the warm-up batch's views)."""
from __future__ import annotations

import time

import numpy as np
import torch

from core import dist
from extract.runner import Extractor
from store import codecs
from store.teacherstore import teacher_input
from data import views as V
from teachers.descriptors import VIT_B_WIDTH, descriptor
from store.viewpixels import encode_view

# Per (image, view) bytes of the small arrays: index int64, view int16, boxes 4 x int32, flip.
_META_BYTES = 8 + 2 + 16 + 1


def stats_bytes(num_images: int, stats_images: int, *, width: int = VIT_B_WIDTH) -> int:
    """Uncompressed bytes of one teacher's statistics: mean (C,), components (C, C), eigenvalues
    (C,) float32 for a teacher ``width`` C wide, and the sample's image indices int64
    (store/features.py: write_stats)."""
    return (2 * width + width * width) * 4 + 8 * min(num_images, stats_images)


def bytes_per_sample(codec: str, n_visible: int, *, pca_dim: int = codecs.PCA_DIM, width: int = VIT_B_WIDTH) -> int:
    """Uncompressed bytes one (image, view) costs for one teacher ``width`` channels wide, masks included."""
    arrays = codecs.payload_arrays(codec, (n_visible + 1, width), pca_dim=pca_dim)
    payload = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in arrays.values())
    return payload + _META_BYTES + 2 * n_visible


def view_pixel_bytes(datas: list[bytes]) -> float:
    """Mean bytes one view costs in the view tars: member header, data padded to 512 bytes
    (the index and record lines are negligible). datas: encoded views (``encode_view``)."""
    return float(np.mean([512 + -(-len(d) // 512) * 512 for d in datas]))


def estimate_extraction(cfg, *, teacher, data, ranks: int) -> dict:
    """``estimate_run`` of the extraction ``cfg`` (extract/config.py) of ``teacher`` over ``data``,
    projected for ``ranks`` ranks."""
    cfg = cfg.resolved(teacher=teacher, data=data)
    ex = Extractor(teacher, data, seed=cfg.seed, views=cfg.views, batch_size=cfg.batch_size,
                   device=dist.local_device(cfg.device), decoder=cfg.decoder, num_threads=cfg.threads,
                   decoder_settings=cfg.decoder_settings, teacher_input=teacher_input(cfg.view_pixels),
                   amp=cfg.amp)
    return estimate_run(ex, codec=cfg.codec, pca_dim=cfg.pca_dim, num_images=len(data), views=cfg.views,
                        ranks=ranks, stats_images=cfg.stats_images, view_pixels=cfg.view_pixels)


def estimate_run(extractor, *, codec: str, pca_dim: int, num_images: int, views: int, stats_images: int,
                 view_pixels: str, ranks: int = 1, batches: int = 3) -> dict:
    """Measure ``batches`` batches (after a warm-up) and project a full run."""
    bs = extractor.batch_size
    index = np.arange(min(len(extractor.data), bs * (batches + 1)))
    it = ((vb, tok) for _, vb, tok, _ in extractor.stream([(index, 0, True, view_pixels != "none")]))
    first, tok = next(it)                               # warm-up: compile, allocate, first decode
    pixel_bytes = 0.0
    if view_pixels != "none":
        pixel_bytes = view_pixel_bytes(first.encoded if first.encoded is not None
                                       else [encode_view(view_pixels, p) for p in first.pixels])
    pca = None
    if codec in codecs.NEEDS_STATS:                     # a basis from the warm-up batch, on the host
        x = tok.reshape(-1, tok.shape[-1]).double().cpu()
        mean = x.mean(0)
        _, sv, vt = torch.linalg.svd(x - mean, full_matrices=False)
        pca = codecs.statistics(codec, dict(mean=mean.float().numpy(), components=vt.float().numpy(),
                                            eigenvalues=(sv ** 2 / max(len(x) - 1, 1)).float().numpy()),
                                pca_dim=pca_dim)
    t0, n = time.perf_counter(), 0
    for vb, tok in it:
        codecs.encode(codec, tok, pca=pca)              # ends with the copy to the host (a sync)
        n += len(vb.index)
    seconds = time.perf_counter() - t0
    if n == 0:
        raise ValueError("too few images to measure: need more than one batch")
    rate = n / seconds
    d = descriptor(extractor.teacher.name)
    n_vis = V.num_visible(d.mask_ratio)
    width = int(extractor.teacher.embed_dim)             # what the store records (teacher_config)
    per_sample = bytes_per_sample(codec, n_vis, pca_dim=pca_dim, width=width)
    samples = num_images * views
    return dict(teacher=extractor.teacher.name, codec=codec, measured_images=n,
                images_per_second=rate, ranks=ranks, bytes_per_sample=per_sample, view_pixels=view_pixels,
                view_pixel_bytes=pixel_bytes, pixel_total_bytes=int(pixel_bytes * samples),
                total_bytes=per_sample * samples + stats_bytes(num_images, stats_images, width=width) + int(pixel_bytes * samples),
                hours=samples / (rate * ranks) / 3600.0, num_images=num_images, views=views)


def format_estimate(e: dict) -> str:
    pixels = ""
    if e.get("view_pixels", "none") != "none":
        pixels = (f"  views: {e['view_pixel_bytes'] / 1024:.1f} KiB per view as {e['view_pixels']}, once per store "
                  f"-> {e['pixel_total_bytes'] / 2**30:.2f} GiB (in the disk total)\n")
    return (f"{e['teacher']}: {e['num_images']} images x {e['views']} views, codec {e['codec']}\n"
            f"  measured {e['images_per_second']:.1f} img/s per rank on {e['measured_images']} images\n"
            f"  disk:  {e['bytes_per_sample'] / 1024:.1f} KiB per (image, view) -> "
            f"{e['total_bytes'] / 2**30:.2f} GiB\n" + pixels +
            f"  time:  {e['hours']:.2f} h on {e['ranks']} rank(s), assuming each runs at the measured rate")
