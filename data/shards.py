"""Packed images, the public names: ``prepare`` and ``pack_order`` (``data/pack.py``), ``ImageSet``
(``data/imageset.py``), and from ``data/imagecheck.py`` ``inspect_image``, ``BadImage`` and
``PrepareError``. The format: docs/format.md, "Images (prepare)"."""
from data.imageset import MAX_OPEN, ImageSet
from data.imagesource import BadImage, PrepareError
from data.manifest import FORMAT, FORMAT_VERSION
from data.pack import pack_order, prepare

__all__ = ["FORMAT", "FORMAT_VERSION", "MAX_OPEN", "BadImage", "ImageSet", "PrepareError", "pack_order", "prepare"]
