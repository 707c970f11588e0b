"""The teacher-feature store: a zarr v3 group, one sub-group per teacher (store/teacherstore.py),
laid out as docs/format.md "Features (extract)" describes (slots, chunks, checksums). The root and
each group are created whole or not at all (``create_group_whole``) and their metadata checked
before anything is read (store/metadata.py); a (slot, image shard) block exists for readers only
once its files are written, fsync'ed and marked in ``complete``."""
from __future__ import annotations

import glob
import json
import math
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.storage import MemoryStore

from core.io import fsync_path, fsync_tree
from store import codecs
from store.checksums import PAYLOAD_COMPRESSORS, SMALL_COMPRESSORS, STATS_DTYPES
from core.errors import StoreError
from store.metadata import array_problems, config_problems, root_problems
# the teacher group's names, re-exported: the store's readers import them from here
from store.teacherstore import (CONFIG_DEFAULTS, SAMPLE_KEYS, TEACHER_INPUTS, TeacherStore,  # noqa: F401
                                 teacher_input, with_defaults)

FORMAT = "comad-features"
FORMAT_VERSION = 3
# Versions this code opens (docs/format.md): 1 is 2 without view pixels, read as it is and raised
# to 2 when view pixels are first written into it; 2 is 3 without checksums on the arrays and the
# statistics, read as it is (``verify`` notes what is unprotected).
READABLE_VERSIONS = (1, 2, 3)
PIXELS_VERSION = 2         # the version that added view pixels
CHECKSUMS_VERSION = 3      # the version that added the checksums
PIXELS = "pixels"          # the view pixels' group (store/viewpixels.py), never a teacher's name
# Samples per inner chunk of the token arrays, stored uncompressed: zstd saves little on tokens
# and costs read throughput, as do chunks of one sample (docs/performance.md, "Extraction");
# the small arrays keep zstd.
INNER_CHUNK = 16


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


def _unfinished_root(path: Path) -> bool:
    """Whether ``path`` holds only a root zarr.json without attributes: what an extract of
    format_version 2 or older left when killed between creating the root and writing them."""
    try:
        if {p.name for p in path.iterdir()} != {"zarr.json"}:
            return False
        meta = json.loads((path / "zarr.json").read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and not meta.get("attributes")


def _open_array(group: zarr.Group, key: str, where: Path) -> zarr.Array:
    """The array ``key`` of the teacher group ``group`` (at ``where``): its metadata only."""
    file = where / key / "zarr.json"
    try:
        return group[key]
    except KeyError:
        raise StoreError(f"{file}: missing (the teacher group is incomplete); rerun `python cli.py extract` "
                         "of this teacher, or extract it into a new store") from None
    except (ValueError, TypeError) as error:
        raise StoreError(f"{file}: not the metadata of a zarr v3 array ({error})") from error


def create_group_whole(path: Path, attributes: dict, build=None, *, root: Path) -> None:
    """Create the zarr group ``path`` (the store ``root`` itself, or a group in it) whole or not
    at all, unless it exists: the group with ``attributes``, and what ``build(group)`` adds to
    it, is written into a new folder beside the store, ``<root>.<name>.creating-<host>-<pid>``,
    fsync'ed, and renamed into place (the root: its zarr.json hard-linked in, which fails if
    another process made one meanwhile). A kill or a full disk leaves no part of the group,
    only that folder, which the next call for ``path`` removes. OSError if it cannot be made."""
    name = root.name if path == root else f"{root.name}.{path.relative_to(root)}"
    prefix = f"{name}.creating-"
    if not (path / "zarr.json").exists():
        tmp = root.parent / f"{prefix}{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            group = zarr.create_group(store=str(tmp), zarr_format=3, attributes=attributes)
            if build is not None:
                build(group)
            fsync_tree(tmp)
            if path == root:
                path.mkdir(parents=True, exist_ok=True)
                os.link(tmp / "zarr.json", path / "zarr.json")
            else:
                os.rename(tmp, path)
            fsync_path(path if path == root else path.parent)
        except OSError:
            if not (path / "zarr.json").exists():      # else another process created it meanwhile
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    for stale in root.parent.glob(f"{glob.escape(prefix)}*"):
        shutil.rmtree(stale, ignore_errors=True)


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
        self._teacher_stores: dict[str, TeacherStore] = {}     # opened and checked once (``teacher``)

    # -- opening ----------------------------------------------------------------------
    @classmethod
    def create_or_open(cls, path, *, data: DataInfo, views: int, seed: int) -> "FeatureStore":
        """Open the store at ``path`` for this data, views and seed, creating it (whole, or not
        at all: ``create_group_whole``) where there is none."""
        path = Path(path)
        if _unfinished_root(path):
            (path / "zarr.json").unlink()           # nothing was written below it: start again
        attrs = {"format": FORMAT, "format_version": FORMAT_VERSION,
                 "data_digest": data.digest, "num_samples": data.num_samples,
                 "views": int(views), "seed": int(seed), "shards": data.shards}
        problems = root_problems(attrs)
        if problems and not (path / "zarr.json").exists():
            raise StoreError(f"{path}: cannot create a store with " + "; ".join(problems))
        try:
            create_group_whole(path, attrs, root=path)
        except OSError as error:
            raise StoreError(f"{path}: could not create the store ({error}); rerun once the cause is "
                             "fixed (a full disk, permissions): it starts the creation again") from error
        return cls.open(path, data=data, views=views, seed=seed)

    @classmethod
    def open(cls, path, *, data: DataInfo | None = None, views: int | None = None,
             seed: int | None = None) -> "FeatureStore":
        path = Path(path)
        if not (path / "zarr.json").exists():
            raise StoreError(f"{path}: no feature store here (no zarr.json); run `python cli.py extract` first")
        if _unfinished_root(path):
            raise StoreError(f"{path}: a store whose creation was interrupted (its zarr.json has no attributes "
                             "and nothing below it); rerun `python cli.py extract` to create it")
        try:
            group = zarr.open_group(store=str(path), mode="a", zarr_format=3)
        except (ValueError, TypeError, KeyError) as error:
            raise StoreError(f"{path / 'zarr.json'}: not the metadata of a zarr v3 group ({error})") from error
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
        problems = root_problems(a)
        if problems:
            raise StoreError(f"{path / 'zarr.json'}: " + "; ".join(problems) + " (a damaged or altered store root; "
                             "extract into a new store)")
        stored = {k: a.get(k) for k in wanted}
        problems = _diff(stored, wanted)
        if problems:
            raise StoreError(f"{path}: store does not match this run/data:\n  " + "\n  ".join(problems))
        return cls(path, group)

    def upgrade_format(self) -> None:
        """Raise a version-1 store to 2, the version that added view pixels (before adding them;
        its arrays stay as they are, so not to 3)."""
        if self.group.attrs.get("format_version") == 1:
            self.group.attrs["format_version"] = PIXELS_VERSION
            fsync_tree(self.path / "zarr.json")

    # -- teachers ---------------------------------------------------------------------
    @property
    def teachers(self) -> list[str]:
        return sorted(name for name, _ in self.group.groups() if name != PIXELS)

    def teacher(self, name: str) -> "TeacherStore":
        """The teacher's group, its metadata checked (``_check_teacher``) on its first open from
        this FeatureStore; later calls return the same TeacherStore."""
        if name not in self._teacher_stores:
            if name not in self.teachers:
                raise StoreError(f"{self.path}: no teacher {name!r} in this store (has {self.teachers})")
            group = self.group[name]
            self._check_teacher(name, group)
            self._teacher_stores[name] = TeacherStore(self, group)
        return self._teacher_stores[name]

    def create_teacher(self, name: str, config: dict) -> "TeacherStore":
        """Create the teacher's arrays (whole, or not at all: ``create_group_whole``), or open
        them and check the config is the same. A teacher whose ``input`` is not the store's other
        teachers' is refused before anything is written."""
        config = _jsonable(dict(config, teacher=name, views=self.views, seed=self.seed))
        self._check_input(name, config.get("input", CONFIG_DEFAULTS["input"]))
        path = self.path / name
        if name in self.teachers and not (path / "complete" / "zarr.json").exists():
            shutil.rmtree(path)     # an older writer killed while creating it: no block of it is complete
        if name not in self.teachers:
            problems = config_problems(dict(CONFIG_DEFAULTS, **config), name=name, views=self.views,
                                       seed=self.seed, inputs=TEACHER_INPUTS)
            if problems:
                raise StoreError(f"{path}: cannot create a teacher with " + "; ".join(problems))
        try:
            create_group_whole(path, {"config": config, "stats_complete": False},
                               lambda g: self._teacher_arrays(g, config), root=self.path)
        except OSError as error:
            raise StoreError(f"{path}: could not create the teacher's group ({error}); rerun once the cause is "
                             "fixed (a full disk, permissions): it starts the creation again") from error
        ts = self.teacher(name)
        problems = _diff(with_defaults(ts.config), with_defaults(config))
        if problems:
            raise StoreError(f"{self.path}/{name}: exists with another configuration "
                             "(use a new store or the same settings):\n  " + "\n  ".join(problems))
        return ts

    def _check_input(self, name: str, wanted: str) -> None:
        """The pixels a store's teachers run on are one (docs/format.md, "Teachers' input"):
        StoreError if ``name`` would run on ``wanted`` and another teacher on other pixels."""
        configs = {t: self.group[t].attrs.get("config") for t in self.teachers if t != name}
        others = {t: dict(CONFIG_DEFAULTS, **c)["input"] for t, c in configs.items() if isinstance(c, dict)}
        differ = {t: i for t, i in others.items() if i != wanted}
        if differ:
            raise StoreError(f"{self.path}: teacher {name!r} would run on {wanted} pixels but the store's "
                             f"{', '.join(map(repr, differ))} ran on {', '.join(sorted(set(differ.values())))} "
                             "(docs/format.md \"Teachers' input\"); extract with --view-pixels jpeg for jpeg, "
                             "none or raw for source, or into a new store")

    def _check_teacher(self, name: str, group: zarr.Group) -> None:
        """StoreError naming the file unless the group's config is sane and agrees with the
        root, and every array (statistics included) has the shape, dtype and chunks that
        ``_teacher_arrays`` gives for them: checked on metadata only, before anything is read."""
        where = self.path / name
        config = group.attrs.get("config")
        problems = (config_problems(dict(CONFIG_DEFAULTS, **config), name=name, views=self.views, seed=self.seed,
                                    inputs=TEACHER_INPUTS) if isinstance(config, dict) else ["no config"])
        if problems:
            raise StoreError(f"{where / 'zarr.json'}: teacher config: " + "; ".join(problems)
                             + " (a damaged or altered store; extract this teacher into a new store)")
        config = dict(CONFIG_DEFAULTS, **config)
        layout = zarr.create_group(store=MemoryStore(), zarr_format=3)
        self._teacher_arrays(layout, config)
        checks = [(key, want, ("shape", "dtype", "chunks", "shards")) for key, want in layout.arrays()]
        if group.attrs.get("stats_complete"):
            width = int(config["embed_dim"])
            for key, shape in (("mean", (width,)), ("components", (width, width)), ("eigenvalues", (width,)),
                               ("indices", None)):
                got = _open_array(group, f"stats/{key}", where)
                want = layout.create_array(key, shape=shape or got.shape[:1], dtype=STATS_DTYPES[key])
                checks.append((f"stats/{key}", want, ("shape", "dtype")))
        for key, want, fields in checks:
            problems = array_problems(_open_array(group, key, where), want, fields)
            if problems:
                raise StoreError(f"{where / key / 'zarr.json'}: {problems[0]} (a damaged or altered store; "
                                 "extract this teacher into a new store)")

    def _teacher_arrays(self, g: zarr.Group, config: dict) -> None:
        """Create in ``g`` the empty arrays of a teacher of ``config`` in this store (the module
        docstring's layout); metadata only, nothing is allocated."""
        V, N, S = self.views, self.num_samples, self.shard_size
        n, T = int(config["n_visible"]), int(config["n_visible"]) + 1

        def per_sample(key, shape, dtype, inner_chunks=False):
            kw = dict(shape=(V, N, *shape), dtype=dtype, fill_value=0)
            if inner_chunks:   # token payload: one zarr shard per block, uncompressed inner chunks
                kw.update(chunks=(1, math.gcd(S, INNER_CHUNK), *shape), shards=(1, S, *shape),
                          compressors=PAYLOAD_COMPRESSORS)
            else:
                kw.update(chunks=(1, S, *shape), compressors=SMALL_COMPRESSORS)
            g.create_array(key, **kw)

        per_sample("index", (), "int64")
        per_sample("view", (), "int16")
        per_sample("boxes", (4,), "int32")
        per_sample("flips", (), "bool")
        per_sample("visible", (n,), "int16")
        for key, (shape, dtype) in codecs.payload_arrays(
                config["codec"], (T, int(config.get("embed_dim", CONFIG_DEFAULTS["embed_dim"]))), pca_dim=int(config.get("pca_dim", codecs.PCA_DIM))).items():
            per_sample(key, shape, dtype, inner_chunks=True)
        g.create_array("complete", shape=(V, len(self.shards)), chunks=(1, 1), dtype="int32", fill_value=0,
                       compressors=SMALL_COMPRESSORS)
