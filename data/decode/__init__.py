"""The pixels of a view: one decoder package.

- ``data.decode.pixels``: the pixel rules in one place (crop box, resize, flip,
  normalisation constants, dtype and layout, the tolerance between decoders);
- ``data.decode.pil``: the PIL reference decoder (``pil_view``, ``pil_views``);
- ``data.decode.dali``: the DALI pipelines (``DaliViewDecoder``), the fast path;
- ``data.decode.factory``: ``make_decoder``, the decoder a job asks for by name;
- ``data.decode.stored``: ``make_view_decoder``, the decoders of views stored once with a
  feature store (store/viewpixels.py: final 224 px JPEG or raw, no crop).

Modules import downwards only (pixels <- pil, dali <- factory); this file re-exports their
public names. Importing it does not import DALI (the pipeline imports it when first built);
DALI is the optional extra ``pip install '.[dali]'``, and the names a job may give
(``auto``, ``dali``, ``pil``) and whether DALI is installed are ``data/decoders.py``.
"""
from data.decode.dali import HW_DECODER_LOAD, PREALLOCATE_HINT, DaliViewDecoder, dali_device_id
from data.decode.factory import make_decoder
from data.decode.pil import pil_view, pil_views
from data.decode.pixels import (
    CUDA_BOUND_SCALE, MEAN, MEAN_BOUND, SIZE, STD, VIEW_BOUND, check_box, denormalize, normalize_uint8, to_rgb,
)

__all__ = [
    "CUDA_BOUND_SCALE", "HW_DECODER_LOAD", "MEAN", "MEAN_BOUND", "PREALLOCATE_HINT", "SIZE", "STD",
    "VIEW_BOUND", "DaliViewDecoder", "check_box", "dali_device_id", "denormalize", "make_decoder",
    "normalize_uint8", "pil_view", "pil_views", "to_rgb",
]
