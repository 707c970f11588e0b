"""``make_decoder``: the decoder a job asks for by name (``data/decoders.py``: ``auto``,
``dali``, ``pil`` or ``torchvision``)."""
from __future__ import annotations

import functools

from data.decode.dali import HW_DECODER_LOAD, DaliViewDecoder
from data.decode.pil import pil_views
from data.decode.tvjpeg import TorchvisionViewDecoder
from data.decoders import resolve_decoder


def make_decoder(kind: str, *, batch_size: int, device: str, num_threads: int = 2,
                 hw_decoder_load: float | None = None, preallocate_width_hint: int = 0,
                 preallocate_height_hint: int = 0):
    """A callable (datas, boxes, flips) -> (B, 3, 224, 224) float32 normalised tensor.

    ``auto`` is DALI where it is installed, else torchvision on a CUDA ``device``, else PIL
    (``resolve_decoder``); ``dali`` without DALI raises ``data.decoders.DaliMissing`` (one line
    naming the extra). DALI and torchvision decode on the GPU that ``device`` names (``cuda:1``
    -> GPU 1); ``num_threads`` are DALI's CPU threads, or the PIL pool's (``pil``, and the
    images ``torchvision`` leaves to PIL); the hardware decoder's settings (``data/decode/dali.py``;
    None: DALI's default) only matter to DALI there."""
    kind = resolve_decoder(kind, device=device)
    if kind == "dali":
        return DaliViewDecoder(batch_size=batch_size, device=device, num_threads=num_threads,
                               hw_decoder_load=HW_DECODER_LOAD if hw_decoder_load is None else hw_decoder_load,
                               preallocate_width_hint=preallocate_width_hint,
                               preallocate_height_hint=preallocate_height_hint)
    if kind == "torchvision":
        return TorchvisionViewDecoder(device=device, num_threads=num_threads)
    return functools.partial(pil_views, num_threads=num_threads)
