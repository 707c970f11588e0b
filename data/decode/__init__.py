"""The pixels of a view: ``pixels`` (the rules), ``pil`` (the reference), ``dali`` (the fast path),
``tvjpeg`` (torchvision's batched JPEG decoder, the fast path without DALI), ``factory``
(``make_decoder``, by name) and ``stored`` (decoders of views stored with a feature store); this
file re-exports their public names (docs/CONTRACTS.md, "The pixels of a view"). Importing it does
not import DALI."""
from data.decode.dali import HW_DECODER_LOAD, PREALLOCATE_HINT, DaliViewDecoder, dali_device_id
from data.decode.factory import make_decoder
from data.decode.pil import decode_pool, pil_view, pil_views
from data.decode.pixels import (
    CUDA_BOUND_SCALE, MEAN, MEAN_BOUND, SIZE, STD, VIEW_BOUND, check_box, denormalize, normalize_uint8, to_rgb,
)
from data.decode.tvjpeg import TorchvisionViewDecoder, jpeg_frame, resize_view

__all__ = [
    "CUDA_BOUND_SCALE", "HW_DECODER_LOAD", "MEAN", "MEAN_BOUND", "PREALLOCATE_HINT", "SIZE", "STD",
    "VIEW_BOUND", "DaliViewDecoder", "TorchvisionViewDecoder", "check_box", "dali_device_id", "decode_pool",
    "denormalize", "jpeg_frame", "make_decoder", "normalize_uint8", "pil_view", "pil_views", "resize_view", "to_rgb",
]
