"""The input side of ``prepare``: list SRC, an ImageFolder tree, a tree of images without classes
or WebDataset tars, in a deterministic order with labels (or none) and class names, so that every
candidate sample is known before any image is read (the rules: docs/format.md, "Input (SRC)").
``prepare`` packs the listing in a seeded permutation (``data.pack.pack_order``)."""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import tarfile
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

# what a good image is lives in data/imagecheck.py; re-exported for prepare's readers
from data.imagecheck import FORMAT_EXT, BadImage, ImageInfo, PrepareError, inspect_image

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

# member extensions taken as the image of a WebDataset sample, and file extensions (any case)
# taken as images in a tree without classes (other files there, e.g. img2dataset's json, are skipped)
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "pgm", "pbm", "pnm", "jp2")
CLASSES_FILE = "classes.txt"
LABELS = ("auto", "classes", "none")  # PrepareConfig.labels: where labels come from


@dataclass
class SourceItem:
    """One candidate sample: ``source`` names it; its bytes are the file ``path``, or, when
    ``size >= 0``, the ``size`` bytes at ``offset`` of ``path`` (a member of a tar).

    ``error`` is set when the sample is already known to be bad (e.g. a WebDataset sample
    without a label where labels are required); such an item is rejected without being read.
    ``label`` is -1 in an unlabeled listing.
    """

    source: str
    label: int
    path: Path | None = None
    offset: int = 0
    size: int = -1
    error: str | None = None

    def read(self) -> bytes:
        assert self.path is not None
        if self.size < 0:
            return self.path.read_bytes()
        with open(self.path, "rb") as f:
            data = os.pread(f.fileno(), self.size, self.offset)
        if len(data) != self.size:
            raise OSError(f"short read: {len(data)} of {self.size} bytes at offset {self.offset} of {self.path}")
        return data


@dataclass
class SourceListing:
    """A listing of SRC: its kind, classes, every candidate sample, and a digest of
    (name, size, mtime) of every listed file.

    ``sha256`` changes whenever a listed file is added, removed, resized or modified, which
    is how ``prepare`` tells a finished OUT made from this SRC from one made from another.
    Candidates are numbered 0..len-1 in the deterministic listing order (``item(k)``);
    ``prepare`` packs them in a seeded permutation of that order.
    """

    kind: str  # "imagefolder" | "images" (a tree of images without classes) | "webdataset"
    root: Path
    classes: list[str]  # ImageFolder: the folders; WebDataset: classes.txt, or [] (see json_names); images: []
    num_files: int
    sha256: str
    names: list[str] = field(repr=False)  # the listed files, relative to SRC (images, or tars + classes.txt)
    sources: list[str] = field(repr=False)  # per candidate: path relative to SRC, or tar:member
    labels: array = field(repr=False)  # per candidate: class label (-1 where unknown)
    pattern: str | None = None  # WebDataset: the --pattern the tars were chosen by (None: every *.tar)
    json_names: dict[int, str] = field(default_factory=dict, repr=False)  # label -> name from samples' json
    labeled: bool = True  # False: every label is -1 and there are no classes (kind "images", or tars without cls)
    # WebDataset only, per candidate: which tar, data offset and size of the image member
    _tars: list[Path] = field(default_factory=list, repr=False)
    _tar_of: array = field(default_factory=lambda: array("q"), repr=False)
    _offsets: array = field(default_factory=lambda: array("q"), repr=False)
    _sizes: array = field(default_factory=lambda: array("q"), repr=False)
    _errors: dict[int, str] = field(default_factory=dict, repr=False)
    _labeled_by: str | None = field(default=None, repr=False)  # labels=auto: the sample that decided ``labeled``

    def __len__(self) -> int:
        """Number of candidate samples (good or bad)."""
        return len(self.sources)

    def item(self, k: int) -> SourceItem:
        """Candidate ``k`` (listing order)."""
        if self.kind != "webdataset":
            return SourceItem(source=self.sources[k], label=self.labels[k], path=self.root / self.sources[k])
        error = self._errors.get(k)
        if error is not None:
            return SourceItem(source=self.sources[k], label=self.labels[k], error=error)
        return SourceItem(source=self.sources[k], label=self.labels[k], path=self._tars[self._tar_of[k]],
                          offset=self._offsets[k], size=self._sizes[k])

    def items(self, order: Iterable[int] | None = None) -> Iterator[SourceItem]:
        """Candidates in ``order`` (positions in the listing; default: listing order)."""
        for k in (range(len(self)) if order is None else order):
            yield self.item(int(k))


def list_source(src: Path, *, pattern: str | None = None, labels: str = "auto",
                progress: bool = False) -> SourceListing:
    """List SRC, deciding its kind: top-level ``*.tar`` files mean WebDataset shards; otherwise
    image files directly in SRC mean a tree of images without classes, and sub-folders alone
    an ImageFolder tree (so ILSVRC's ``train/n01440764/*.JPEG`` stays labeled). ``progress``:
    a tqdm bar over class folders, files or tars.

    Args:
        src: the source folder.
        pattern: WebDataset only: which top-level tars to take, a glob (``fnmatch``) with
            optional brace expansion (``train-{0000..0146}.tar``, ``{train,val}-*.tar``);
            None takes every ``*.tar``. A brace alternative without wildcards names one
            file, which must exist.
        labels: "auto" (above; tars: labeled iff their samples have ``cls`` members),
            "classes" (class folders / ``cls`` members required) or "none" (unlabeled: every
            image file below SRC, or the tars' samples with their ``cls`` ignored).
    Raises:
        FileNotFoundError: SRC does not exist.
        PrepareError: SRC holds no tars, class folders or images; images directly in SRC
            beside sub-folders (ambiguous under "auto"); tars some of whose samples have a
            ``cls`` and some not (under "auto"); the pattern matches nothing or names a
            missing tar.
        NotADirectoryError: SRC is a file.
    """
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"prepare: source folder {src} does not exist")
    if not src.is_dir():
        raise NotADirectoryError(f"prepare: source {src} is not a folder")
    entries = sorted((e for e in os.scandir(src) if not e.name.startswith(".")), key=lambda e: e.name)
    if labels not in LABELS:
        raise PrepareError(f"prepare: labels={labels!r} is not one of {list(LABELS)}")
    tars = [e for e in entries if e.name.endswith(".tar") and e.is_file()]
    folders = [e for e in entries if e.is_dir()]
    if pattern is not None:
        return _list_webdataset(src, _match_tars(src, tars, pattern), pattern=pattern, labels=labels,
                                progress=progress)
    if tars:
        return _list_webdataset(src, tars, pattern=None, labels=labels, progress=progress)
    images = [e.name for e in entries if e.is_file() and _is_image_name(e.name)]
    if labels == "none" or (labels == "auto" and images and not folders):
        return _list_images(src, progress=progress)
    if labels == "auto" and images:
        raise PrepareError(f"prepare: {src} holds both image files ({images[0]}, ...) and sub-folders "
                           f"({folders[0].name}, ...): say labels=none (every image below it, unlabeled) or "
                           f"labels=classes (the sub-folders are classes; files directly in it are ignored)")
    if folders:
        return _list_imagefolder(src, folders, progress=progress)
    if images:    # labels=classes
        raise PrepareError(f"prepare: {src} holds image files ({images[0]}, ...) but no class folders, and "
                           f"labels=classes was asked for: put them in one folder per class, or say labels=auto")
    raise PrepareError(f"prepare: {src} holds no class folders (ImageFolder), no image files (unlabeled) "
                       f"and no *.tar shards (WebDataset)")


def _is_image_name(name: str) -> bool:
    """Whether a file name has one of the image extensions (``WDS_IMAGE_EXTS``, any case)."""
    return os.path.splitext(name)[1][1:].lower() in WDS_IMAGE_EXTS


def _match_tars(src: Path, tars: list[os.DirEntry], pattern: str) -> list[os.DirEntry]:
    """The top-level tars whose name matches ``pattern`` (brace-expanded, then fnmatch), sorted."""
    from braceexpand import braceexpand

    alternatives = list(braceexpand(pattern))
    for alternative in alternatives:
        if "/" in alternative:
            raise PrepareError(f"prepare: --pattern {pattern!r} names files in SRC itself, not in sub-folders "
                               f"({alternative!r} has a '/')")
    names = {e.name for e in tars}
    missing = [a for a in alternatives if not any(c in a for c in "*?[") and a not in names]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise PrepareError(f"prepare: --pattern {pattern!r} names tars that are not in {src}: "
                           f"{', '.join(missing[:3])}{more}")
    chosen = [e for e in tars if any(fnmatch.fnmatchcase(e.name, a) for a in alternatives)]
    if not chosen:
        there = ", ".join(e.name for e in tars[:3]) + (" ..." if len(tars) > 3 else "") if tars else "none"
        raise PrepareError(f"prepare: no *.tar in {src} matches --pattern {pattern!r} (tars there: {there})")
    return chosen


def _listing_line(name: str, stat: os.stat_result) -> bytes:
    return os.fsencode(name) + b"\t" + str(stat.st_size).encode() + b"\t" + str(stat.st_mtime_ns).encode() + b"\n"


def _walk_files(folder: Path, prefix: str) -> Iterator[tuple[str, os.DirEntry]]:
    """All non-hidden files below ``folder``, as (relative name, entry), in sorted name order."""
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        name = f"{prefix}/{entry.name}" if prefix else entry.name
        if entry.is_dir():
            yield from _walk_files(Path(entry.path), name)
        else:
            yield name, entry


def _list_imagefolder(src: Path, folders: list[os.DirEntry], *, progress: bool) -> SourceListing:
    from core.progress import progress_bar

    digest = hashlib.sha256(b"imagefolder\n")
    names: list[str] = []
    labels = array("q")
    classes = [f.name for f in folders]
    for label, folder in enumerate(progress_bar(folders, desc=f"list {src.name}", unit="class", progress=progress)):
        digest.update(b"class\t" + os.fsencode(folder.name) + b"\n")
        for name, entry in _walk_files(Path(folder.path), folder.name):
            digest.update(_listing_line(name, entry.stat()))
            names.append(name)
            labels.append(label)
    return SourceListing(kind="imagefolder", root=src, classes=classes, num_files=len(names),
                         sha256=digest.hexdigest(), names=names, sources=names, labels=labels)


def _list_images(src: Path, *, progress: bool) -> SourceListing:
    """Every image file below ``src`` (recursively, by extension), unlabeled, sorted by path."""
    from core.progress import progress_bar

    digest = hashlib.sha256(b"images\n")
    names: list[str] = []
    for name, entry in progress_bar(_walk_files(src, ""), desc=f"list {src.name}", unit="file", progress=progress):
        if _is_image_name(name):
            digest.update(_listing_line(name, entry.stat()))
            names.append(name)
    if not names:
        raise PrepareError(f"prepare: {src} holds no image files (extensions {', '.join(WDS_IMAGE_EXTS)})")
    return SourceListing(kind="images", root=src, classes=[], num_files=len(names), sha256=digest.hexdigest(),
                         names=names, sources=names, labels=array("q", [-1]) * len(names), labeled=False)


def _list_webdataset(src: Path, tars: list[os.DirEntry], *, pattern: str | None, labels: str,
                     progress: bool) -> SourceListing:
    from core.progress import progress_bar

    digest = hashlib.sha256(b"webdataset\n")
    names = []
    classes_path = src / CLASSES_FILE
    classes: list[str] = []
    if classes_path.is_file() and labels != "none":
        digest.update(_listing_line(CLASSES_FILE, classes_path.stat()))
        names.append(CLASSES_FILE)
        classes = [line.strip() for line in classes_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(set(classes)) != len(classes):
            raise PrepareError(f"prepare: {classes_path} names a class twice")
    listing = SourceListing(kind="webdataset", root=src, classes=classes, num_files=0, sha256="", names=names,
                            sources=[], labels=array("q"), pattern=pattern, labeled=labels != "none")
    named_by: dict[int, str] = {}  # label -> the sample whose json named it (for messages)
    for entry in progress_bar(tars, desc=f"list {src.name}", unit="tar", progress=progress):
        digest.update(_listing_line(entry.name, entry.stat()))
        names.append(entry.name)
        listing._tars.append(Path(entry.path))
        _scan_tar(listing, len(listing._tars) - 1, entry.name, num_classes=len(classes) if classes else None,
                  named_by=named_by, auto=labels == "auto")
    if not listing.labeled and classes:
        raise PrepareError(f"prepare: {classes_path} names classes but no sample of the tars has a 'cls' member "
                           f"(label): add them, remove {CLASSES_FILE}, or say labels=none")
    listing.num_files, listing.sha256 = len(names), digest.hexdigest()
    return listing


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the base name."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:].lower()


def _scan_tar(listing: SourceListing, tar: int, tar_name: str, *, num_classes: int | None,
              named_by: dict[int, str], auto: bool) -> None:
    """Append the samples of one WebDataset tar, in member order, to ``listing``: where each
    image member's data lies, the label (``cls``) and the class name its ``json`` gives.

    Only headers, ``cls`` and ``json`` members are read (the tar is opened for random access);
    a sample missing its image or (labeled) its ``cls``, or with a bad label, gets an error
    instead. ``auto``: the first sample with an image decides ``listing.labeled``.
    """
    path = listing._tars[tar]
    try:
        archive = tarfile.open(path, mode="r:")
    except (OSError, tarfile.TarError) as error:
        raise BadImage(tar_name, f"cannot open tar file ({error})") from None
    end = os.stat(path).st_size
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
                if member.offset_data + member.size > end:
                    raise BadImage(tar_name, f"damaged tar file (member {member.name} ends past the end of the file)")
                if member_key != key:
                    if key is not None:
                        _add_sample(listing, tar, tar_name, key, members, num_classes, named_by, auto)
                    key, members = member_key, {}
                data = archive.extractfile(member).read() if ext in ("cls", "json") else None
                members[ext] = (member.name, member.offset_data, member.size, data)
        except (OSError, tarfile.TarError) as error:
            raise BadImage(tar_name, f"damaged tar file ({error})") from None
    if key is not None:
        _add_sample(listing, tar, tar_name, key, members, num_classes, named_by, auto)


def _json_class_name(data: bytes) -> str | None:
    """The class name a sample's json gives: its ``class_name``, else the folder of its
    ``filename`` (``n01440764/n01440764_3778.JPEG`` -> ``n01440764``); None if neither."""
    try:
        meta = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(meta, dict):
        return None
    name = meta.get("class_name")
    if isinstance(name, str) and name.strip():
        return name.strip()
    filename = meta.get("filename")
    if isinstance(filename, str) and "/" in filename.strip("/"):
        return filename.strip("/").split("/", 1)[0]
    return None


def _add_sample(listing: SourceListing, tar: int, tar_name: str, key: str, members: dict,
                num_classes: int | None, named_by: dict[int, str], auto: bool) -> None:
    k = len(listing.sources)
    image_exts = [e for e in WDS_IMAGE_EXTS if e in members]
    source, label, error = f"{tar_name}:{key}", -1, None
    offset = size = 0
    if not image_exts:
        error = f"sample has no image member (members: {sorted(members)})"
    elif len(image_exts) > 1:
        error = f"sample has several image members {image_exts}"
    else:
        member_name, offset, size, _ = members[image_exts[0]]
        source = f"{tar_name}:{member_name}"
        if auto:
            _check_same_labeling(listing, source, "cls" in members)
        if listing.labeled and "cls" not in members:
            error = "sample has no 'cls' member (label)"
        elif listing.labeled:
            text = members["cls"][3].decode("utf-8", errors="replace").strip()
            try:
                label = int(text)
            except ValueError:
                error = f"'cls' is not an integer label: {text[:40]!r}"
            else:
                if label < 0 or (num_classes is not None and label >= num_classes):
                    limit = f" [0, {num_classes})" if num_classes is not None else " >= 0"
                    error = f"label {label} outside{limit}"
    if error is None and listing.labeled and "json" in members:
        name = _json_class_name(members["json"][3])
        if name is not None:
            known = listing.json_names.setdefault(label, name)
            named_by.setdefault(label, source)
            if known != name:
                raise PrepareError(f"prepare: the json of {listing.root}/{source} names label {label} {name!r}, "
                                   f"the json of {listing.root}/{named_by[label]} names it {known!r}")
    listing.sources.append(source)
    listing.labels.append(label)
    listing._tar_of.append(tar)
    listing._offsets.append(offset)
    listing._sizes.append(size)
    if error is not None:
        listing._errors[k] = error


def _check_same_labeling(listing: SourceListing, source: str, has_cls: bool) -> None:
    """Under labels=auto: the first sample with an image decides whether the tars are labeled; a
    later sample that differs stops ``prepare``, naming both."""
    if listing._labeled_by is None:
        listing._labeled_by, listing.labeled = source, has_cls
        return
    first = listing._labeled_by
    if has_cls != listing.labeled:
        this, that = ("has a", "has none") if has_cls else ("has no", "has one")
        raise PrepareError(f"prepare: {listing.root}/{source} {this} 'cls' member (label) but {listing.root}/{first} "
                           f"{that}: the samples must all carry a label or none (labels=classes: leave those "
                           f"without out as bad, with --skip-bad; labels=none: ignore every label)")
