"""Packed images: ``prepare`` (SRC -> tar shards + DALI indices + manifest) and ``ImageSet``.

The public names of the packed-image format, from the modules that hold them:

- ``data/manifest.py``: the format (constants, the per-sample table, the digest);
- ``data/pack.py``: ``prepare`` and ``pack_order`` (writing);
- ``data/imageset.py``: ``ImageSet`` (reading);
- ``data/imagesource.py``: listing SRC; ``data/imagecheck.py``: what a good image is
  (``inspect_image``, ``BadImage``, ``PrepareError``).

The on-disk format is documented in ``docs/format.md`` ("Images (prepare)").
"""
from data.imageset import MAX_OPEN, ImageSet
from data.imagesource import BadImage, PrepareError
from data.manifest import FORMAT, FORMAT_VERSION
from data.pack import pack_order, prepare

__all__ = ["FORMAT", "FORMAT_VERSION", "MAX_OPEN", "BadImage", "ImageSet", "PrepareError", "pack_order", "prepare"]
