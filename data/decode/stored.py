"""Decoders of stored views (store/viewpixels.py): the view is final, 224 x 224 RGB, so only
decoding (JPEG: PIL, or DALI ``fn.decoders.image`` on the CPU or nvJPEG on a GPU) or none at all
(raw: ``np.frombuffer``) and the normalisation remain; ``make_view_decoder`` picks one."""
from __future__ import annotations

import functools
import io
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from data.decode.dali import dali_device_id
from data.decode.pixels import SIZE, normalize_uint8, scaled_mean_std
from data.decoders import require_dali, resolve_decoder


def raw_views(datas: Sequence[bytes], normalize: bool = True) -> torch.Tensor:
    """B raw views (224 * 224 * 3 bytes each, HWC) -> float32 (B, 3, 224, 224) normalised
    (or, without ``normalize``, uint8 (B, 224, 224, 3))."""
    pixels = torch.from_numpy(np.stack([np.frombuffer(d, dtype=np.uint8).reshape(SIZE, SIZE, 3) for d in datas]))
    return normalize_uint8(pixels) if normalize else pixels


def pil_stored_views(datas: Sequence[bytes], normalize: bool = True) -> torch.Tensor:
    """B JPEG views -> float32 (B, 3, 224, 224) normalised (or uint8 (B, 224, 224, 3)), decoded by PIL."""
    pixels = np.empty((len(datas), SIZE, SIZE, 3), dtype=np.uint8)
    for k, d in enumerate(datas):
        with Image.open(io.BytesIO(d)) as image:
            pixels[k] = np.asarray(image.convert("RGB"))
    return normalize_uint8(torch.from_numpy(pixels)) if normalize else torch.from_numpy(pixels)


class DaliStoredViews:
    """B JPEG views -> float32 (B, 3, 224, 224) normalised, decoded by DALI on ``device``
    (``cpu`` or ``cuda[:N]``); the pipeline is built on the first batch. Without DALI installed
    it raises ``data.decoders.DaliMissing`` (one line naming the extra)."""

    def __init__(self, *, batch_size: int, device: str = "cpu", num_threads: int = 2, normalize: bool = True):
        require_dali()
        self.batch_size, self.num_threads, self.normalize = batch_size, num_threads, normalize
        self.device = torch.device(device)
        self.device_id = dali_device_id(self.device)
        self._pipe = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        mean, std = scaled_mean_std(True)
        cuda = self.device.type == "cuda"

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                      prefetch_queue_depth=1)
        def stored_pipeline():
            data = fn.external_source(name="data", dtype=types.UINT8, ndim=1)
            image = fn.decoders.image(data, device="mixed" if cuda else "cpu", output_type=types.RGB,
                                      adjust_orientation=False)
            if not self.normalize:
                return image                    # uint8 HWC, normalised on the training device
            return fn.crop_mirror_normalize(image, mean=mean, std=std, dtype=types.FLOAT, output_layout="CHW")

        pipe = stored_pipeline()
        pipe.build()
        return pipe

    def __call__(self, datas: Sequence[bytes]) -> torch.Tensor:
        if not 1 <= len(datas) <= self.batch_size:
            raise ValueError(f"DaliStoredViews: a batch needs 1 to {self.batch_size} views, got {len(datas)}")
        if self._pipe is None:
            self._pipe = self._build()
        self._pipe.feed_input("data", [np.frombuffer(d, dtype=np.uint8) for d in datas])
        (out,) = self._pipe.run()
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray
            dense = out.as_tensor()
            result = torch.empty(dense.shape(), dtype=torch.float32 if self.normalize else torch.uint8,
                                 device=self.device)
            feed_ndarray(dense, result, cuda_stream=torch.cuda.current_stream(self.device))
            return result
        return torch.from_numpy(np.array(out.as_array()))


def make_view_decoder(form: str, kind: str, *, batch_size: int, device: str = "cpu", num_threads: int = 2,
                      normalize: bool = True):
    """The decoder of stored views of ``form`` (``jpeg`` or ``raw``) for the job's decoder
    ``kind`` (``auto``, ``dali``, ``pil`` or ``torchvision``; data/decoders.py; ``torchvision``
    decodes the small stored views by PIL): a callable datas -> (B, 3, 224, 224) float32 normalised
    (``normalize=False``: uint8 (B, 224, 224, 3))."""
    kind = resolve_decoder(kind)
    if form == "raw":
        return functools.partial(raw_views, normalize=normalize)
    if form != "jpeg":
        raise ValueError(f"unknown view pixel form {form!r}; choose 'jpeg' or 'raw'")
    if kind in ("pil", "torchvision"):
        return functools.partial(pil_stored_views, normalize=normalize)
    return DaliStoredViews(batch_size=batch_size, device=device, num_threads=num_threads, normalize=normalize)
