"""``ImageSet``: a finished ``prepare`` opened for reading (the sample table, memory-mapped,
plus random access to the encoded images through a bounded set of shard descriptors).
The format: ``data/manifest.py`` and ``docs/format.md``."""
from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import google_crc32c
import numpy as np

from core.io import sha256_file
from data.manifest import COLUMNS, FORMAT, FORMAT_VERSION, MANIFEST, dataset_digest, load_columns

MAX_OPEN = 32  # shard descriptors an ImageSet keeps open (least recently used closed first)


class ImageBytes(bytes):
    """The encoded bytes of one sample, as ``ImageSet.read`` returns them, plus ``origin``:
    ``image <global index> (<source file>, in <shard tar>)``, so that a decoder that fails
    on them names the image whatever list or slice carried them there."""

    origin: str

    def __new__(cls, data: bytes, origin: str):
        self = super().__new__(cls, data)
        self.origin = origin
        return self

    def __reduce__(self):
        return ImageBytes, (bytes(self), self.origin)


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

    Opening checks the sample table against the sha256 the manifest records and the
    manifest's digest against its own contents; the shards are re-hashed by ``verify``
    (``python cli.py verify ... --rehash-data``), never on open (a full read of the data).
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

        Hashes ``manifest.columns`` (about 0.1 s per million samples) and refuses a table whose
        sha256 differs from the manifest's, or a manifest whose digest is not its own.
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
        columns = load_columns(root, meta, check_sha256=True)
        if dataset_digest(meta) != meta.get("digest"):
            raise ValueError(f"ImageSet: {manifest}: its digest is not the one of its contents (the "
                             f"manifest was edited after prepare); restore it or prepare the source again")
        if meta.get("labeled", True) != bool(meta["classes"]):   # classes are in the digest, "labeled" is not
            raise ValueError(f"ImageSet: {manifest} says labeled={meta.get('labeled')} but lists "
                             f"{len(meta['classes'])} classes (the manifest was edited after prepare)")
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
        classes = f"classes={len(self.classes)}" if self.labeled else "unlabeled"
        return f"ImageSet({str(self.root)!r}, samples={len(self)}, {classes}, shards={len(self.shards)})"

    @property
    def classes(self) -> list[str]:
        """Class names, label k is ``classes[k]`` ([] when unlabeled)."""
        return self.meta["classes"]

    @property
    def labeled(self) -> bool:
        """Whether the samples carry class labels (False: prepared from images without classes,
        tars without ``cls`` or with ``labels=none``; every label is -1, no classes)."""
        return bool(self.meta["classes"])

    def require_labels(self, task: str) -> None:
        """ValueError naming this set's folder unless it is labeled; ``task`` (e.g. "eval knn")
        is what needs the labels."""
        if self.labeled:
            return
        source = self.meta["source"]
        why = {"images": "a folder of images without class folders",
               "webdataset": "WebDataset samples without 'cls' members"}.get(source["kind"], source["kind"])
        if source.get("labels") == "none":
            why = "labels=none"
        raise ValueError(f"{task} needs labels; {self.root} was prepared without labels ({why}); prepare "
                         f"a labeled copy (class folders, or tars with 'cls' members) for it")

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 class label of each sample (-1 in an unlabeled set)."""
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
        """sha256 of the sample table and shard contents: identifies this data for stores and runs
        (``open`` checked it against the manifest's contents and the table against its sha256)."""
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
    def origin(self, i: int) -> str:
        """Sample i for messages: ``image <i> (<source file>, in <shard tar>)``."""
        i = self._check(i)
        return f"image {i} ({self.source(i)}, in {self.tar_path(int(self.shard_of[i]))})"

    def read(self, i: int) -> ImageBytes:
        """Encoded image bytes of sample i, exactly as in SRC, carrying ``origin(i)`` for the
        messages of a decoder that fails on them (thread-safe). Where the table has the
        ``crc32c`` column (every prepare since it was added), the bytes are checked against it:
        a damaged image is an OSError naming it, its source file and its shard."""
        i = self._check(i)
        shard, offset, size = int(self.shard_of[i]), int(self.offsets[i]), int(self.sizes[i])
        data = self._files.pread(shard, self.tar_path(shard), size, offset)
        if len(data) != size:
            raise OSError(f"ImageSet: short read of sample {i} from {self.tar_path(shard)} "
                          f"({len(data)} of {size} bytes at offset {offset}): the shard is damaged")
        crc = self._columns.get("crc32c")
        if crc is not None and google_crc32c.value(data) != int(crc[i]):
            raise OSError(f"ImageSet: {self.origin(i)}: its bytes differ from their crc32c in {self.root / COLUMNS} "
                          f"(the shard is damaged); restore it, or prepare the source again")
        return ImageBytes(data, self.origin(i))

    def read_many(self, indices: Sequence[int] | np.ndarray) -> list[ImageBytes]:
        """``[read(i) for i in indices]``, in the given order."""
        return [self.read(i) for i in indices]

    def verify(self, *, progress: bool = False, workers: int | None = None) -> list[str]:
        """Re-hash the sample table and every shard tar against the manifest's sha256s.

        Returns one line per file that differs or cannot be read, naming it ([] if all match).
        ``workers``: threads hashing shards at once (None: ``min(8, cpu_count)``).
        """
        from core.progress import progress_bar

        files = [(self.root / self.meta["columns"]["file"], self.meta["columns"]["sha256"])]
        files += [(self.root / shard["tar"], shard["sha256"]) for shard in self.shards]

        def problem(item: tuple[Path, str]) -> str | None:
            path, want = item
            try:
                got = sha256_file(path)
            except OSError as error:
                return f"{path}: cannot be read to re-hash it ({error.strerror or error})"
            if got != want:
                return (f"{path}: its sha256 differs from the one in {self.root / MANIFEST} "
                        f"(its bytes changed after prepare)")
            return None

        workers = min(8, os.cpu_count() or 1) if workers is None else max(1, workers)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rehash") as pool:
            found = list(progress_bar(pool.map(problem, files), total=len(files), desc="re-hash images",
                                      unit="file", progress=progress))
        return [p for p in found if p is not None]

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
        self._columns = load_columns(self.root, self.meta)
