"""What a good image is, as ``prepare`` and the decoders judge it: ``inspect_image`` (format, size,
mode, EXIF orientation) or ``BadImage`` naming the file. The checks: docs/format.md, "Input (SRC)"."""
from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from core.errors import ExpectedError

__all__ = ["BadImage", "PrepareError", "ImageInfo", "FORMAT_EXT", "PIL_ERRORS", "inspect_image"]

# what PIL raises on bytes it cannot decode (a box outside the image: ValueError)
PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)

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
_EXIF_ORIENTATION = 0x0112
_JPEG_EOI = 0xD9
# bytes after 0xFF that carry no segment length: stuffing (0x00), TEM, RSTn, SOI, fill (0xFF)
_JPEG_NO_LENGTH = frozenset({0x00, 0x01, *range(0xD0, 0xD9), 0xFF})
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # samples per pixel of each PNG colour type
# the seven passes of Adam7 interlacing: (first column, first row, column step, row step)
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


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


def inspect_image(data: bytes, *, source: str) -> ImageInfo:
    """Open, verify and fully decode ``data`` with PIL; raise ``BadImage`` naming ``source`` if
    any step fails or the data stops early where PIL would fill the rest and DALI refuses (a JPEG
    whose markers stop before its end-of-image marker, a PNG whose compressed stream holds fewer
    rows than its header says), whatever ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is set to.

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
            image.verify()  # only on a fresh image, which it leaves unusable
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            mode = image.mode
            image.load()  # before getexif, which loads a PNG itself (its eXIf may follow the pixels)
            try:
                orientation = int(image.getexif().get(_EXIF_ORIENTATION, 0))
            except Exception:  # a broken EXIF block does not make a broken image
                orientation = 0
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage(source, "not an image PIL can identify") from None
    except Image.DecompressionBombError as error:
        raise BadImage(source, f"too large: {error}") from None
    except PIL_ERRORS as error:
        raise BadImage(source, f"cannot decode ({type(error).__name__}: {error})") from None
    if width <= 0 or height <= 0:
        raise BadImage(source, f"empty image {width}x{height}")
    ext = FORMAT_EXT[fmt]
    if ext == "jpg" and not _jpeg_has_end(data):
        raise BadImage(source, "truncated JPEG: its data stops before the end-of-image marker")
    if ext == "png":
        try:
            missing = _png_missing_bytes(data)
        except zlib.error as error:
            raise BadImage(source, f"cannot decode (zlib.error: {error})") from None
        if missing:
            raise BadImage(source, f"truncated PNG: its image data stops {missing} bytes short of "
                                   f"the {width}x{height} pixels its header gives")
    return ImageInfo(width=width, height=height, mode=mode, ext=ext, orientation=orientation)


def _jpeg_has_end(data: bytes) -> bool:
    """Whether the JPEG stream of ``data`` reaches its end-of-image marker: walks the markers
    from the start-of-image on, stepping over each segment by its length (so over an EXIF
    thumbnail) and over entropy-coded data to its next marker; bytes after the marker (a
    trailer, an MPO's second picture) are not looked at."""
    pos = 2
    while (pos := data.find(b"\xff", pos)) >= 0 and pos + 1 < len(data):
        marker = data[pos + 1]
        if marker == _JPEG_EOI:
            return True
        if marker in _JPEG_NO_LENGTH:
            pos += 1 if marker == 0xFF else 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return False


def _png_missing_bytes(data: bytes) -> int:
    """How many bytes of filtered scanlines the PNG's IDAT stream lacks (0: all rows are there).

    ``data`` has passed PIL's verify (its chunks are whole, their CRCs right), so the IHDR is
    the first chunk; a damaged zlib stream raises ``zlib.error``.
    """
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    bits = depth * _PNG_CHANNELS[colour]
    passes = [(width, height)] if not interlace else [
        (-(-(width - x) // dx), -(-(height - y) // dy)) for x, y, dx, dy in _ADAM7]
    want = sum(h * (1 + (w * bits + 7) // 8) for w, h in passes if w > 0 and h > 0)
    inflate, got, pos = zlib.decompressobj(), 0, 8
    while pos + 8 <= len(data) and got < want:
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            got += len(inflate.decompress(data[pos + 8:pos + 8 + length], want - got))
            while inflate.unconsumed_tail and got < want:
                got += len(inflate.decompress(inflate.unconsumed_tail, want - got))
        pos += 12 + length
    return max(0, want - got)
