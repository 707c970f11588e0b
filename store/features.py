"""The teacher-feature store: a zarr v3 group, one sub-group per teacher (docs/format.md).

Layout (V views, N images, image shards of S, T = 1 + n_k tokens, C = the teacher's width,
its config's ``embed_dim``: 768 for a ViT-B, 1024 for a ViT-L)::

    STORE/                      attrs: format, format_version, data_digest, num_samples,
                                       views, seed, shards [[first, count], ...]
      <teacher>/                attrs: config {...}, stats_complete
        index     (V, N)        int64   global image index of each row (join key)
        view      (V, N)        int16   view number v of each row
        boxes     (V, N, 4)     int32   crop [x, y, w, h] in original pixels
        flips     (V, N)        bool
        visible   (V, N, n_k)   int16   the teacher's visible patch ids, ascending
        tokens    (V, N, T, C)  float16 | int8      (codec)   CLS first, then visible patches
        scale     (V, N, T)     float16             (int8 codec)
        coeffs    (V, N, T, P)  float16             (pca codec)
        complete  (V, n_shards) int32   samples written; == expected count means complete
        stats/mean (C,)  stats/components (C, C)  stats/eigenvalues (C,)   float32
        stats/indices (n,) int64   the images of the statistics sample (views.stats_sample)

Row (s, i) of every (V, N, ...) array holds view v = (s + i) mod V of image i (a "slot";
store/views.py), so epoch e reads slot e mod V only and reads it by whole shards.
Every per-sample array is chunked (1, S, ...) along the image axis, aligned with the
image shards; token arrays are zarr shards of (1, S, T, C) with uncompressed inner chunks
of 16 samples, so a whole image shard is one file and a few samples can still be read alone.

A (slot, image shard) is written in one call per array, its files are fsync'ed, and only
then is ``complete[slot, shard]`` set: a shard not marked complete does not exist for
readers, and a killed writer leaves nothing a reader would trust.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from store import codecs
from store.errors import ExpectedError
from store.teachers import VIT_B_WIDTH

FORMAT = "comad-features"
FORMAT_VERSION = 2
# Versions this code opens: 1 is 2 without view pixels (docs/format.md), read as it is and
# raised to 2 when view pixels are first written into it.
READABLE_VERSIONS = (1, 2)
PIXELS = "pixels"          # the view pixels' group (store/viewpixels.py), never a teacher's name
# Samples per inner chunk of the token arrays. zstd saves only 6-10% on float16/int8 tokens
# but costs ~40% of read throughput, and one chunk per sample doubles the per-chunk cost
# (measured with zarr-python 3.1 on 256 x 138 x 768 blocks: 1875 img/s with one zstd chunk
# per sample, 4465 img/s with uncompressed chunks of 16); the small arrays keep zstd.
INNER_CHUNK = 16
# Teacher config keys added after stores were written, with what a store without them means:
# ``input``, the pixels the teacher ran on (``source``: the decoded source crop; ``jpeg``: that
# crop after the store's JPEG view round trip, docs/format.md "View pixels"); ``embed_dim``, its
# token width (every teacher of those stores was a ViT-B).
CONFIG_DEFAULTS = {"input": "source", "embed_dim": VIT_B_WIDTH}
TEACHER_INPUTS = ("source", "jpeg")


def teacher_input(view_form: str | None) -> str:
    """What a teacher runs on in a store whose view pixels are ``view_form`` (None: none):
    JPEG views are lossy, so it runs on them as decoded; raw views are the crops exactly."""
    return "jpeg" if view_form == "jpeg" else "source"


class StoreError(ExpectedError, RuntimeError):
    """A store that is missing, incomplete, or does not match what the caller expects."""


def _diff(stored: dict, wanted: dict) -> list[str]:
    keys = sorted(set(stored) | set(wanted))
    return [f"{k}: store has {stored.get(k)!r}, expected {wanted.get(k)!r}"
            for k in keys if stored.get(k) != wanted.get(k)]


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, (np.integer,)):
            v = int(v)
        elif isinstance(v, (np.floating,)):
            v = float(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


def _fsync_tree(path: Path) -> None:
    """fsync every file below ``path`` (one chunk or shard directory) and the directories."""
    if path.is_file():
        paths = [path]
    else:
        paths = [p for p in path.rglob("*") if p.is_file()]
    dirs = {p.parent for p in paths}
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for d in dirs:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass
class DataInfo:
    """What a store is checked against: the packed images (store/shards.ImageSet)."""
    digest: str
    num_samples: int
    shards: list  # [[first, count], ...]

    @classmethod
    def of(cls, data) -> "DataInfo":
        return cls(digest=data.digest, num_samples=len(data),
                   shards=[[int(s["first"]), int(s["count"])] for s in data.shards])


class FeatureStore:
    """The root of a store: data identity, views, seed, and the teacher groups."""

    def __init__(self, path: Path, group: zarr.Group):
        self.path = Path(path)
        self.group = group
        a = group.attrs.asdict()
        self.views = int(a["views"])
        self.seed = int(a["seed"])
        self.num_samples = int(a["num_samples"])
        self.data_digest = a["data_digest"]
        self.shards = [tuple(s) for s in a["shards"]]
        self.shard_size = max(c for _, c in self.shards) if self.shards else 0

    # -- opening ----------------------------------------------------------------------
    @classmethod
    def create_or_open(cls, path, *, data: DataInfo, views: int, seed: int) -> "FeatureStore":
        path = Path(path)
        if (path / "zarr.json").exists():
            return cls.open(path, data=data, views=views, seed=seed)
        sizes = {c for _, c in data.shards[:-1]}
        if len(sizes) > 1:
            raise StoreError(f"image shards must all hold the same count but the last; got {sorted(sizes)}")
        group = zarr.open_group(store=str(path), mode="a", zarr_format=3)
        group.attrs.update({
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "data_digest": data.digest, "num_samples": data.num_samples,
            "views": int(views), "seed": int(seed), "shards": data.shards,
        })
        return cls(path, group)

    @classmethod
    def open(cls, path, *, data: DataInfo | None = None, views: int | None = None,
             seed: int | None = None) -> "FeatureStore":
        path = Path(path)
        if not (path / "zarr.json").exists():
            raise StoreError(f"{path}: no feature store here (no zarr.json); run `python cli.py extract` first")
        group = zarr.open_group(store=str(path), mode="a", zarr_format=3)
        a = group.attrs.asdict()
        if a.get("format") != FORMAT:
            raise StoreError(f"{path}: not a CoMAD feature store (format={a.get('format')!r})")
        if a.get("format_version") not in READABLE_VERSIONS:
            raise StoreError(f"{path}: store format_version {a.get('format_version')!r} is not one this code "
                             f"reads ({', '.join(map(str, READABLE_VERSIONS))}); update the code to the "
                             "version that wrote it, or extract into a new store")
        wanted, stored = {}, {}
        if data is not None:
            wanted.update(data_digest=data.digest, num_samples=data.num_samples, shards=data.shards)
        if views is not None:
            wanted["views"] = int(views)
        if seed is not None:
            wanted["seed"] = int(seed)
        stored = {k: a.get(k) for k in wanted}
        problems = _diff(stored, wanted)
        if problems:
            raise StoreError(f"{path}: store does not match this run/data:\n  " + "\n  ".join(problems))
        return cls(path, group)

    def upgrade_format(self) -> None:
        """Raise a version-1 store to the current version (before adding view pixels)."""
        if self.group.attrs.get("format_version") != FORMAT_VERSION:
            self.group.attrs["format_version"] = FORMAT_VERSION
            _fsync_tree(self.path / "zarr.json")

    # -- teachers ---------------------------------------------------------------------
    @property
    def teachers(self) -> list[str]:
        return sorted(name for name, _ in self.group.groups() if name != PIXELS)

    def teacher(self, name: str) -> "TeacherStore":
        if name not in self.teachers:
            raise StoreError(f"{self.path}: no teacher {name!r} in this store (has {self.teachers})")
        return TeacherStore(self, self.group[name])

    def create_teacher(self, name: str, config: dict) -> "TeacherStore":
        """Create the teacher's arrays, or open them and check the config is the same."""
        config = _jsonable(dict(config, teacher=name, views=self.views, seed=self.seed))
        if name in self.teachers:
            ts = self.teacher(name)
            problems = _diff(dict(CONFIG_DEFAULTS, **ts.config), config)
            if problems:
                raise StoreError(f"{self.path}/{name}: exists with another configuration "
                                 "(use a new store or the same settings):\n  " + "\n  ".join(problems))
            return ts
        V, N, S = self.views, self.num_samples, self.shard_size
        n, T = int(config["n_visible"]), int(config["n_visible"]) + 1
        g = self.group.create_group(name, attributes={"config": config, "stats_complete": False})
        zstd = ZstdCodec(level=1)

        def per_sample(key, shape, dtype, inner_chunks=False):
            kw = dict(shape=(V, N, *shape), dtype=dtype, fill_value=0)
            if inner_chunks:   # token payload: one zarr shard per block, uncompressed inner chunks
                kw.update(chunks=(1, math.gcd(S, INNER_CHUNK), *shape), shards=(1, S, *shape), compressors=None)
            else:
                kw.update(chunks=(1, S, *shape), compressors=zstd)
            g.create_array(key, **kw)

        per_sample("index", (), "int64")
        per_sample("view", (), "int16")
        per_sample("boxes", (4,), "int32")
        per_sample("flips", (), "bool")
        per_sample("visible", (n,), "int16")
        for key, (shape, dtype) in codecs.payload_arrays(
                config["codec"], (T, int(config.get("embed_dim", CONFIG_DEFAULTS["embed_dim"]))), pca_dim=int(config.get("pca_dim", codecs.PCA_DIM))).items():
            per_sample(key, shape, dtype, inner_chunks=True)
        g.create_array("complete", shape=(V, len(self.shards)), chunks=(1, 1), dtype="int32", fill_value=0)
        return TeacherStore(self, g)


class TeacherStore:
    """One teacher's arrays: write whole (slot, image shard) blocks, read them back."""

    def __init__(self, root: FeatureStore, group: zarr.Group):
        self.root = root
        self.group = group
        self.config = dict(group.attrs["config"])
        self.name = self.config["teacher"]
        self.input = self.config.get("input", CONFIG_DEFAULTS["input"])
        self.width = int(self.config.get("embed_dim", CONFIG_DEFAULTS["embed_dim"]))    # token channels C
        self.codec = self.config["codec"]
        self.n_visible = int(self.config["n_visible"])
        self.payload_keys = list(codecs.payload_arrays(
            self.codec, (self.n_visible + 1, self.width),
            pca_dim=int(self.config.get("pca_dim", codecs.PCA_DIM))))
        self._stats = None

    @property
    def path(self) -> Path:
        return self.root.path / self.name

    # -- completion -------------------------------------------------------------------
    def expected(self) -> np.ndarray:
        return np.array([c for _, c in self.root.shards], dtype=np.int64)

    def complete_matrix(self) -> np.ndarray:
        """(V, n_shards) bool: which (slot, shard) blocks are complete."""
        return self.group["complete"][...] == self.expected()[None, :]

    def is_complete(self, slot: int, shard: int) -> bool:
        return int(self.group["complete"][slot, shard]) == self.root.shards[shard][1]

    def missing(self) -> list[tuple[int, int]]:
        done = self.complete_matrix()
        return [(int(s), int(k)) for s, k in zip(*np.nonzero(~done))]

    def require_complete(self) -> None:
        missing = self.missing()
        if missing:
            show = ", ".join(f"(slot {s}, shard {k})" for s, k in missing[:5])
            raise StoreError(f"{self.path}: {len(missing)} of {self.complete_matrix().size} blocks are "
                             f"incomplete, e.g. {show}; resume `python cli.py extract` first")

    # -- statistics (adapter initialisation, pca codec) ---------------------------------
    def write_stats(self, mean: np.ndarray, components: np.ndarray, eigenvalues: np.ndarray,
                    count: int, *, indices, origin: dict | None = None) -> None:
        """mean (C,), components (C, C) rows = principal directions by decreasing variance,
        eigenvalues (C,); count: tokens used; indices (n,): the images whose slot-0 tokens
        they came from (``views.stats_sample``), recorded so a reader can check the sample;
        ``origin``: None for this store's own sample, else {store, data_digest, basis} of the
        store they were copied from (their indices are that store's images)."""
        indices = np.asarray(indices)
        if indices.ndim != 1 or indices.dtype.kind not in "iu":
            raise StoreError(f"{self.path}: statistics indices must be a 1-D integer array, "
                             f"got {indices.dtype} {indices.shape}")
        if np.shape(mean) != (self.width,) or np.shape(components)[1:] != (self.width,):
            raise StoreError(f"{self.path}: statistics of mean {np.shape(mean)} and components "
                             f"{np.shape(components)} for tokens {self.width} wide")
        s = self.group.require_group("stats")
        for key, arr in (("mean", mean), ("components", components), ("eigenvalues", eigenvalues)):
            s.create_array(key, data=np.ascontiguousarray(arr, dtype=np.float32), overwrite=True)
        s.create_array("indices", data=indices.astype(np.int64), overwrite=True)
        s.attrs["count"] = int(count)
        s.attrs["origin"] = origin
        _fsync_tree(self.path / "stats")
        self.group.attrs["stats_complete"] = True
        self._stats = None

    @property
    def has_stats(self) -> bool:
        return bool(self.group.attrs.get("stats_complete", False))

    @property
    def stats(self) -> dict:
        if not self.has_stats:
            raise StoreError(f"{self.path}: teacher statistics were never written")
        if self._stats is None:
            s = self.group["stats"]
            self._stats = {k: s[k][...] for k in ("mean", "components", "eigenvalues")}
            self._stats["count"] = int(s.attrs["count"])
            # None for a store written before the sample was recorded (verify reports it)
            self._stats["indices"] = s["indices"][...] if "indices" in s else None
            self._stats["origin"] = s.attrs.get("origin")
        return self._stats

    @property
    def pca(self) -> dict | None:
        """What the ``pca`` and ``adapter`` codecs encode with (store/codecs.py), else None."""
        if self.codec not in codecs.NEEDS_STATS:
            return None
        return codecs.statistics(self.codec, self.stats, pca_dim=int(self.config["pca_dim"]))

    # -- writing ----------------------------------------------------------------------
    def _rows(self, shard: int) -> slice:
        first, count = self.root.shards[shard]
        return slice(first, first + count)

    def write_block(self, slot: int, shard: int, *, index, view, boxes, flips, visible,
                    payload: dict[str, np.ndarray]) -> None:
        """Write one whole (slot, image shard) block, make it durable, then mark it complete.

        index, view, flips: (n,); boxes: (n, 4); visible: (n, n_k); payload: codec arrays (n, T, ...).
        """
        rows = self._rows(shard)
        n = rows.stop - rows.start
        index = np.asarray(index)
        if index.shape != (n,) or not np.array_equal(index, np.arange(rows.start, rows.stop)):
            raise StoreError(f"{self.path}: block (slot {slot}, shard {shard}) must hold images "
                             f"{rows.start}..{rows.stop - 1} in order")
        if sorted(payload) != sorted(self.payload_keys):
            raise StoreError(f"codec {self.codec} stores {self.payload_keys}, got {sorted(payload)}")
        arrays = dict(index=index.astype(np.int64), view=np.asarray(view, np.int16),
                      boxes=np.asarray(boxes, np.int32), flips=np.asarray(flips, bool),
                      visible=np.asarray(visible, np.int16), **payload)
        for key, value in arrays.items():
            self.group[key][slot, rows] = value
        for key in arrays:
            _fsync_tree(self.path / key / "c" / str(slot) / str(shard))
        self.group["complete"][slot, shard] = n
        _fsync_tree(self.path / "complete" / "c" / str(slot) / str(shard))

    # -- reading ----------------------------------------------------------------------
    def read_block(self, slot: int, shard: int) -> dict[str, np.ndarray]:
        """One complete (slot, image shard) block: index, view, boxes, flips, visible, payload."""
        if not self.is_complete(slot, shard):
            raise StoreError(f"{self.path}: block (slot {slot}, shard {shard}) is not complete")
        rows = self._rows(shard)
        return {key: self.group[key][slot, rows]
                for key in ("index", "view", "boxes", "flips", "visible", *self.payload_keys)}

    def read_samples(self, slot: int, indices) -> dict[str, np.ndarray]:
        """Random access to a few samples (inspect, tests); not for the training hot path."""
        indices = np.asarray(indices, dtype=np.int64)
        shards = np.searchsorted([f for f, _ in self.root.shards], indices, side="right") - 1
        for k in np.unique(shards):
            if not self.is_complete(slot, int(k)):
                raise StoreError(f"{self.path}: block (slot {slot}, shard {int(k)}) is not complete")
        return {key: self.group[key].get_orthogonal_selection((slot, indices))
                for key in ("index", "view", "boxes", "flips", "visible", *self.payload_keys)}

    def decode(self, payload: dict, *, device=None):
        """Stored payload (..., T, ...) -> float32 torch tokens (..., T, C) on ``device``."""
        return codecs.decode(self.codec, payload, pca=self.pca, device=device)
