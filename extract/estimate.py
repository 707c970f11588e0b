"""`extract --estimate`: bytes on disk and hours for a run, from a short measured run.

The rate is measured on this machine with the real pipeline (decode, teacher forward on
the visible tokens, codec encode) over a few batches after one warm-up batch; the bytes
are the stored arrays per (image, view) times the zstd ratio measured on those tokens.
"""
from __future__ import annotations

import time

import numcodecs
import numpy as np

from store import codecs
from store import views as V

# Per (image, view) bytes of the small arrays: index int64, view int16, boxes 4 x int32, flip.
_META_BYTES = 8 + 2 + 16 + 1


def bytes_per_sample(codec: str, n_visible: int, *, pca_dim: int = codecs.PCA_DIM) -> int:
    """Uncompressed bytes one (image, view) costs for one teacher, masks included."""
    arrays = codecs.payload_arrays(codec, (n_visible + 1, 768), pca_dim=pca_dim)
    payload = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in arrays.values())
    return payload + _META_BYTES + 2 * n_visible


def estimate_run(extractor, *, codec: str, pca_dim: int, num_images: int, views: int,
                 ranks: int = 1, batches: int = 3) -> dict:
    """Measure ``batches`` batches (after a warm-up) and project a full run."""
    bs = extractor.batch_size
    index = np.arange(min(len(extractor.data), bs * (batches + 1)))
    it = extractor.batches(index, slot=0)
    _, tok = next(it)                                   # warm-up: compile, allocate, first decode
    pca = None
    if codec == "pca":
        x = tok.reshape(-1, tok.shape[-1]).double()
        mean = x.mean(0)
        _, _, vt = np.linalg.svd((x - mean).numpy(), full_matrices=False)
        pca = {"mean": mean.float().numpy(), "basis": vt[:pca_dim].astype(np.float32)}
    t0, n, raw, packed = time.perf_counter(), 0, 0, 0
    zstd = numcodecs.Zstd(level=1)
    for vb, tok in it:
        payload = codecs.encode(codec, tok, pca=pca)
        n += len(vb.index)
        for a in payload.values():
            raw += a.nbytes
            packed += len(zstd.encode(np.ascontiguousarray(a)))
    seconds = time.perf_counter() - t0
    if n == 0:
        raise ValueError("too few images to measure: need more than one batch")
    rate = n / seconds
    n_vis = V.num_visible(V.MASK_RATIOS[extractor.teacher.name])
    per_sample = bytes_per_sample(codec, n_vis, pca_dim=pca_dim) * (packed / raw if raw else 1.0)
    samples = num_images * views
    return dict(teacher=extractor.teacher.name, codec=codec, measured_images=n,
                images_per_second=rate, ranks=ranks, zstd_ratio=packed / raw if raw else 1.0,
                bytes_per_sample=per_sample, total_bytes=per_sample * samples,
                hours=samples / (rate * ranks) / 3600.0, num_images=num_images, views=views)


def format_estimate(e: dict) -> str:
    return (f"{e['teacher']}: {e['num_images']} images x {e['views']} views, codec {e['codec']}\n"
            f"  measured {e['images_per_second']:.1f} img/s per rank on {e['measured_images']} images"
            f" (zstd ratio {e['zstd_ratio']:.3f})\n"
            f"  disk:  {e['bytes_per_sample'] / 1024:.1f} KiB per (image, view) -> "
            f"{e['total_bytes'] / 2**30:.2f} GiB\n"
            f"  time:  {e['hours']:.2f} h on {e['ranks']} rank(s), assuming each runs at the measured rate")
