"""The pixels of a view decoded by torchvision: the batch's JPEGs in one ``decode_jpeg`` call
(nvJPEG on a GPU, libjpeg-turbo on the CPU), then crop, resize, flip and normalise as torch ops
on that device, by the rules of ``data/decode/pixels.py``; other images (PNG, CMYK JPEGs, ...)
go to the PIL reference (``data/decode/pil.py``). The fast path where DALI is not installed."""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from data.decode.pil import pil_views
from data.decode.pixels import MEAN, SIZE, STD, check_box
from data.decoders import DecodeError

# The start-of-frame markers SOF0-SOF15 (0xC4, 0xC8 and 0xCC in their range are other markers),
# and those of the JPEGs that torchvision decodes here: baseline, extended sequential and
# progressive Huffman; lossless, hierarchical and arithmetic-coded frames go to PIL.
_FRAMES = (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
_TV_FRAMES = (0xC0, 0xC1, 0xC2)

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec, warning on every call;
# they are what the pinned torchvision range (pyproject.toml) offers, so the warning is silenced.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def jpeg_frame(data: bytes) -> tuple[int, int, int, int, int] | None:
    """The frame header of a JPEG: (marker, bits per sample, height, width, components), read
    from the markers before the first scan; None for bytes that are not a JPEG or have no frame
    header there."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:                      # fill byte before a marker
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            i += 2                              # markers without a length
            continue
        if marker == 0xDA:                      # a scan before any frame header
            return None
        if marker in _FRAMES:
            if i + 10 > n:
                return None
            height = int.from_bytes(data[i + 5:i + 7], "big")
            width = int.from_bytes(data[i + 7:i + 9], "big")
            return marker, data[i + 4], height, width, data[i + 9]
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def torchvision_decodes(frame: tuple[int, int, int, int, int] | None) -> bool:
    """Whether a JPEG of this frame (``jpeg_frame``) is decoded by torchvision: 8-bit, grey or
    YCbCr/RGB, of known size; CMYK (4 components) follows rule 1 through PIL."""
    return (frame is not None and frame[0] in _TV_FRAMES and frame[1] == 8 and frame[4] in (1, 3)
            and frame[2] > 0 and frame[3] > 0)


def _levels(pixels: torch.Tensor) -> torch.Tensor:
    """Round to whole 8-bit levels as PIL's resampling does (half up, clipped to 0..255)."""
    return (pixels + 0.5).floor_().clamp_(0, 255)


def resize_view(image: torch.Tensor, box: Sequence[int], size: int = SIZE) -> torch.Tensor:
    """Rules 2-3 on a decoded image, on its device: crop ``box`` (x, y, w, h; inside the image)
    and resize to ``size x size``, bilinear, antialiased when shrinking, in PIL's two passes
    (horizontal, then vertical, each rounded to 8-bit levels; a pass whose side already is
    ``size`` is skipped).

    image: uint8 (3, H, W). Returns float32 (3, size, size) of whole levels 0..255.
    """
    x, y, w, h = (int(v) for v in box)
    crop = image[None, :, y:y + h, x:x + w].to(torch.float32)
    if w != size:
        crop = _levels(F.interpolate(crop, size=(h, size), mode="bilinear", antialias=True, align_corners=False))
    if h != size:
        crop = _levels(F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
    return crop[0]


class TorchvisionViewDecoder:
    """Decode batches of views with torchvision's JPEG decoder on ``device``.

    Arguments (keyword only):
      device: "cuda" / "cuda:N" (nvJPEG; outputs live on that GPU) or "cpu" (libjpeg-turbo).
      num_threads: threads of the PIL pool that decodes the images torchvision does not.
      size: output side in pixels.
      normalize: True -> (pixels / 255 - MEAN) / STD; False -> float pixel values 0..255.

    ``decoder(datas, boxes, flips)``: datas B encoded images, boxes (B, 4) int (x, y, w, h),
    flips (B,) bool -> float32 (B, 3, size, size) on ``device``. The JPEGs that
    ``torchvision_decodes`` go through one batched ``decode_jpeg``; the others through
    ``pil_views``. A batch with a box outside its image, or that torchvision cannot decode, is
    decoded by ``pil_views`` whole: its ``DecodeError`` names the first bad sample in batch order
    (and if PIL reads it all, its pixels are the batch's).
    """

    def __init__(self, *, device: str | torch.device = "cuda", num_threads: int = 2, size: int = SIZE,
                 normalize: bool = True):
        dev = torch.device(device)
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"TorchvisionViewDecoder: device must be 'cpu' or 'cuda[:N]', got {str(device)!r}")
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("TorchvisionViewDecoder(device='cuda') needs a CUDA GPU, but "
                                   "torch.cuda.is_available() is False; use device='cpu'")
            if dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
        if num_threads < 1 or size < 1:
            raise ValueError(f"TorchvisionViewDecoder: num_threads and size must be >= 1, got {num_threads}, {size}")
        self.device, self.num_threads, self.size, self.normalize = dev, num_threads, size, normalize

    def __call__(self, datas: Sequence[bytes], boxes, flips) -> torch.Tensor:
        boxes, flips = np.asarray(boxes), np.asarray(flips)
        n = len(datas)
        if boxes.shape != (n, 4) or flips.shape != (n,):
            raise ValueError(f"TorchvisionViewDecoder: for {n} images expected boxes ({n}, 4) and flips ({n},), "
                             f"got {boxes.shape} and {flips.shape}")
        frames = [jpeg_frame(d) for d in datas]
        jpegs = [k for k in range(n) if torchvision_decodes(frames[k])]
        others = [k for k in range(n) if not torchvision_decodes(frames[k])]
        try:
            for k in jpegs:
                check_box(boxes[k], width=frames[k][3], height=frames[k][2])
        except ValueError:
            return self._reference(datas, boxes, flips)
        pixels = torch.empty((n, 3, self.size, self.size), dtype=torch.float32, device=self.device)
        if jpegs:
            from torchvision.io import ImageReadMode, decode_jpeg

            encoded = [torch.frombuffer(bytearray(datas[k]), dtype=torch.uint8) for k in jpegs]
            try:
                images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError:
                return self._reference(datas, boxes, flips)
            for k, image in zip(jpegs, images):
                if tuple(image.shape) != (3, frames[k][2], frames[k][3]):
                    return self._reference(datas, boxes, flips)
                pixels[k] = resize_view(image, boxes[k], self.size)
            mirrored = [k for k in jpegs if flips[k]]
            if mirrored:
                pixels[mirrored] = pixels[mirrored].flip(-1)
        if others:
            try:
                rest = pil_views([datas[k] for k in others], boxes[others], flips[others], size=self.size,
                                 normalize=False, num_threads=self.num_threads)
            except DecodeError:               # named by its place in the whole batch
                return self._reference(datas, boxes, flips)
            pixels[others] = rest.to(self.device)
        return self._normalized(pixels)

    def _reference(self, datas, boxes, flips) -> torch.Tensor:
        """The batch decoded by PIL (raising its ``DecodeError``), on the device."""
        pixels = pil_views(datas, boxes, flips, size=self.size, normalize=False, num_threads=self.num_threads)
        return self._normalized(pixels.to(self.device))

    def _normalized(self, pixels: torch.Tensor) -> torch.Tensor:
        """Rule 5 on float32 (B, 3, S, S) pixel values: the arithmetic of ``pixels.normalize_uint8``."""
        if not self.normalize:
            return pixels
        mean = torch.tensor(MEAN, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(STD, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
        return (pixels / 255.0 - mean) / std
