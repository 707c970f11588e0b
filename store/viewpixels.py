"""View pixels stored once with the feature store (``extract --view-pixels jpeg|raw``): one
WebDataset tar per (slot, image shard) aligned with the token blocks, its DALI index and a
completion record written last; the writer, the reader and their checks (docs/format.md, "View
pixels")."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import google_crc32c
import numpy as np
import torch
import zarr
from PIL import Image

from core.io import fsync_path, sha256_file, write_atomic
from data.decode.pixels import SIZE, denormalize
from store.features import PIXELS, StoreError, create_group_whole
from data.manifest import sample_key, shard_stem
from data.pack import ShardWriter

FORMS = ("jpeg", "raw")
JPEG_QUALITY = 95
EXTS = {"jpeg": "jpg", "raw": "rgb"}
RAW_BYTES = SIZE * SIZE * 3


def uint8_views(images: torch.Tensor) -> np.ndarray:
    """Normalised views (B, 3, 224, 224) float32 (any device) -> their pixels (B, 224, 224, 3)
    uint8 on the host. Every decoder resizes to uint8 before normalising, so denormalising
    and rounding recovers them exactly; a value further than 0.05 from an integer means a
    decoder that does not, and is refused."""
    wide = denormalize(images.float())
    pixels = torch.round(wide)
    err = float((wide - pixels).abs().max()) if wide.numel() else 0.0
    if err > 0.05:
        raise ValueError(f"decoded views are not whole 8-bit pixels (off by up to {err:.3f} after denormalising)")
    return pixels.clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def encode_view(form: str, pixels: np.ndarray) -> bytes:
    """One view's pixels (224, 224, 3) uint8 -> the bytes stored: JPEG at quality 95 with
    4:4:4 chroma (no subsampling: the view is final), or the raw HWC bytes."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    if pixels.shape != (SIZE, SIZE, 3):
        raise ValueError(f"a view is ({SIZE}, {SIZE}, 3) uint8, got {pixels.shape}")
    if form == "raw":
        return pixels.tobytes()
    if form == "jpeg":
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
        return buf.getvalue()
    raise ValueError(f"unknown view pixel form {form!r}; choose one of {FORMS}")


def jpeg_round_trip(images: torch.Tensor) -> tuple[list[bytes], torch.Tensor]:
    """Normalised views (B, 3, 224, 224) -> (their JPEG bytes as a store keeps them, those bytes
    decoded by PIL and normalised: float32 (B, 3, 224, 224) on the host, the pixels a student
    reading the stored views gets)."""
    from data.decode.stored import pil_stored_views

    encoded = [encode_view("jpeg", p) for p in uint8_views(images)]
    return encoded, pil_stored_views(encoded)


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"unknown view pixel form {form!r}; choose one of {FORMS}")


class ViewPixels:
    """The view tars of one store: write whole (slot, shard) blocks, read them back, check them."""

    def __init__(self, root, group: zarr.Group):
        self.root = root                          # store.features.FeatureStore
        self.group = group
        a = group.attrs.asdict()
        self.form, self.quality, self.ext = a["form"], a.get("quality"), a["ext"]
        self.path = root.path / PIXELS

    @classmethod
    def create_or_open(cls, root, form: str) -> "ViewPixels":
        """Open the group and check it holds ``form`` (``require_form``), or create it (``create``)."""
        _check_form(form)
        vp = cls.open(root)
        return vp.require_form(form) if vp is not None else cls.create(root, form)

    @classmethod
    def create(cls, root, form: str) -> "ViewPixels":
        """Create the group of ``form`` (rank 0 only; whole or not at all, ``create_group_whole``,
        which keeps one another process made meanwhile) and open it: StoreError unless it holds ``form``."""
        _check_form(form)
        root.upgrade_format()
        try:
            create_group_whole(root.path / PIXELS, {
                "form": form, "quality": JPEG_QUALITY if form == "jpeg" else None, "size": SIZE,
                "ext": EXTS[form], "key_format": "{index:09d}", "data_digest": root.data_digest,
                "views": root.views, "seed": root.seed}, root=root.path)
        except OSError as error:
            raise StoreError(f"{root.path / PIXELS}: could not create the view pixels' group ({error}); rerun "
                             "once the cause is fixed (a full disk, permissions)") from error
        return cls._opened(root).require_form(form)

    @classmethod
    def open(cls, root) -> "ViewPixels | None":
        """The store's view pixels, or None if it holds none; StoreError if they belong to
        other data, views or seed than the store."""
        return cls._opened(root) if (root.path / PIXELS / "zarr.json").exists() else None

    @classmethod
    def _opened(cls, root) -> "ViewPixels":
        vp = cls(root, zarr.open_group(store=str(root.path / PIXELS), mode="a", zarr_format=3))
        a = vp.group.attrs.asdict()
        wanted = dict(data_digest=root.data_digest, views=root.views, seed=root.seed)
        problems = [f"{k}: pixels have {a.get(k)!r}, the store {v!r}" for k, v in wanted.items() if a.get(k) != v]
        if problems:
            raise StoreError(f"{vp.path}: view pixels do not belong to this store: " + "; ".join(problems))
        return vp

    def require_form(self, form: str) -> "ViewPixels":
        """These view pixels, if they are of ``form``; else StoreError saying what to do."""
        if self.form != form:
            raise StoreError(f"{self.path}: holds view pixels as {self.form}, not {form}; extract with "
                             f"--view-pixels {self.form} (or none), or into a new store")
        return self

    # -- paths and completion -----------------------------------------------------------
    def block_path(self, slot: int, shard: int, suffix: str) -> Path:
        return self.path / f"slot-{slot}" / f"{shard_stem(shard)}.{suffix}"

    def record(self, slot: int, shard: int) -> dict | None:
        path = self.block_path(slot, shard, "json")
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError as e:
            raise self._damaged(path, slot, shard, f"is not a completion record ({e})") from None

    def _damaged(self, path: Path, slot: int, shard: int, what: str) -> StoreError:
        return StoreError(f"{path} {what}: view block (slot {slot}, shard {shard}) is damaged; delete "
                          f"{self.block_path(slot, shard, 'json').name} beside it and resume `python cli.py extract` "
                          f"with --view-pixels {self.form}, which writes the block again")

    def is_complete(self, slot: int, shard: int) -> bool:
        rec = self.record(slot, shard)
        return rec is not None and rec.get("count") == self.root.shards[shard][1]

    def complete_matrix(self) -> np.ndarray:
        """(V, n_shards) bool: which (slot, shard) view blocks are complete."""
        return np.array([[self.is_complete(s, k) for k in range(len(self.root.shards))]
                         for s in range(self.root.views)], dtype=bool).reshape(self.root.views, -1)

    def missing(self) -> list[tuple[int, int]]:
        done = self.complete_matrix()
        return [(int(s), int(k)) for s, k in zip(*np.nonzero(~done))]

    # -- writing --------------------------------------------------------------------
    def write_block(self, slot: int, shard: int, *, index: np.ndarray, pixels: np.ndarray | None = None,
                    encoded: list[bytes] | None = None) -> None:
        """Write one whole block: index (n,) the shard's images in order, and either pixels
        (n, 224, 224, 3) uint8 or their ``encoded`` views (``encode_view`` of this form);
        tar and index fsync'ed and renamed, then the completion record."""
        first, count = self.root.shards[shard]
        index = np.asarray(index)
        datas = list(encoded) if encoded is not None else [encode_view(self.form, view) for view in pixels]
        if not np.array_equal(index, np.arange(first, first + count)) or len(datas) != count:
            raise StoreError(f"{self.path}: view block (slot {slot}, shard {shard}) must hold images "
                             f"{first}..{first + count - 1} in order")
        folder = self.path / f"slot-{slot}"
        folder.mkdir(parents=True, exist_ok=True)
        writer = ShardWriter(folder, shard, first)
        for i, data in zip(index, datas):
            writer.add(int(i), self.ext, data, None)
        info = writer.close()
        fsync_path(folder)
        rec = dict(slot=int(slot), shard=int(shard), first=int(first), count=info["count"], form=self.form,
                   tar_bytes=info["bytes"], tar_sha256=info["sha256"], idx_sha256=sha256_file(writer.idx_path),
                   tar_crc32c=writer.crc32c)
        write_atomic(self.block_path(slot, shard, "json"), json.dumps(rec, sort_keys=True).encode())
        fsync_path(folder)

    # -- reading --------------------------------------------------------------------
    def _index(self, slot: int, shard: int, text: str) -> list[tuple[str, int, int, str]]:
        """The block's DALI index ``text``: [(ext, offset, size, member name)] in sample order."""
        lines = text.splitlines()
        head = lines[0].split()
        if head[0] != "v1.2" or int(head[1]) != len(lines) - 1:
            raise StoreError(f"{self.block_path(slot, shard, 'idx')}: not a DALI v1.2 index of its samples")
        out = []
        for line in lines[1:]:
            ext, offset, size, name = line.split()
            out.append((ext, int(offset), int(size), name))
        return out

    def read_block(self, slot: int, shard: int, *, check: bool = True,
                   sha256: bool = False) -> tuple[np.ndarray, list[bytes]]:
        """One complete block: index (n,) int64 and the n stored views' bytes, in order.

        Tar and index are read whole and, with ``check`` (False only to measure what it costs,
        bench/datapath.py), compared with the completion record as they are read: the tar's
        crc32c (its sha256 where the record has none: written before format_version 3; with
        ``sha256``, both), the index's sha256. A missing or differing file is a StoreError
        naming slot, shard and file."""
        rec = self.record(slot, shard)
        if rec is None or rec.get("count") != self.root.shards[shard][1]:
            raise StoreError(f"{self.path}: view block (slot {slot}, shard {shard}) is not complete; "
                             "resume `python cli.py extract --view-pixels ...`")
        first, count = self.root.shards[shard]
        entries = self._index(slot, shard, self._read(slot, shard, "idx", rec if check else None).decode())
        keys = [name.split(".")[0] for _, _, _, name in entries]
        if keys != [sample_key(i) for i in range(first, first + count)]:
            raise StoreError(f"{self.block_path(slot, shard, 'idx')}: members are not images "
                             f"{first}..{first + count - 1} in order")
        tar = self._read(slot, shard, "tar", rec if check else None, sha256=sha256)
        return np.arange(first, first + count, dtype=np.int64), [tar[o:o + n] for _, o, n, _ in entries]

    def _read(self, slot: int, shard: int, suffix: str, rec: dict | None, *, sha256: bool = False) -> bytes:
        """The block's tar or idx file, checked against the completion record ``rec`` (None: not):
        a tar by its crc32c where the record has one, and by its sha256 where it has none or
        ``sha256`` is asked; an index by its sha256."""
        path = self.block_path(slot, shard, suffix)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise self._damaged(path, slot, shard, "is missing") from None
        if rec is None:
            return data
        crc = suffix == "tar" and "tar_crc32c" in rec
        if crc and google_crc32c.value(data) != rec["tar_crc32c"]:
            raise self._damaged(path, slot, shard, "differs from its completion record (crc32c)")
        if (sha256 or not crc) and hashlib.sha256(data).hexdigest() != rec.get(f"{suffix}_sha256"):
            raise self._damaged(path, slot, shard, "differs from its completion record (sha256)")
        return data

    def check_block(self, slot: int, shard: int) -> list[str]:
        """verify's checks of one block: record, tar and index digests (the tar's sha256 too),
        members and sizes."""
        where = f"pixels slot {slot} shard {shard}"
        try:
            rec = self.record(slot, shard)
            if rec is None or not self.is_complete(slot, shard):
                return [f"{where}: incomplete (no completion record for all its images)"]
            _, datas = self.read_block(slot, shard, sha256=True)
        except StoreError as error:
            return [f"{where}: {error}"]
        if any(ext != self.ext for ext, _, _, _ in self._index(slot, shard, self.block_path(slot, shard, "idx")
                                                                .read_text())):
            return [f"{where}: members are not all .{self.ext}"]
        if self.form == "raw" and any(len(d) != RAW_BYTES for d in datas):
            return [f"{where}: a raw view is not {RAW_BYTES} bytes"]
        if self.form == "jpeg" and any(d[:2] != b"\xff\xd8" for d in datas):
            return [f"{where}: a stored view is not a JPEG"]
        return []
