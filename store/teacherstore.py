"""One teacher's group of a feature store (store/features.py holds the root): its config's
defaults, whole (slot, image shard) blocks written and read back under their checksums, and its
statistics."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import zarr

from core.io import fsync_tree
from store import codecs
from data import views as V
from store.checksums import MAY_BE_SKIPPED, SMALL_COMPRESSORS, STATS_DTYPES, WRITE, failure, has_crc32c, stats_digest
from core.errors import StoreError
from teachers.descriptors import DESCRIPTORS, VIT_B_WIDTH, TeacherDescriptor, register
from teachers.vit import default_build

SAMPLE_KEYS = ("index", "view", "boxes", "flips", "visible")    # every teacher's; then its payload
# Teacher config keys added after stores were written, with what a store without them means:
# ``input``, the pixels the teacher ran on (``source``: the decoded source crop; ``jpeg``: that
# crop after the store's JPEG view round trip, docs/format.md "View pixels"); ``embed_dim``, its
# token width (every teacher of those stores was a ViT-B); ``build``, what rebuilds the teacher
# (teachers/vit.py default_build): None, its descriptor's default build, seeded with the store's
# seed when untrained (what readers rebuilt then); ``descriptor``, the teacher's facts
# (teachers/descriptors.py ``TeacherDescriptor.record``): None, its described record. Both are
# resolved by ``with_defaults``.
CONFIG_DEFAULTS = {"input": "source", "embed_dim": VIT_B_WIDTH, "build": None, "descriptor": None}
TEACHER_INPUTS = ("source", "jpeg")


def stored_build(name: str, build: dict) -> dict:
    """Teacher ``name``'s build record (teachers/vit.py ``default_build``) as a store keeps it: JSON
    (tuples become lists); a ValueError if its model arguments are no JSON values."""
    try:
        return json.loads(json.dumps(build))
    except (TypeError, ValueError) as error:
        raise ValueError(f"teacher {name}: its build record {build!r} cannot be stored ({error}); "
                         "build it with JSON model arguments") from None


def with_defaults(config: dict) -> dict:
    """A teacher's ``config`` with the keys an older store lacks filled in (``CONFIG_DEFAULTS``),
    its ``build`` and ``descriptor`` resolved (for a described teacher)."""
    out = dict(CONFIG_DEFAULTS, **config)
    if out["build"] is None and out.get("teacher") in DESCRIPTORS:
        out["build"] = default_build(out["teacher"], seed=out.get("seed") if out.get("untrained") else None)
    if out["descriptor"] is None and out.get("teacher") in DESCRIPTORS:
        out["descriptor"] = DESCRIPTORS[out["teacher"]].record()
    return out


def register_recorded(config: dict, *, where) -> None:
    """Make a timm teacher's recorded descriptor known to this process (teachers/descriptors.py
    ``register``), so that its masks and width are the store's; StoreError naming ``where`` if
    it conflicts with another (e.g. another mask ratio, a shared key id)."""
    record = config.get("descriptor")
    if not record or record.get("name") in DESCRIPTORS:
        return
    try:
        register(TeacherDescriptor.from_record(record))
    except (ValueError, TypeError, KeyError) as error:
        raise StoreError(f"{where}: teacher {config.get('teacher')!r}: {error}") from None


def teacher_input(view_form: str | None) -> str:
    """What a teacher runs on in a store whose view pixels are ``view_form`` (None: none):
    JPEG views are lossy, so it runs on them as decoded; raw views are the crops exactly."""
    return "jpeg" if view_form == "jpeg" else "source"


class TeacherStore:
    """One teacher's arrays: write whole (slot, image shard) blocks, read them back."""

    def __init__(self, root, group: zarr.Group):
        """``root``: the FeatureStore holding ``group``."""
        self.root = root
        self.group = group
        self.config = dict(group.attrs["config"])
        self.name = self.config["teacher"]
        register_recorded(self.config, where=root.path / self.name)
        self.input = self.config.get("input", CONFIG_DEFAULTS["input"])
        self.width = int(self.config.get("embed_dim", CONFIG_DEFAULTS["embed_dim"]))    # token channels C
        self.codec = self.config["codec"]
        self.n_visible = int(self.config["n_visible"])
        self.payload_keys = list(codecs.payload_arrays(
            self.codec, (self.n_visible + 1, self.width),
            pca_dim=int(self.config.get("pca_dim", codecs.PCA_DIM))))
        self.keys = (*SAMPLE_KEYS, *self.payload_keys)          # the per-sample arrays
        self._arrays: dict[str, zarr.Array] = {}
        self._stats = None

    @property
    def path(self) -> Path:
        return self.root.path / self.name

    @property
    def build(self) -> dict:
        """How the teacher was built (teachers/vit.py ``default_build``; ``rebuild_teacher`` takes it)."""
        return with_defaults(self.config)["build"]

    def array(self, key: str) -> zarr.Array:
        """The teacher's array ``key``, opened once (opening reads its metadata from disk)."""
        if key not in self._arrays:
            self._arrays[key] = self.group[key]
        return self._arrays[key]

    @property
    def checksummed(self) -> bool:
        """Whether every per-sample array has a crc32c on every byte (written by format_version 3
        code; a version 1-2 store's have none)."""
        return all(has_crc32c(self.array(k)) for k in self.keys)

    def block_file(self, key: str, slot: int, shard: int) -> Path:
        """The one file of array ``key`` holding block (slot, shard): a chunk, or a zarr shard."""
        return self.path.joinpath(key, "c", str(slot), str(shard), *["0"] * (self.array(key).ndim - 2))

    def _damaged(self, file: Path, slot: int, shard: int, what: str) -> StoreError:
        return StoreError(f"{file} {what}: teacher {self.name!r}, block (slot {slot}, shard {shard}) is damaged; "
                          "restore the file from a copy, or extract this teacher into a new store")

    # -- completion -------------------------------------------------------------------
    def expected(self) -> np.ndarray:
        return np.array([c for _, c in self.root.shards], dtype=np.int64)

    def complete_matrix(self) -> np.ndarray:
        """(V, n_shards) bool: which (slot, shard) blocks are complete."""
        return self._complete(...) == self.expected()[None, :]

    def is_complete(self, slot: int, shard: int) -> bool:
        return int(self._complete((slot, shard))) == self.root.shards[shard][1]

    def _complete(self, selection):
        try:
            return self.group["complete"][selection]
        except (ValueError, RuntimeError) as e:
            raise StoreError(f"{self.path}/complete {failure(e)}: teacher {self.name!r}'s completion records are "
                             "damaged; restore them from a copy, or extract this teacher into a new store") from None

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
        stats = dict(mean=mean, components=components, eigenvalues=eigenvalues, indices=indices, count=int(count))
        s = self.group.require_group("stats")
        for key, dtype in STATS_DTYPES.items():
            s.create_array(key, data=np.ascontiguousarray(stats[key], dtype=dtype), overwrite=True,
                           compressors=SMALL_COMPRESSORS)
        s.attrs.update({"count": int(count), "origin": origin, "digest": stats_digest(stats)})
        fsync_tree(self.path / "stats")
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
            stats = {key: self._read_stats(s, key) for key in ("mean", "components", "eigenvalues")}
            # None for a store written before the sample was recorded (verify reports it)
            stats["indices"] = self._read_stats(s, "indices") if "indices" in s else None
            stats.update(count=int(s.attrs["count"]), origin=s.attrs.get("origin"))
            digest = s.attrs.get("digest")      # None: written before format_version 3 (verify notes it)
            if digest is not None and (stats["indices"] is None or stats_digest(stats) != digest):
                raise StoreError(f"{self.path}/stats: teacher {self.name!r}: the statistics (mean, components, "
                                 "eigenvalues, indices, count) differ from their recorded sha256 digest: the store "
                                 "is damaged; restore it from a copy, or extract this teacher into a new store")
            self._stats = stats
        return self._stats

    def _read_stats(self, group: zarr.Group, key: str) -> np.ndarray:
        try:
            return group[key][...]
        except (ValueError, RuntimeError) as e:
            raise StoreError(f"{self.path}/stats/{key} {failure(e)}: teacher {self.name!r}'s statistics are "
                             "damaged; restore them from a copy, or extract this teacher into a new store") from None

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
        key = None
        try:
            for key, value in arrays.items():
                self.array(key).with_config(WRITE)[slot, rows] = value
            for key in arrays:
                fsync_tree(self.path / key / "c" / str(slot) / str(shard))
            key = "complete"
            self.group["complete"][slot, shard] = n
            fsync_tree(self.path / "complete" / "c" / str(slot) / str(shard))
        except OSError as error:        # a full disk: name the file (zarr's error names none)
            raise OSError(error.errno, f"cannot write {self.block_file(key, slot, shard)} (teacher {self.name!r}, "
                                       f"block (slot {slot}, shard {shard})): {error.strerror or error}; the block "
                                       "stays incomplete, and a rerun of extract writes it again") from error

    # -- reading ----------------------------------------------------------------------
    def read_block(self, slot: int, shard: int, *, payload: bool = True) -> dict[str, np.ndarray]:
        """One complete (slot, image shard) block: index, view, boxes, flips, visible and, with
        ``payload``, the codec's arrays. Every file of it must exist (the payload's too) and pass
        its checksums when read, and its index must be the shard's images, else a StoreError
        names teacher, slot, shard and file."""
        self._require_block(slot, shard)
        block = {key: self._read(key, slot, shard, self._rows(shard)) for key in self.keys
                 if payload or key in SAMPLE_KEYS}
        first, count = self.root.shards[shard]
        if not np.array_equal(block["index"], np.arange(first, first + count)):
            raise self._damaged(self.block_file("index", slot, shard), slot, shard,
                                f"does not hold images {first}..{first + count - 1}")
        return block

    def read_samples(self, slot: int, indices) -> dict[str, np.ndarray]:
        """Random access to a few samples (inspect, tests); not for the training hot path.
        The same checks as ``read_block`` on the files read."""
        indices = np.asarray(indices, dtype=np.int64)
        shards = np.searchsorted([f for f, _ in self.root.shards], indices, side="right") - 1
        parts = []
        for k in map(int, np.unique(shards)):          # by shard, ascending; then back to the order asked
            self._require_block(slot, k)
            parts.append({key: self._read(key, slot, k, indices[shards == k]) for key in self.keys})
        back = np.argsort(np.argsort(shards, kind="stable"))
        return {key: np.concatenate([p[key] for p in parts])[back] for key in self.keys}

    def _require_block(self, slot: int, shard: int) -> None:
        """A complete block with all its files (StoreError naming the first missing one)."""
        if not self.is_complete(slot, shard):
            raise StoreError(f"{self.path}: block (slot {slot}, shard {shard}) is not complete")
        for key in self.keys:
            file = self.block_file(key, slot, shard)
            if not file.is_file() and (has_crc32c(self.array(key)) or key not in MAY_BE_SKIPPED):
                raise self._damaged(file, slot, shard, "is missing")

    def _read(self, key: str, slot: int, shard: int, rows) -> np.ndarray:
        """Rows ``rows`` (a slice, or indices, inside image shard ``shard``) of ``slot`` of array
        ``key``; a failed checksum or undecodable bytes are a StoreError naming the file."""
        try:
            array = self.array(key)
            return array[slot, rows] if isinstance(rows, slice) else array.get_orthogonal_selection((slot, rows))
        except (ValueError, RuntimeError) as e:
            raise self._damaged(self.block_file(key, slot, shard), slot, shard, failure(e)) from None

    def check_masks(self, slot: int, shard: int, block: dict) -> None:
        """StoreError naming the file unless the block's ``visible`` (``read_block``) are the keyed
        draw of its images' views in ``slot`` (data/views.py ``teacher_visible``)."""
        view = V.view_of_slot(block["index"], slot, self.root.views)
        if not np.array_equal(block["visible"], V.teacher_visible(self.root.seed, block["index"], view, self.name,
                                                                  mask_ratio=self.config["mask_ratio"])):
            raise StoreError(f"{self.block_file('visible', slot, shard)}: teacher {self.name!r}, block (slot {slot}, "
                             f"shard {shard}): stored masks differ from the masks of this seed "
                             f"({self.root.seed}); extract this teacher into a new store")

    def decode(self, payload: dict, *, device=None):
        """Stored payload (..., T, ...) -> float32 torch tokens (..., T, C) on ``device``."""
        return codecs.decode(self.codec, payload, pca=self.pca, device=device)
