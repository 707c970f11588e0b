"""The checksums of a feature store (docs/format.md, "Checksums"): the codecs that put a crc32c
on every stored byte of a teacher's arrays (format_version 3), the statistics' digest, and what
a failed check is called in a message. store/features.py and store/teacherstore.py write and
check them."""
from __future__ import annotations

import hashlib

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ShardingCodec, ZstdCodec

# A crc32c over every stored byte of a teacher's arrays, which every zarr v3 reader checks:
# after the bytes of each inner chunk of the payload's zarr shards (the shard index has its
# own), after zstd for the small arrays and the statistics. What checking them costs:
# docs/performance.md, "Read-time checks".
PAYLOAD_COMPRESSORS = (Crc32cCodec(),)
SMALL_COMPRESSORS = (ZstdCodec(level=1), Crc32cCodec())
# Every chunk is written, all-fill ones too, so a complete block has every file and a missing
# one is damage, never zeros (zarr skips all-fill chunks by default, as versions 1-2 did).
WRITE = {"write_empty_chunks": True}
# Arrays whose block a version 1-2 writer may have skipped as all zeros (shard 0 of one image,
# V = 1, no flip): only these may lack a file of a complete block there.
MAY_BE_SKIPPED = ("index", "view", "flips")
STATS_DTYPES = {"mean": "<f4", "components": "<f4", "eigenvalues": "<f4", "indices": "<i8"}


def stats_digest(stats: dict) -> str:
    """sha256 of a teacher's statistics as stored: mean, components, eigenvalues (float32),
    indices (int64), each little-endian in C order, then ``count`` (tokens used) as int64."""
    h = hashlib.sha256()
    for key, dtype in STATS_DTYPES.items():
        h.update(np.ascontiguousarray(stats[key], dtype=dtype).tobytes())
    h.update(np.int64(stats["count"]).astype("<i8").tobytes())
    return h.hexdigest()


def has_crc32c(array: zarr.Array) -> bool:
    """Whether every stored byte of ``array`` is under a crc32c: its chunks' codecs (the inner
    chunks' for a sharded array, whose index always has one) end with one."""
    chain = array.metadata.codecs
    if len(chain) == 1 and isinstance(chain[0], ShardingCodec):
        chain = chain[0].codecs
    return isinstance(chain[-1], Crc32cCodec)


def failure(error: Exception) -> str:
    """What a zarr read error says of the file: a checksum mismatch, or bytes that do not decode."""
    if "checksum" in str(error):
        return "fails its crc32c checksum"
    return "does not decode (" + " ".join(f"{type(error).__name__}: {error}".split()) + ")"
