"""The PIL reference decoder of a view: the pixel rules of ``data/decode/pixels.py``, one image
per task, the batch's images over a long-lived thread pool (PIL's decode and resize release the
GIL). ``data.decode.dali`` and ``data.decode.tvjpeg`` are the fast paths and agree with it within
``pixels.VIEW_BOUND`` / ``pixels.MEAN_BOUND``."""
from __future__ import annotations

import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from data.decode.pixels import SIXTEEN_BIT_MODES, SIZE, check_box, crop_corners, normalize_uint8, to_rgb
from data.decoders import DecodeError, sample_name
from data.imagecheck import PIL_ERRORS


def pil_view(data: bytes, box: Sequence[int], flip: bool, size: int = SIZE) -> np.ndarray:
    """Decode one view with PIL: the reference implementation.

    data: the encoded image (any format PIL reads); box: (x, y, w, h) ints in the stored
    image's pixels; flip: mirror left-right after resizing.
    Returns np.uint8 (size, size, 3), RGB.
    """
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        box = check_box(box, width=width, height=height)
        if image.mode in SIXTEEN_BIT_MODES:
            rgb = Image.fromarray(to_rgb(image))
        else:
            rgb = image.convert("RGB")
    crop = rgb.crop(crop_corners(box))
    resized = crop.resize((size, size), resample=Image.Resampling.BILINEAR)
    if flip:
        resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(resized)


# The decoding pools, one per (process, size): made on first use and kept, so that a batch pays
# no thread start-up; keyed by the process id too because a forked child inherits the parent's
# pool object without its threads.
_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def decode_pool(num_threads: int) -> ThreadPoolExecutor:
    """The long-lived pool of ``num_threads`` PIL decoding threads of this process."""
    key = (os.getpid(), num_threads)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = ThreadPoolExecutor(num_threads, thread_name_prefix=f"pil-decode-{num_threads}")
        return pool


def pil_views(
    datas: Sequence[bytes],
    boxes: np.ndarray | Sequence[Sequence[int]],
    flips: np.ndarray | Sequence[bool],
    size: int = SIZE,
    normalize: bool = True,
    num_threads: int = 1,
) -> torch.Tensor:
    """Decode a batch of views with PIL, over ``num_threads`` threads (1: in the caller's).

    datas: B encoded images; boxes: (B, 4) ints (x, y, w, h); flips: (B,) bool.
    Returns float32 (B, 3, size, size): normalised with MEAN/STD if ``normalize``, else the
    RGB pixel values on the 0..255 scale; the same pixels for any ``num_threads``. Raises
    ``DecodeError`` naming the first sample, in batch order, that cannot be decoded or whose box
    leaves it (``data.decoders.sample_name``).
    """
    boxes = np.asarray(boxes)
    flips = np.asarray(flips)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) != len(datas) or flips.shape != (len(datas),):
        raise ValueError(
            f"pil_views: expected {len(datas)} images, boxes ({len(datas)}, 4) and flips "
            f"({len(datas)},), got boxes {boxes.shape} and flips {flips.shape}"
        )
    if num_threads < 1:
        raise ValueError(f"pil_views: num_threads must be >= 1, got {num_threads}")
    pixels = np.empty((len(datas), size, size, 3), dtype=np.uint8)

    def one(k: int) -> None:
        pixels[k] = pil_view(datas[k], boxes[k], bool(flips[k]), size=size)

    if num_threads == 1 or len(datas) < 2:
        tasks = None
    else:
        tasks = [decode_pool(num_threads).submit(one, k) for k in range(len(datas))]
    try:
        for k in range(len(datas)):
            try:
                one(k) if tasks is None else tasks[k].result()
            except PIL_ERRORS as error:
                raise DecodeError(f"{sample_name(datas, k)}: PIL cannot decode its view with crop box "
                                  f"{boxes[k].tolist()} ({type(error).__name__}: {error})") from error
    finally:
        if tasks is not None:                  # a failed batch: the tasks not started are dropped,
            for task in tasks:                 # and none still writes ``pixels`` once we return
                task.cancel()
            for task in tasks:
                if not task.cancelled():
                    task.exception()
    batch = torch.from_numpy(pixels)
    if normalize:
        return normalize_uint8(batch)
    return batch.permute(0, 3, 1, 2).to(torch.float32)
