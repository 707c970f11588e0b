"""The manifest of packed images: format constants, sample keys, the per-sample columns and the
digest. ``prepare`` (``data/pack.py``) writes them, ``ImageSet`` (``data/imageset.py``) reads
them; the format: docs/format.md, "Images (prepare)"."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

FORMAT = "comad-images"
FORMAT_VERSION = 2  # 2: samples in a seeded permutation of the listing (1: in listing order)
MANIFEST = "manifest.json"
COLUMNS = "manifest.columns"
SHARD_DIR = "shards"
ALIGN = 64  # byte alignment of each column in the columns file
# (name, numpy dtype) of the per-sample table, in file order
COLUMN_DTYPES = [
    ("index", "<i8"), ("label", "<i8"), ("width", "<i8"), ("height", "<i8"), ("shard", "<i8"),
    ("offset", "<i8"), ("size", "<i8"), ("orientation", "u1"), ("mode", "u1"), ("ext", "u1"),
    ("source_end", "<i8"), ("source_bytes", "u1"),
]
# columns a table may lack (written by later code; readers of the format ignore unknown columns):
# crc32c, each sample's image bytes' crc32c (Castagnoli), checked by every ``ImageSet.read``
OPTIONAL_COLUMNS = [("crc32c", "<u4")]


def sample_key(index: int) -> str:
    return f"{index:09d}"


def shard_stem(shard: int) -> str:
    return f"shard-{shard:06d}"


def columns_blob(columns: dict[str, np.ndarray]) -> tuple[bytes, list[dict]]:
    parts, layout, offset = [], [], 0
    for name, dtype in [*COLUMN_DTYPES, *((n, d) for n, d in OPTIONAL_COLUMNS if n in columns)]:
        array = np.ascontiguousarray(columns[name], dtype=dtype)
        pad = (-offset) % ALIGN
        parts.append(b"\0" * pad)
        offset += pad
        layout.append({"name": name, "dtype": dtype, "offset": offset, "count": int(array.size)})
        parts.append(array.tobytes())
        offset += array.nbytes
    return b"".join(parts), layout


def dataset_digest(meta: dict) -> str:
    """sha256 identifying the data: format version, packing order, class names, the sample
    table (which holds relative source names, sizes, labels, ...) and every shard's content hash."""
    canon = {
        "format": FORMAT, "format_version": meta["format_version"], "order": meta["order"],
        "classes": meta["classes"],
        "modes": meta["modes"], "exts": meta["exts"], "columns_sha256": meta["columns"]["sha256"],
        "shards": [[s["first"], s["count"], s["sha256"]] for s in meta["shards"]],
    }
    return hashlib.sha256(json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def load_columns(root: Path, meta: dict, *, check_sha256: bool = False) -> dict[str, np.ndarray]:
    """Memory-map the sample table: read-only views, paged in on use (fast open, shared by forks).

    ``check_sha256``: hash the whole table first (which pages it in) and raise ValueError naming
    the file if it is not the one the manifest records."""
    col_path = root / meta["columns"]["file"]
    size = col_path.stat().st_size if col_path.is_file() else "missing"
    if size != meta["columns"]["bytes"]:
        raise ValueError(f"ImageSet: {col_path} should have {meta['columns']['bytes']} bytes, found {size}")
    raw = np.memmap(col_path, dtype=np.uint8, mode="r")
    if check_sha256 and hashlib.sha256(raw).hexdigest() != meta["columns"]["sha256"]:
        raise ValueError(f"ImageSet: {col_path} does not match the sha256 in its {MANIFEST}: the sample "
                         f"table (labels, sizes, offsets, source names) changed after prepare; restore it "
                         f"or prepare the source again")
    columns = {}
    for entry in meta["columns"]["layout"]:
        dtype = np.dtype(entry["dtype"])
        start = entry["offset"]
        columns[entry["name"]] = raw[start:start + entry["count"] * dtype.itemsize].view(dtype)
    missing = [name for name, _ in COLUMN_DTYPES if name not in columns]
    if missing:
        raise ValueError(f"ImageSet: {col_path} lacks columns {missing}")
    return columns
