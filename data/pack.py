"""``prepare``: pack SRC (an ImageFolder tree, a tree of unlabeled images or WebDataset tars) into
tar shards, DALI indices and a manifest, in a seeded pseudo-random permutation (``pack_order``) of
the listing order, so that every shard mixes the classes; the same SRC and seed give
byte-identical output (docs/format.md, "Images (prepare)")."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import tarfile
from array import array
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import google_crc32c
import numpy as np

from data.config import RESOLVED, PrepareConfig
from data.imageset import ImageSet
from data.imagesource import BadImage, ImageInfo, PrepareError, SourceItem, SourceListing, inspect_image, list_source
from data.manifest import (
    COLUMN_DTYPES, COLUMNS, FORMAT, FORMAT_VERSION, MANIFEST, SHARD_DIR, columns_blob, dataset_digest, sample_key,
    shard_stem,
)
from core.io import file_digests, fsync_path, remove_temp_files, write_atomic
from core.keys import Role, hash_keys

_PARTIAL = re.compile(r"shard-\d{6,}\.(tar|idx)(\.tmp\d*)?")
_ROLE_PACK_ORDER = Role.PACK_ORDER  # hash role of the packing order (21; every role: core/keys.py)


def pack_order(count: int, *, seed: int) -> np.ndarray:
    """The order ``prepare`` writes ``count`` listed candidates in: (count,) int64, a permutation.

    ``pack_order(n, seed=s)[j]`` is the listing position of the j-th candidate written:
    candidates sorted by a keyed hash of (seed, role, position), so the order depends on
    the seed and the number of candidates only, never on machine or thread count.
    Rejected candidates are skipped, so sample index i is the i-th accepted candidate.
    """
    keys = hash_keys(seed, _ROLE_PACK_ORDER, np.arange(count, dtype=np.int64))
    return np.argsort(keys, kind="stable").astype(np.int64)


class ShardWriter:
    """Writes one shard to ``*.tmp`` names and renames tar and index into place on ``close``.

    Tar members are USTAR with fixed metadata (mtime 0, uid/gid 0, empty owner names,
    mode 0644), so the bytes depend only on the samples.
    """

    def __init__(self, folder: Path, shard: int, first: int):
        self.stem = shard_stem(shard)
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

    def add(self, index: int, ext: str, data: bytes, label: int | None) -> int:
        """Append sample ``index`` (its ``cls`` member too unless ``label`` is None: the view
        tars of a feature store, store/viewpixels.py); returns the byte offset of the data."""
        key = sample_key(index)
        image_offset = self._add(f"{key}.{ext}", data)
        line = f"{ext} {image_offset} {len(data)} {key}.{ext}"
        if label is not None:
            label_bytes = str(label).encode()
            label_offset = self._add(f"{key}.cls", label_bytes)
            line += f" cls {label_offset} {len(label_bytes)} {key}.cls"
        self._index_lines.append(line)
        self.count += 1
        return image_offset

    def close(self) -> dict:
        self._tar.close()
        self._file.close()
        fsync_path(self._tmp)
        index_text = f"v1.2 {self.count}\n" + "".join(line + "\n" for line in self._index_lines)
        write_atomic(self.idx_path, index_text.encode())
        sha, self.crc32c = file_digests(self._tmp)      # crc32c: the view tars' records (viewpixels)
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
    removed = len(remove_temp_files(out))
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


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare(src: Path | str, out: Path | str, *, progress: bool = True,
            echo: Callable[[str], None] | None = None, **settings) -> "ImageSet":
    """``run_prepare`` of ``PrepareConfig(src=SRC, out=OUT, **settings)``: the keyword form, the
    settings' defaults being those of data/config.py (an unknown one is refused naming it)."""
    return run_prepare(PrepareConfig.from_dict(dict(src=str(src), out=str(out), **settings)), progress=progress,
                       echo=echo)


def run_prepare(cfg: PrepareConfig, *, progress: bool = True,
                echo: Callable[[str], None] | None = None) -> "ImageSet":
    """Pack ``cfg.src`` (ImageFolder tree, unlabeled image tree or WebDataset tars) into ``cfg.out``;
    see ``docs/format.md``.

    Args:
        cfg: the settings (data/config.py: shard size, seed, WebDataset pattern, labels, skip_bad,
            workers). OUT is created. If it holds a finished prepare of the same SRC listing,
            nothing is done; of a different SRC, shard size or seed, ``PrepareError``. Without
            ``manifest.json`` it is a half-written run and is redone from scratch. A prepare
            that packs writes ``cfg`` as ``OUT/prepare.yaml`` before its manifest.
        progress: tqdm progress bar.
        echo: where status messages go (None: stderr when ``progress``, else nowhere).
    Returns:
        The finished ``ImageSet``.
    """
    from core.progress import progress_bar

    src, out = Path(cfg.src), Path(cfg.out)
    shard_size, seed, pattern, skip_bad = cfg.shard_size, cfg.seed, cfg.pattern, cfg.skip_bad
    say = echo if echo is not None else (_stderr if progress else (lambda message: None))
    workers = min(8, os.cpu_count() or 1) if cfg.workers is None else cfg.workers
    listing = list_source(src, pattern=pattern, labels=cfg.labels, progress=progress)

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
    cols = {name: array("q" if dtype == "<i8" else "B") for name, dtype in COLUMN_DTYPES
            if name not in ("source_end", "source_bytes")}
    cols["crc32c"] = array("L")
    sources: list[bytes] = []
    modes: list[str] = []
    exts: list[str] = []
    rejects: list[dict] = []
    shards: list[dict] = []
    writer: ShardWriter | None = None
    order = pack_order(len(listing), seed=seed)
    bar = progress_bar(total=len(listing), desc=f"prepare {src.name}", unit="img", progress=progress,
                       dynamic_ncols=True)
    try:
        for item, (data, info, reason) in _ordered_map(_check_item, listing.items(order), workers=workers):
            bar.update(1)
            if reason is not None:
                where = str(src / item.source) if listing.kind != "webdataset" else f"{src}/{item.source}"
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
                writer = ShardWriter(shard_dir, shard, first=index)
            offset = writer.add(index, info.ext, data, item.label if listing.labeled else None)
            for table, value in ((modes, info.mode), (exts, info.ext)):
                if value not in table:
                    table.append(value)
            for name, value in (("index", index), ("label", item.label), ("width", info.width),
                                ("height", info.height), ("shard", shard), ("offset", offset),
                                ("size", len(data)), ("orientation", info.orientation),
                                ("mode", modes.index(info.mode)), ("ext", exts.index(info.ext)),
                                ("crc32c", google_crc32c.value(data))):
                cols[name].append(value)
            sources.append(os.fsencode(item.source))
        if writer is not None:
            shards.append(writer.close())
    finally:
        bar.close()
    if not sources:
        raise PrepareError(f"prepare: no usable image in {src} ({len(rejects)} rejected)")

    classes = listing.classes
    if listing.kind == "webdataset" and listing.labeled and not classes:
        classes = [listing.json_names.get(k, str(k)) for k in range(max(cols["label"]) + 1)]
    source_lengths = np.array([len(s) for s in sources], dtype=np.int64)
    columns = {name: np.asarray(values, dtype={"q": np.int64, "B": np.uint8, "L": np.uint32}[values.typecode])
               for name, values in cols.items()}
    columns["source_end"] = np.cumsum(source_lengths)
    columns["source_bytes"] = np.frombuffer(b"".join(sources), dtype=np.uint8)
    blob, layout = columns_blob(columns)
    write_atomic(out / COLUMNS, blob)
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "num_samples": len(sources),
        "shard_size": shard_size, "key_format": "{index:09d}", "classes": classes, "labeled": listing.labeled,
        "modes": modes, "exts": exts,
        "order": {"kind": "keyed-hash", "seed": seed, "candidates": len(listing)},
        "source": {"kind": listing.kind, "root": str(src.resolve()), "num_files": listing.num_files,
                   "listing_sha256": listing.sha256, "pattern": listing.pattern, "labels": cfg.labels},
        "columns": {"file": COLUMNS, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
                    "layout": layout},
        "shards": shards, "rejects": rejects,
    }
    meta["digest"] = dataset_digest(meta)
    write_atomic(out / RESOLVED, cfg.to_yaml().encode())
    write_atomic(out / MANIFEST, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
    rejected = f", {len(rejects)} files left out as bad (see {MANIFEST} 'rejects')" if rejects else ""
    what = f"of {len(classes)} classes" if listing.labeled else "without labels"
    say(f"prepare: packed {len(sources)} samples {what} into {len(shards)} shards in {out}{rejected}")
    return ImageSet.open(out)


def _check_same_prepare(done: "ImageSet", listing: SourceListing, *, shard_size: int, seed: int) -> None:
    """Refuse to reuse a finished OUT that was made from another SRC listing, labeling, shard size or seed."""
    old = done.meta["source"]
    if done.labeled != listing.labeled:
        said = {True: "with labels", False: "without labels"}
        raise PrepareError(f"prepare: {done.root} was prepared {said[done.labeled]} (a {old['kind']} source), this "
                           f"prepare of {listing.root} would be {said[listing.labeled]} (a {listing.kind} source): "
                           f"prepare into a new folder, or delete {done.root} to redo it")
    if old["kind"] != listing.kind or old["listing_sha256"] != listing.sha256:
        hint = ""
        if old.get("pattern") != listing.pattern:
            hint += f"; tars chosen by --pattern {old.get('pattern')!r} then, {listing.pattern!r} now"
        if listing.kind == old["kind"] != "webdataset":
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
