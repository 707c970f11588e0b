"""The input side of ``prepare``: list an image source and check each image.

Two kinds of source folder are understood (see ``docs/format.md``, "Images"):

- **ImageFolder** (the ILSVRC-2012 layout): ``SRC/<class>/**/<file>``. Classes are the
  sub-folders of SRC in sorted order (label = position); the samples of a class are all
  files below its folder, recursively, in sorted relative-path order. Names starting
  with ``.`` (``.DS_Store``, hidden folders) are ignored, and so are plain files lying
  directly in SRC. Every other file must be an image.
- **WebDataset shards**: ``SRC/*.tar`` (top level, sorted by name), each sample a run
  of members sharing a key, with one image member (``jpg``, ``jpeg``, ``png``, ...) and a
  ``cls`` member holding the integer label as text. Class names come from
  ``SRC/classes.txt`` (one name per line, line k names label k) if it exists; otherwise
  they are the label numbers as strings, ``"0" .. str(max_label)``.

``inspect_image`` is the one definition of "a good image": PIL can open it and
``load()`` it, and its format is one that the DALI decoders read.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from PIL import Image, UnidentifiedImageError

from store.errors import ExpectedError

__all__ = [
    "BadImage",
    "PrepareError",
    "ImageInfo",
    "SourceItem",
    "SourceListing",
    "FORMAT_EXT",
    "inspect_image",
    "list_source",
]

# PIL format -> extension stored in the shards. Only formats DALI's image decoder reads.
FORMAT_EXT = {
    "JPEG": "jpg",
    "MPO": "jpg",  # camera JPEGs with a multi-picture extension: a JPEG stream first
    "PNG": "png",
    "BMP": "bmp",
    "WEBP": "webp",
    "TIFF": "tiff",
    "JPEG2000": "jp2",
    "PPM": "pnm",
}
# member extensions taken as the image of a WebDataset sample
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "pgm", "pbm", "pnm", "jp2")
CLASSES_FILE = "classes.txt"
_EXIF_ORIENTATION = 0x0112


class PrepareError(ExpectedError, ValueError):
    """``prepare`` refuses its input or output; the message says why and what to do."""


class BadImage(PrepareError):
    """An input file or sample that is not a usable image; ``reason`` says why."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


@dataclass(frozen=True)
class ImageInfo:
    """What ``prepare`` records about an image (size as stored, before EXIF rotation)."""

    width: int
    height: int
    mode: str
    ext: str
    orientation: int  # EXIF orientation tag 1..8, 0 when absent


@dataclass
class SourceItem:
    """One candidate sample: ``source`` names it; either ``path`` or ``data`` holds the bytes.

    ``error`` is set when the sample is already known to be bad (e.g. a WebDataset sample
    without a label); such an item is rejected without being read.
    """

    source: str
    label: int
    path: Path | None = None
    data: bytes | None = None
    error: str | None = None

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()


@dataclass
class SourceListing:
    """A listing of SRC: its kind, classes, and a digest of (name, size, mtime) of every file.

    ``sha256`` changes whenever a file is added, removed, resized or modified, which is how
    ``prepare`` tells a finished OUT made from this SRC from one made from another.
    """

    kind: str  # "imagefolder" | "webdataset"
    root: Path
    classes: list[str]
    num_files: int
    sha256: str
    names: list[str] = field(repr=False)
    _files: list[tuple[str, Path, int]] = field(repr=False)  # (relative name, path, label)

    def __len__(self) -> int:
        """Number of candidate samples for an ImageFolder; number of tar files for WebDataset."""
        return len(self._files)

    def items(self) -> Iterator[SourceItem]:
        """Candidate samples in their deterministic order."""
        if self.kind == "imagefolder":
            for name, path, label in self._files:
                yield SourceItem(source=name, label=label, path=path)
        else:
            for name, path, _ in self._files:
                yield from _tar_samples(path, name, num_classes=len(self.classes) if self._has_classes_file else None)

    @property
    def _has_classes_file(self) -> bool:
        return CLASSES_FILE in self.names


def inspect_image(data: bytes, *, source: str) -> ImageInfo:
    """Open and fully decode ``data`` with PIL; raise ``BadImage`` naming ``source`` if it fails.

    Args:
        data: the encoded file, as stored.
        source: a name for messages (path or ``tar:member``).
    Returns:
        ImageInfo with the stored width/height/mode, the shard extension for the format and
        the EXIF orientation (0 if none or unreadable).
    """
    if not data:
        raise BadImage(source, "empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format
            if fmt not in FORMAT_EXT:
                raise BadImage(source, f"image format {fmt} is not one the DALI decoders read "
                                       f"({', '.join(sorted(FORMAT_EXT))})")
            width, height = image.size
            mode = image.mode
            try:
                orientation = int(image.getexif().get(_EXIF_ORIENTATION, 0))
            except Exception:  # a broken EXIF block does not make a broken image
                orientation = 0
            image.load()
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage(source, "not an image PIL can identify") from None
    except Image.DecompressionBombError as error:
        raise BadImage(source, f"too large: {error}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise BadImage(source, f"cannot decode ({type(error).__name__}: {error})") from None
    if width <= 0 or height <= 0:
        raise BadImage(source, f"empty image {width}x{height}")
    return ImageInfo(width=width, height=height, mode=mode, ext=FORMAT_EXT[fmt], orientation=orientation)


def list_source(src: Path, *, progress: bool = False) -> SourceListing:
    """List SRC, deciding its kind: top-level ``*.tar`` files mean WebDataset shards,
    otherwise sub-folders mean an ImageFolder tree. ``progress``: a tqdm bar over class folders.

    Raises:
        FileNotFoundError: SRC does not exist.
        PrepareError: SRC holds neither tars nor class folders.
        NotADirectoryError: SRC is a file.
    """
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"prepare: source folder {src} does not exist")
    if not src.is_dir():
        raise NotADirectoryError(f"prepare: source {src} is not a folder")
    entries = sorted((e for e in os.scandir(src) if not e.name.startswith(".")), key=lambda e: e.name)
    tars = [e for e in entries if e.name.endswith(".tar") and e.is_file()]
    folders = [e for e in entries if e.is_dir()]
    if tars:
        return _list_webdataset(src, tars)
    if folders:
        return _list_imagefolder(src, folders, progress=progress)
    raise PrepareError(f"prepare: {src} holds neither class folders (ImageFolder) nor *.tar shards (WebDataset)")


def _listing_line(name: str, stat: os.stat_result) -> bytes:
    return os.fsencode(name) + b"\t" + str(stat.st_size).encode() + b"\t" + str(stat.st_mtime_ns).encode() + b"\n"


def _walk_files(folder: Path, prefix: str) -> Iterator[tuple[str, os.DirEntry]]:
    """All non-hidden files below ``folder``, as (relative name, entry), in sorted name order."""
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        name = f"{prefix}/{entry.name}"
        if entry.is_dir():
            yield from _walk_files(Path(entry.path), name)
        else:
            yield name, entry


def _list_imagefolder(src: Path, folders: list[os.DirEntry], *, progress: bool) -> SourceListing:
    from tqdm import tqdm

    digest = hashlib.sha256(b"imagefolder\n")
    files: list[tuple[str, Path, int]] = []
    classes = [f.name for f in folders]
    for label, folder in enumerate(tqdm(folders, desc=f"list {src.name}", unit="class", disable=not progress)):
        digest.update(b"class\t" + os.fsencode(folder.name) + b"\n")
        for name, entry in _walk_files(Path(folder.path), folder.name):
            digest.update(_listing_line(name, entry.stat()))
            files.append((name, Path(entry.path), label))
    return SourceListing(kind="imagefolder", root=src, classes=classes, num_files=len(files),
                         sha256=digest.hexdigest(), names=[f[0] for f in files], _files=files)


def _list_webdataset(src: Path, tars: list[os.DirEntry]) -> SourceListing:
    digest = hashlib.sha256(b"webdataset\n")
    names = []
    classes_path = src / CLASSES_FILE
    classes: list[str] = []
    if classes_path.is_file():
        digest.update(_listing_line(CLASSES_FILE, classes_path.stat()))
        names.append(CLASSES_FILE)
        classes = [line.strip() for line in classes_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(set(classes)) != len(classes):
            raise PrepareError(f"prepare: {classes_path} names a class twice")
    files = []
    for entry in tars:
        digest.update(_listing_line(entry.name, entry.stat()))
        names.append(entry.name)
        files.append((entry.name, Path(entry.path), -1))
    return SourceListing(kind="webdataset", root=src, classes=classes, num_files=len(names),
                         sha256=digest.hexdigest(), names=names, _files=files)


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the base name."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:].lower()


def _tar_samples(path: Path, tar_name: str, *, num_classes: int | None) -> Iterator[SourceItem]:
    """Samples of one WebDataset tar in member order; a sample missing its image or its
    ``cls`` (or with a bad label) comes out with ``error`` set."""
    try:
        archive = tarfile.open(path, mode="r|")
    except (OSError, tarfile.TarError) as error:
        raise BadImage(tar_name, f"cannot open tar file ({error})") from None
    key, members = None, {}
    with archive:
        try:
            for member in archive:
                if not member.isfile():
                    continue
                member_key, ext = _split_member(member.name)
                base = member_key.rsplit("/", 1)[-1]
                if not base or base.startswith(".") or base.startswith("__"):
                    continue
                if member_key != key:
                    if key is not None:
                        yield _wds_item(tar_name, key, members, num_classes)
                    key, members = member_key, {}
                data = archive.extractfile(member).read()
                members[ext] = (member.name, data)
        except (OSError, tarfile.TarError) as error:
            raise BadImage(tar_name, f"damaged tar file ({error})") from None
    if key is not None:
        yield _wds_item(tar_name, key, members, num_classes)


def _wds_item(tar_name: str, key: str, members: dict, num_classes: int | None) -> SourceItem:
    image_exts = [e for e in WDS_IMAGE_EXTS if e in members]
    source = f"{tar_name}:{key}"
    if not image_exts:
        return SourceItem(source=source, label=-1, error=f"sample has no image member (members: {sorted(members)})")
    if len(image_exts) > 1:
        return SourceItem(source=source, label=-1, error=f"sample has several image members {image_exts}")
    member_name, data = members[image_exts[0]]
    source = f"{tar_name}:{member_name}"
    if "cls" not in members:
        return SourceItem(source=source, label=-1, error="sample has no 'cls' member (label)")
    text = members["cls"][1].decode("utf-8", errors="replace").strip()
    try:
        label = int(text)
    except ValueError:
        return SourceItem(source=source, label=-1, error=f"'cls' is not an integer label: {text[:40]!r}")
    if label < 0 or (num_classes is not None and label >= num_classes):
        limit = f" [0, {num_classes})" if num_classes is not None else " >= 0"
        return SourceItem(source=source, label=label, error=f"label {label} outside{limit}")
    return SourceItem(source=source, label=label, data=data)
