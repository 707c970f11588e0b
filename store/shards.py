"""Packed images: ``prepare`` (SRC -> tar shards + DALI indices + manifest) and ``ImageSet``.

The on-disk format is documented in ``docs/format.md`` ("Images (prepare)"); in short::

    OUT/manifest.json          written last, atomically: OUT is a finished prepare iff it exists
    OUT/manifest.columns       the per-sample table, one little-endian column after another
    OUT/shards/shard-000000.tar  members {key}.{ext} (bytes exactly as read) and {key}.cls
    OUT/shards/shard-000000.idx  DALI fn.readers.webdataset index (wds2idx "v1.2" text)

with ``key = f"{index:09d}"`` and ``index`` the sample's stable global index: its row in the
manifest. Samples are written in a seeded pseudo-random permutation (``pack_order``) of the
deterministic listing order of ``store.imagesource.list_source``, the usual practice for
WebDataset shards: a class-sorted source (the ILSVRC folders) still gives class-mixed shards,
so shard-sequential readers and any prefix of the indices see every class. Packing the same
SRC with the same seed twice gives byte-identical shards, indices and manifest.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import tarfile
import threading
from array import array
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from store import views as V
from store.imagesource import BadImage, ImageInfo, PrepareError, SourceItem, SourceListing, inspect_image, list_source
from store.roles import Role

__all__ = ["FORMAT", "FORMAT_VERSION", "BadImage", "ImageSet", "PrepareError", "pack_order", "prepare"]

FORMAT = "comad-images"
FORMAT_VERSION = 2  # 2: samples in a seeded permutation of the listing (1: in listing order)
MAX_OPEN = 32  # shard descriptors an ImageSet keeps open (least recently used closed first)
MANIFEST = "manifest.json"
COLUMNS = "manifest.columns"
SHARD_DIR = "shards"
_PARTIAL = re.compile(r"shard-\d{6,}\.(tar|idx)(\.tmp)?")
_ALIGN = 64
_ROLE_PACK_ORDER = Role.PACK_ORDER  # hash role of the packing order (21; every role: store/roles.py)
# (name, numpy dtype) of the per-sample table, in file order
_COLUMN_DTYPES = [
    ("index", "<i8"), ("label", "<i8"), ("width", "<i8"), ("height", "<i8"), ("shard", "<i8"),
    ("offset", "<i8"), ("size", "<i8"), ("orientation", "u1"), ("mode", "u1"), ("ext", "u1"),
    ("source_end", "<i8"), ("source_bytes", "u1"),
]


def pack_order(count: int, *, seed: int) -> np.ndarray:
    """The order ``prepare`` writes ``count`` listed candidates in: (count,) int64, a permutation.

    ``pack_order(n, seed=s)[j]`` is the listing position of the j-th candidate written:
    candidates sorted by a keyed hash of (seed, role, position), so the order depends on
    the seed and the number of candidates only, never on machine or thread count.
    Rejected candidates are skipped, so sample index i is the i-th accepted candidate.
    """
    keys = V.hash_keys(seed, _ROLE_PACK_ORDER, np.arange(count, dtype=np.int64))
    return np.argsort(keys, kind="stable").astype(np.int64)


def _key(index: int) -> str:
    return f"{index:09d}"


def _shard_stem(shard: int) -> str:
    return f"shard-{shard:06d}"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _ShardWriter:
    """Writes one shard to ``*.tmp`` names and renames tar and index into place on ``close``.

    Tar members are USTAR with fixed metadata (mtime 0, uid/gid 0, empty owner names,
    mode 0644), so the bytes depend only on the samples.
    """

    def __init__(self, folder: Path, shard: int, first: int):
        self.stem = _shard_stem(shard)
        self.shard, self.first, self.count = shard, first, 0
        self.tar_path = folder / f"{self.stem}.tar"
        self.idx_path = folder / f"{self.stem}.idx"
        self._tmp = self.tar_path.with_name(self.tar_path.name + ".tmp")
        self._file = open(self._tmp, "wb")
        self._tar = tarfile.TarFile(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._index_lines: list[str] = []

    def _add(self, name: str, data: bytes) -> int:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.type = tarfile.REGTYPE
        offset = self._tar.offset + tarfile.BLOCKSIZE  # one USTAR header block precedes the data
        self._tar.addfile(info, io.BytesIO(data))
        return offset

    def add(self, index: int, ext: str, data: bytes, label: int) -> int:
        """Append sample ``index``; returns the byte offset of the image data in the tar."""
        key = _key(index)
        label_bytes = str(label).encode()
        image_offset = self._add(f"{key}.{ext}", data)
        label_offset = self._add(f"{key}.cls", label_bytes)
        self._index_lines.append(f"{ext} {image_offset} {len(data)} {key}.{ext} "
                                 f"cls {label_offset} {len(label_bytes)} {key}.cls")
        self.count += 1
        return image_offset

    def close(self) -> dict:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        index_text = f"v1.2 {self.count}\n" + "".join(line + "\n" for line in self._index_lines)
        _write_atomic(self.idx_path, index_text.encode())
        sha = _sha256_file(self._tmp)
        size = self._tmp.stat().st_size
        os.replace(self._tmp, self.tar_path)
        return {"name": self.stem, "index": self.shard, "first": self.first, "count": self.count,
                "tar": f"{SHARD_DIR}/{self.tar_path.name}", "idx": f"{SHARD_DIR}/{self.idx_path.name}",
                "bytes": size, "sha256": sha}


def _check_item(item: SourceItem) -> tuple[bytes | None, ImageInfo | None, str | None]:
    """Read and inspect one candidate: (data, info, None) if good, (None, None, reason) if bad."""
    if item.error is not None:
        return None, None, item.error
    try:
        data = item.read()
    except OSError as error:
        return None, None, f"cannot read ({type(error).__name__}: {error.strerror or error})"
    try:
        return data, inspect_image(data, source=item.source), None
    except BadImage as bad:
        return None, None, bad.reason


def _ordered_map(fn: Callable, items: Iterable, *, workers: int) -> Iterator[tuple]:
    """``(item, fn(item))`` in input order, ``workers`` threads, bounded look-ahead.

    PIL releases the GIL while decoding, so threads give real parallelism here.
    """
    if workers <= 0:
        for item in items:
            yield item, fn(item)
        return
    window = 8 * workers
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prepare") as pool:
        pending: deque = deque()
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= window:
                head, future = pending.popleft()
                yield head, future.result()
        while pending:
            head, future = pending.popleft()
            yield head, future.result()


def _remove_partials(out: Path) -> int:
    removed = 0
    for name in (MANIFEST + ".tmp", COLUMNS, COLUMNS + ".tmp"):
        if (out / name).exists():
            (out / name).unlink()
            removed += 1
    shard_dir = out / SHARD_DIR
    if shard_dir.is_dir():
        for entry in os.scandir(shard_dir):
            if _PARTIAL.fullmatch(entry.name):
                os.unlink(entry.path)
                removed += 1
    return removed


def _columns_blob(columns: dict[str, np.ndarray]) -> tuple[bytes, list[dict]]:
    parts, layout, offset = [], [], 0
    for name, dtype in _COLUMN_DTYPES:
        array = np.ascontiguousarray(columns[name], dtype=dtype)
        pad = (-offset) % _ALIGN
        parts.append(b"\0" * pad)
        offset += pad
        layout.append({"name": name, "dtype": dtype, "offset": offset, "count": int(array.size)})
        parts.append(array.tobytes())
        offset += array.nbytes
    return b"".join(parts), layout


def _dataset_digest(meta: dict) -> str:
    """sha256 identifying the data: format version, packing order, class names, the sample
    table (which holds relative source names, sizes, labels, ...) and every shard's content hash."""
    canon = {
        "format": FORMAT, "format_version": meta["format_version"], "order": meta["order"],
        "classes": meta["classes"],
        "modes": meta["modes"], "exts": meta["exts"], "columns_sha256": meta["columns"]["sha256"],
        "shards": [[s["first"], s["count"], s["sha256"]] for s in meta["shards"]],
    }
    return hashlib.sha256(json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare(src: Path | str, out: Path | str, *, shard_size: int = 256, seed: int = 0,
            pattern: str | None = None, skip_bad: bool = False, progress: bool = True,
            workers: int | None = None, echo: Callable[[str], None] | None = None) -> "ImageSet":
    """Pack SRC (ImageFolder tree or WebDataset tars) into OUT; see ``docs/format.md``.

    Args:
        src: the source folder.
        out: the output folder (created). If it holds a finished prepare of the same SRC
            listing, nothing is done; of a different SRC, shard size or seed, ``PrepareError``.
            Without ``manifest.json`` it is a half-written run and is redone from scratch.
        shard_size: samples per tar shard (the last shard may be smaller).
        seed: key of the packing order (``pack_order``), >= 0; recorded in the manifest.
        pattern: WebDataset input: which top-level tars to take (glob with brace expansion,
            e.g. ``imagenet1k-train-*.tar``); None takes every ``*.tar``.
        skip_bad: leave unreadable / non-image files out (listed in the manifest's
            ``rejects``) instead of stopping with ``BadImage`` naming the file.
        progress: tqdm progress bar.
        workers: threads reading and verifying images (None: ``min(8, cpu_count)``; 0: inline).
        echo: where status messages go (None: stderr when ``progress``, else nowhere).
    Returns:
        The finished ``ImageSet``.
    """
    from store.progress import progress_bar

    src, out = Path(src), Path(out)
    if shard_size < 1:
        raise PrepareError(f"prepare: shard_size must be >= 1, got {shard_size}")
    if seed < 0:
        raise PrepareError(f"prepare: seed must be >= 0, got {seed}")
    say = echo if echo is not None else (_stderr if progress else (lambda message: None))
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    listing = list_source(src, pattern=pattern, progress=progress)

    if (out / MANIFEST).exists():
        try:
            done = ImageSet.open(out)
        except ValueError as error:
            raise PrepareError(f"prepare: {out} has a {MANIFEST} that does not open ({error}); "
                               f"delete {out} to redo it") from None
        _check_same_prepare(done, listing, shard_size=shard_size, seed=seed)
        rejected = f", {len(done.rejects)} files left out as bad" if done.rejects else ""
        say(f"prepare: {out} already holds this prepare of {src} ({len(done)} samples in "
            f"{len(done.shards)} shards{rejected}): nothing to do")
        return done

    out.mkdir(parents=True, exist_ok=True)
    removed = _remove_partials(out)
    if removed:
        say(f"prepare: {out} has no {MANIFEST} (an unfinished run): starting over, removed {removed} partial files")
    shard_dir = out / SHARD_DIR
    shard_dir.mkdir(exist_ok=True)

    # compact growing columns (1.28M Python ints per column would cost ~40 MB each)
    cols = {name: array("q" if dtype == "<i8" else "B") for name, dtype in _COLUMN_DTYPES
            if name not in ("source_end", "source_bytes")}
    sources: list[bytes] = []
    modes: list[str] = []
    exts: list[str] = []
    rejects: list[dict] = []
    shards: list[dict] = []
    writer: _ShardWriter | None = None
    order = pack_order(len(listing), seed=seed)
    bar = progress_bar(total=len(listing), desc=f"prepare {src.name}", unit="img", progress=progress,
                       dynamic_ncols=True)
    try:
        for item, (data, info, reason) in _ordered_map(_check_item, listing.items(order), workers=workers):
            bar.update(1)
            if reason is not None:
                where = str(src / item.source) if listing.kind == "imagefolder" else f"{src}/{item.source}"
                if not skip_bad:
                    raise BadImage(where, f"{reason} (use --skip-bad to leave such files out)")
                rejects.append({"source": item.source, "reason": reason})
                bar.set_postfix(rejected=len(rejects))
                continue
            index = len(sources)
            shard = index // shard_size
            if writer is None or writer.shard != shard:
                if writer is not None:
                    shards.append(writer.close())
                writer = _ShardWriter(shard_dir, shard, first=index)
            offset = writer.add(index, info.ext, data, item.label)
            for table, value in ((modes, info.mode), (exts, info.ext)):
                if value not in table:
                    table.append(value)
            for name, value in (("index", index), ("label", item.label), ("width", info.width),
                                ("height", info.height), ("shard", shard), ("offset", offset),
                                ("size", len(data)), ("orientation", info.orientation),
                                ("mode", modes.index(info.mode)), ("ext", exts.index(info.ext))):
                cols[name].append(value)
            sources.append(os.fsencode(item.source))
        if writer is not None:
            shards.append(writer.close())
    finally:
        bar.close()
    if not sources:
        raise PrepareError(f"prepare: no usable image in {src} ({len(rejects)} rejected)")

    classes = listing.classes
    if listing.kind == "webdataset" and not classes:
        classes = [listing.json_names.get(k, str(k)) for k in range(max(cols["label"]) + 1)]
    source_lengths = np.array([len(s) for s in sources], dtype=np.int64)
    columns = {name: np.frombuffer(values, dtype=np.int64 if values.typecode == "q" else np.uint8)
               for name, values in cols.items()}
    columns["source_end"] = np.cumsum(source_lengths)
    columns["source_bytes"] = np.frombuffer(b"".join(sources), dtype=np.uint8)
    blob, layout = _columns_blob(columns)
    _write_atomic(out / COLUMNS, blob)
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "num_samples": len(sources),
        "shard_size": shard_size, "key_format": "{index:09d}", "classes": classes,
        "modes": modes, "exts": exts,
        "order": {"kind": "keyed-hash", "seed": seed, "candidates": len(listing)},
        "source": {"kind": listing.kind, "root": str(src.resolve()), "num_files": listing.num_files,
                   "listing_sha256": listing.sha256, "pattern": listing.pattern},
        "columns": {"file": COLUMNS, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
                    "layout": layout},
        "shards": shards, "rejects": rejects,
    }
    meta["digest"] = _dataset_digest(meta)
    _write_atomic(out / MANIFEST, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
    rejected = f", {len(rejects)} files left out as bad (see {MANIFEST} 'rejects')" if rejects else ""
    say(f"prepare: packed {len(sources)} samples of {len(classes)} classes into {len(shards)} shards in {out}{rejected}")
    return ImageSet.open(out)


def _check_same_prepare(done: "ImageSet", listing: SourceListing, *, shard_size: int, seed: int) -> None:
    """Refuse to reuse a finished OUT that was made from another SRC listing, shard size or seed."""
    old = done.meta["source"]
    if old["kind"] != listing.kind or old["listing_sha256"] != listing.sha256:
        hint = ""
        if old.get("pattern") != listing.pattern:
            hint += f"; tars chosen by --pattern {old.get('pattern')!r} then, {listing.pattern!r} now"
        if listing.kind == "imagefolder" and old["kind"] == "imagefolder":
            before = {done.source(i) for i in range(len(done))} | {r["source"] for r in done.rejects}
            now = set(listing.names)
            added, missing = sorted(now - before), sorted(before - now)
            if added:
                hint += f"; new in SRC: {', '.join(added[:3])}{' ...' if len(added) > 3 else ''}"
            if missing:
                hint += f"; gone from SRC: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
            if not added and not missing:
                hint += "; same file names, but some sizes or modification times differ"
        raise PrepareError(
            f"prepare: {done.root} was prepared from a different source ({old['kind']}, "
            f"{old['num_files']} files, listing {old['listing_sha256'][:12]}) than {listing.root} is now "
            f"({listing.kind}, {listing.num_files} files, listing {listing.sha256[:12]}){hint}. "
            f"Prepare into a new folder, or delete {done.root} to redo it.")
    if done.meta["shard_size"] != shard_size:
        raise PrepareError(f"prepare: {done.root} was prepared with shard_size={done.meta['shard_size']}, "
                           f"not {shard_size}. Use --shard-size {done.meta['shard_size']}, or delete it to redo.")
    if done.meta["order"]["seed"] != seed:
        raise PrepareError(f"prepare: {done.root} was prepared with seed={done.meta['order']['seed']}, "
                           f"not {seed}. Use --seed {done.meta['order']['seed']}, or delete it to redo.")


def _load_columns(root: Path, meta: dict) -> dict[str, np.ndarray]:
    """Memory-map the sample table: read-only views, paged in on use (fast open, shared by forks)."""
    col_path = root / meta["columns"]["file"]
    size = col_path.stat().st_size if col_path.is_file() else "missing"
    if size != meta["columns"]["bytes"]:
        raise ValueError(f"ImageSet: {col_path} should have {meta['columns']['bytes']} bytes, found {size}")
    raw = np.memmap(col_path, dtype=np.uint8, mode="r")
    columns = {}
    for entry in meta["columns"]["layout"]:
        dtype = np.dtype(entry["dtype"])
        start = entry["offset"]
        columns[entry["name"]] = raw[start:start + entry["count"] * dtype.itemsize].view(dtype)
    missing = [name for name, _ in _COLUMN_DTYPES if name not in columns]
    if missing:
        raise ValueError(f"ImageSet: {col_path} lacks columns {missing}")
    return columns


class _OpenShards:
    """At most about ``max_open`` read-only descriptors of shard tars, least recently used
    closed first (5005 ImageNet shards would exceed the common ``ulimit -n`` of 1024).

    A descriptor is closed only while no thread is reading through it: closing one in use
    would let ``os.open`` hand its number to another shard and the pending ``pread`` would
    return that shard's bytes. So more than ``max_open`` may be open for a moment, at most
    one per concurrent reader. Thread-safe.
    """

    def __init__(self, max_open: int):
        if max_open < 1:
            raise ValueError(f"ImageSet: max_open must be >= 1, got {max_open}")
        self.max_open = max_open
        self._lock = threading.Lock()
        self._open: OrderedDict[int, list[int]] = OrderedDict()  # shard -> [fd, readers], LRU first

    def pread(self, shard: int, path: Path, size: int, offset: int) -> bytes:
        with self._lock:
            entry = self._open.get(shard)
            if entry is None:
                entry = self._open[shard] = [os.open(path, os.O_RDONLY), 0]
            else:
                self._open.move_to_end(shard)
            entry[1] += 1
            self._shrink()
        try:
            return os.pread(entry[0], size, offset)
        finally:
            with self._lock:
                entry[1] -= 1
                self._shrink()

    def _shrink(self) -> None:
        """Close idle descriptors, least recently used first, down to ``max_open`` (lock held)."""
        excess = len(self._open) - self.max_open
        if excess <= 0:
            return
        for shard in [k for k, (_, readers) in self._open.items() if readers == 0][:excess]:
            os.close(self._open.pop(shard)[0])

    def __len__(self) -> int:
        return len(self._open)

    def close(self) -> None:
        with self._lock:
            for shard in [k for k, (_, readers) in self._open.items() if readers == 0]:
                os.close(self._open.pop(shard)[0])


class ImageSet:
    """A finished ``prepare``: the sample table plus random access to the encoded images.

    ``read`` uses ``os.pread`` on cached descriptors, at most about ``max_open`` at once
    (least recently used closed first), so one ImageSet may be shared by threads and may
    read any number of shards; pickling (for DataLoader workers) drops the descriptors.
    """

    def __init__(self, root: Path, meta: dict, columns: dict[str, np.ndarray], *, max_open: int = MAX_OPEN):
        self.root = Path(root)
        self.meta = meta
        self._columns = columns
        self._files = _OpenShards(max_open)

    # --- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, root: Path | str, *, max_open: int = MAX_OPEN) -> "ImageSet":
        """Open a finished prepare; ``FileNotFoundError`` / ``ValueError`` say what is wrong.

        ``max_open``: shard descriptors kept open at once (least recently used closed first).
        """
        root = Path(root)
        manifest = root / MANIFEST
        if not root.is_dir():
            raise FileNotFoundError(f"ImageSet: {root} is not a folder (run `python cli.py prepare SRC {root}`)")
        if not manifest.is_file():
            raise FileNotFoundError(f"ImageSet: no {MANIFEST} in {root}: not a finished prepare "
                                    f"(run `python cli.py prepare SRC {root}` to finish it)")
        try:
            meta = json.loads(manifest.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"ImageSet: {manifest} is not valid JSON ({error})") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"ImageSet: {manifest} has format {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("format_version") == 1:
            raise ValueError(f"ImageSet: {manifest} has format_version 1: its samples are in source order "
                             f"(class-sorted shards for an ImageFolder); this code reads version "
                             f"{FORMAT_VERSION} (samples in a seeded shuffled order). Prepare the source "
                             f"again into a new folder: `python cli.py prepare SRC NEW_OUT`")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"ImageSet: {manifest} has format_version {meta.get('format_version')}, "
                             f"this code reads version {FORMAT_VERSION}")
        columns = _load_columns(root, meta)
        n = meta["num_samples"]
        if not np.array_equal(columns["index"], np.arange(n)):
            raise ValueError(f"ImageSet: {root / COLUMNS}: the index column is not 0..{n - 1}")
        for shard in meta["shards"]:
            path = os.path.join(root, shard["tar"])
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                size = None
            if size != shard["bytes"]:
                raise ValueError(f"ImageSet: shard {path} is missing or not {shard['bytes']} bytes long")
        return cls(root, meta, columns, max_open=max_open)

    # --- the table -------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.meta["num_samples"]

    def __repr__(self) -> str:
        return f"ImageSet({str(self.root)!r}, samples={len(self)}, classes={len(self.classes)}, shards={len(self.shards)})"

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 class label of each sample."""
        return self._columns["label"]

    @property
    def widths(self) -> np.ndarray:
        """(N,) int64 stored width in pixels (before any EXIF rotation)."""
        return self._columns["width"]

    @property
    def heights(self) -> np.ndarray:
        """(N,) int64 stored height in pixels (before any EXIF rotation)."""
        return self._columns["height"]

    @property
    def orientations(self) -> np.ndarray:
        """(N,) uint8 EXIF orientation tag (1..8), 0 where the file has none."""
        return self._columns["orientation"]

    @property
    def shard_of(self) -> np.ndarray:
        """(N,) int64 shard number of each sample."""
        return self._columns["shard"]

    @property
    def offsets(self) -> np.ndarray:
        """(N,) int64 byte offset of the image data in its shard's tar."""
        return self._columns["offset"]

    @property
    def sizes(self) -> np.ndarray:
        """(N,) int64 byte size of the encoded image."""
        return self._columns["size"]

    @property
    def shards(self) -> list[dict]:
        """Per shard: name, index, first, count (global indices [first, first + count)), tar, idx, bytes, sha256."""
        return self.meta["shards"]

    @property
    def rejects(self) -> list[dict]:
        """Files left out by ``--skip-bad``: ``{"source", "reason"}``."""
        return self.meta["rejects"]

    @property
    def digest(self) -> str:
        """sha256 of the sample table and shard contents: identifies this data for stores and runs."""
        return self.meta["digest"]

    def tar_path(self, shard: int) -> Path:
        return self.root / self.shards[shard]["tar"]

    def index_path(self, shard: int) -> Path:
        return self.root / self.shards[shard]["idx"]

    def _check(self, i) -> int:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"ImageSet {self.root}: sample {i} out of range [0, {len(self)})")
        return i

    def source(self, i: int) -> str:
        """Where sample i came from: path relative to SRC, or ``tar:member`` for WebDataset input."""
        i = self._check(i)
        end = self._columns["source_end"]
        start = int(end[i - 1]) if i > 0 else 0
        return os.fsdecode(self._columns["source_bytes"][start:int(end[i])].tobytes())

    def mode(self, i: int) -> str:
        """PIL mode of sample i as stored (``RGB``, ``L``, ``CMYK``, ``P``, ``RGBA``, ``LA``, ...)."""
        return self.meta["modes"][int(self._columns["mode"][self._check(i)])]

    def ext(self, i: int) -> str:
        """Extension of sample i's image member (``jpg``, ``png``, ...)."""
        return self.meta["exts"][int(self._columns["ext"][self._check(i)])]

    # --- reading ---------------------------------------------------------------------------
    def read(self, i: int) -> bytes:
        """Encoded image bytes of sample i, exactly as in SRC (thread-safe)."""
        i = self._check(i)
        shard, offset, size = int(self.shard_of[i]), int(self.offsets[i]), int(self.sizes[i])
        data = self._files.pread(shard, self.tar_path(shard), size, offset)
        if len(data) != size:
            raise OSError(f"ImageSet: short read of sample {i} from {self.tar_path(shard)} "
                          f"({len(data)} of {size} bytes at offset {offset}): the shard is damaged")
        return data

    def read_many(self, indices: Sequence[int] | np.ndarray) -> list[bytes]:
        """``[read(i) for i in indices]``, in the given order."""
        return [self.read(i) for i in indices]

    def verify(self, *, progress: bool = False) -> None:
        """Re-hash the sample table and every shard against the manifest; ``ValueError`` on a mismatch."""
        from store.progress import progress_bar

        if _sha256_file(self.root / self.meta["columns"]["file"]) != self.meta["columns"]["sha256"]:
            raise ValueError(f"ImageSet: {self.root / self.meta['columns']['file']} does not match its sha256")
        for shard in progress_bar(self.shards, desc="verify shards", progress=progress):
            if _sha256_file(self.root / shard["tar"]) != shard["sha256"]:
                raise ValueError(f"ImageSet: shard {self.root / shard['tar']} does not match its sha256")

    @property
    def open_files(self) -> int:
        """Shard descriptors open now (at most ``max_open`` plus one per concurrent reader)."""
        return len(self._files)

    def close(self) -> None:
        """Close the shard descriptors (reading again reopens them)."""
        self._files.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"], state["_columns"] = self._files.max_open, None  # reopened / re-mapped on unpickling
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._files = _OpenShards(state["_files"])
        self._columns = _load_columns(self.root, self.meta)
