"""``make_decoder``: the decoder a job asks for by name (``data/decoders.py``: ``auto``,
``dali`` or ``pil``)."""
from __future__ import annotations

from data.decode.dali import HW_DECODER_LOAD, DaliViewDecoder
from data.decode.pil import pil_views
from data.decoders import resolve_decoder


def make_decoder(kind: str, *, batch_size: int, device: str, num_threads: int = 2,
                 hw_decoder_load: float | None = None, preallocate_width_hint: int = 0,
                 preallocate_height_hint: int = 0):
    """A callable (datas, boxes, flips) -> (B, 3, 224, 224) float32 normalised tensor.

    ``auto`` is DALI where it is installed, else PIL; ``dali`` without DALI raises
    ``data.decoders.DaliMissing`` (one line naming the extra). DALI decodes on the GPU that
    ``device`` names (``cuda:1`` -> GPU 1); the hardware decoder's settings
    (``data/decode/dali.py``; None: DALI's default) only matter there."""
    if resolve_decoder(kind) == "dali":
        return DaliViewDecoder(batch_size=batch_size, device=device, num_threads=num_threads,
                               hw_decoder_load=HW_DECODER_LOAD if hw_decoder_load is None else hw_decoder_load,
                               preallocate_width_hint=preallocate_width_hint,
                               preallocate_height_hint=preallocate_height_hint)
    return pil_views
