"""Packed images: ``prepare`` (SRC -> tar shards + DALI indices + manifest) and ``ImageSet``.

The public names of the packed-image format, from the modules that hold them:

- ``store/manifest.py``: the format (constants, the per-sample table, the digest);
- ``store/pack.py``: ``prepare`` and ``pack_order`` (writing);
- ``store/imageset.py``: ``ImageSet`` (reading);
- ``store/imagesource.py``: listing SRC; ``store/imagecheck.py``: what a good image is
  (``inspect_image``, ``BadImage``, ``PrepareError``).

The on-disk format is documented in ``docs/format.md`` ("Images (prepare)").
"""
from store.imageset import MAX_OPEN, ImageSet
from store.imagesource import BadImage, PrepareError
from store.manifest import FORMAT, FORMAT_VERSION
from store.pack import pack_order, prepare

__all__ = ["FORMAT", "FORMAT_VERSION", "MAX_OPEN", "BadImage", "ImageSet", "PrepareError", "pack_order", "prepare"]
