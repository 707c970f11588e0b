"""The pixels of a view decoded by DALI, the fast path of ``data/decode/pil.py``: only the crop is
decoded (``fn.decoders.image_slice``), then resized, mirrored and normalised
(``fn.crop_mirror_normalize``), on the CPU or on a GPU (nvJPEG), by the rules of
``data/decode/pixels.py``. Importing this module does not import DALI: the pipeline is built on
the first batch, and a decoder made without DALI raises ``data.decoders.DaliMissing``."""
from __future__ import annotations

import collections
import re
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from data.decode.pixels import CROP_AXES, SIZE, check_box, crop_anchor_shape, scaled_mean_std
from data.decoders import DecodeError, require_dali, sample_name

_Batch = tuple  # (datas, boxes, flips) or (datas, boxes, flips, keys)

# DALI's own defaults for the hardware JPEG decoder (fn.decoders.image_slice); the share of
# the work it takes is to be replaced by the value a GPU measures (bench/gpu_check.py).
HW_DECODER_LOAD = 0.65
PREALLOCATE_HINT = (0, 0)


def dali_device_id(device) -> int | None:
    """DALI's ``device_id`` for a torch device: None for the CPU, N for ``cuda:N``, and
    torch's current device for a bare ``cuda``. Raises ValueError for other device types."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return None
    if dev.type != "cuda":
        raise ValueError(f"DALI decodes on 'cpu' or 'cuda[:N]', got device {str(device)!r}")
    return dev.index if dev.index is not None else torch.cuda.current_device()


def _dali_reason(error: Exception) -> str:
    """The informative line of a DALI pipeline error (the one after 'encountered:')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for k, line in enumerate(lines[:-1]):
        if line.startswith("encountered"):
            return lines[k + 1]
    return lines[0] if lines else type(error).__name__


class DaliViewDecoder:
    """Decode batches of views with DALI.

    Arguments (keyword only):
      batch_size: largest number of samples in one batch.
      device: "cpu" (CPU operators, no GPU needed) or "cuda" / "cuda:N" / a torch.device
        (nvJPEG/nvImageCodec "mixed" decoder and GPU resize/normalise on that GPU; outputs
        live there).
      num_threads: DALI CPU worker threads.
      size: output side in pixels.
      prefetch: most batches that may be submitted and not yet collected with ``get``.
      normalize: True -> (pixels / 255 - MEAN) / STD; False -> float pixel values 0..255.
      device_id: CUDA device; by default the one ``device`` names (``dali_device_id``);
        if both are given they must agree.
      hw_decoder_load, preallocate_width_hint, preallocate_height_hint: the nvJPEG hardware
        decoder (A100, H100 and later; device="cuda" only): its share of the JPEG work (DALI's
        default 0.65 until a GPU has measured the best value, bench/gpu_check.py) and the image
        size its buffers are preallocated for (0: no hint).

    ``decoder(datas, boxes, flips)`` decodes one batch and waits for it; ``submit(...)`` then
    ``get()`` keep up to ``prefetch`` batches in flight on DALI's own threads while the caller
    computes, returned in submission order (``map(batches)`` wraps this into a generator). A
    batch holds 1 to ``batch_size`` samples.

    On the GPU, ``get`` takes DALI's outputs bound to the decoder's own CUDA stream (no host
    wait), copies them into a torch tensor on that stream and makes the caller's current stream
    wait for the copy with an event, so the decoding thread never waits on the GPU nor on the
    training stream.

    If DALI fails on a batch (corrupt bytes, a box outside its image), ``get`` raises
    ``data.decoders.DecodeError`` naming the offending samples (found by ``inspect_image`` and the
    box rule; ``sample_name``), drops the batches still in flight and rebuilds the pipeline on the
    next call.

    The DALI pipeline is built on the first batch, so a decoder may be constructed
    before worker processes fork; use one decoder per thread or process (it is not
    thread-safe).
    """

    def __init__(
        self,
        *,
        batch_size: int,
        device: str | torch.device = "cpu",
        num_threads: int = 2,
        size: int = SIZE,
        prefetch: int = 2,
        normalize: bool = True,
        device_id: int | None = None,
        hw_decoder_load: float = HW_DECODER_LOAD,
        preallocate_width_hint: int = PREALLOCATE_HINT[0],
        preallocate_height_hint: int = PREALLOCATE_HINT[1],
    ):
        require_dali()
        try:
            kind, index = torch.device(device).type, torch.device(device).index
        except RuntimeError:
            kind, index = str(device), None
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"DaliViewDecoder: device must be 'cpu' or 'cuda[:N]', got {str(device)!r}")
        if kind == "cuda" and index is not None and device_id is not None and device_id != index:
            raise ValueError(f"DaliViewDecoder: device {str(device)!r} and device_id={device_id} disagree")
        device = kind
        if batch_size < 1 or num_threads < 1 or size < 1 or prefetch < 1:
            raise ValueError(
                f"DaliViewDecoder: batch_size, num_threads, size and prefetch must be >= 1, got "
                f"{batch_size}, {num_threads}, {size}, {prefetch}"
            )
        if not 0.0 <= hw_decoder_load <= 1.0:
            raise ValueError(f"DaliViewDecoder: hw_decoder_load must be in [0, 1], got {hw_decoder_load}")
        if preallocate_width_hint < 0 or preallocate_height_hint < 0:
            raise ValueError(
                "DaliViewDecoder: preallocate_width_hint and preallocate_height_hint must be >= 0, got "
                f"{preallocate_width_hint}, {preallocate_height_hint}"
            )
        if device == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(
                    "DaliViewDecoder(device='cuda') needs a CUDA GPU, but torch.cuda.is_available() "
                    "is False; use device='cpu'"
                )
            device_id = dali_device_id(f"cuda:{index}" if index is not None else "cuda") if device_id is None \
                else device_id
        self.batch_size = batch_size
        self.device = device
        self.num_threads = num_threads
        self.size = size
        self.prefetch = prefetch
        self.normalize = normalize
        self.device_id = device_id if device == "cuda" else None
        self.hw_decoder_load = float(hw_decoder_load)
        self.preallocate_hint = (int(preallocate_width_hint), int(preallocate_height_hint))
        self._pipe = None
        self._pending: collections.deque = collections.deque()
        self._stream = None  # the decoder's CUDA stream (made with the pipeline)
        self._in_copy: collections.deque = collections.deque()  # (event, DALI output) until copied

    # -- pipeline -------------------------------------------------------------------
    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        # crop_mirror_normalize works on 0..255 pixels: (p - 255 * MEAN) / (255 * STD).
        mean, std = scaled_mean_std(self.normalize)
        cuda = self.device == "cuda"

        @pipeline_def(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            # One DALI-side output slot; the runs themselves queue up behind
            # schedule_run, and ``prefetch`` bounds how many we let queue.
            prefetch_queue_depth=1,
        )
        def view_pipeline():
            data = fn.external_source(name="data", dtype=types.UINT8, ndim=1)
            anchor = fn.external_source(name="anchor", dtype=types.INT32, ndim=1)
            shape = fn.external_source(name="shape", dtype=types.INT32, ndim=1)
            mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
            extra = dict(device="cpu")
            if cuda:
                extra = dict(device="mixed", jpeg_fancy_upsampling=True, hw_decoder_load=self.hw_decoder_load,
                             preallocate_width_hint=self.preallocate_hint[0],
                             preallocate_height_hint=self.preallocate_hint[1])
            image = fn.decoders.image_slice(
                data,
                anchor,
                shape,
                output_type=types.RGB,
                axis_names=CROP_AXES,
                adjust_orientation=False,
                **extra,
            )
            image = fn.resize(
                image,
                size=[self.size, self.size],
                mode="stretch",
                interp_type=types.INTERP_LINEAR,
                antialias=True,
            )
            return fn.crop_mirror_normalize(
                image,
                mirror=mirror,
                mean=mean,
                std=std,
                dtype=types.FLOAT,
                output_layout="CHW",
            )

        pipe = view_pipeline()
        pipe.build()
        if cuda and self._stream is None:
            self._stream = torch.cuda.Stream(torch.device("cuda", self.device_id))
        return pipe

    # -- batches --------------------------------------------------------------------
    def _check(self, datas, boxes, flips, keys):
        n = len(datas)
        if not 1 <= n <= self.batch_size:
            raise ValueError(
                f"DaliViewDecoder: a batch needs 1 to {self.batch_size} samples, got {n}"
            )
        boxes = np.asarray(boxes)
        flips = np.asarray(flips)
        if boxes.shape != (n, 4) or flips.shape != (n,):
            raise ValueError(
                f"DaliViewDecoder: for {n} images expected boxes ({n}, 4) and flips ({n},), "
                f"got {boxes.shape} and {flips.shape}"
            )
        if not np.issubdtype(boxes.dtype, np.integer):
            raise ValueError(f"DaliViewDecoder: boxes must be integer pixels, got dtype {boxes.dtype}")
        if keys is not None and len(keys) != n:
            raise ValueError(f"DaliViewDecoder: got {len(keys)} keys for {n} images")
        bad = np.flatnonzero((boxes[:, 2] < 1) | (boxes[:, 3] < 1) | (boxes[:, 0] < 0) | (boxes[:, 1] < 0))
        if len(bad):
            k = int(bad[0])
            raise ValueError(f"DaliViewDecoder: {sample_name(datas, k, keys)} has an invalid box {boxes[k].tolist()}")
        return boxes.astype(np.int32), flips.astype(bool)

    def submit(
        self,
        datas: Sequence[bytes],
        boxes: np.ndarray,
        flips: np.ndarray,
        *,
        keys: Sequence[str] | None = None,
    ) -> None:
        """Queue one batch for decoding and return at once.

        datas: B encoded images (bytes); boxes: (B, 4) int (x, y, w, h) in each image's
        stored pixels; flips: (B,) bool; keys: optional B names used in error messages.
        Raises RuntimeError if ``prefetch`` batches are already waiting for ``get``.
        """
        if len(self._pending) >= self.prefetch:
            raise RuntimeError(
                f"DaliViewDecoder: {len(self._pending)} batches already in flight "
                f"(prefetch={self.prefetch}); call get() before submitting more"
            )
        boxes32, flips = self._check(datas, boxes, flips, keys)
        if self._pipe is None:
            self._pipe = self._build()
        pipe = self._pipe
        pipe.feed_input("data", [np.frombuffer(d, dtype=np.uint8) for d in datas])
        anchors, shapes = crop_anchor_shape(boxes32)
        pipe.feed_input("anchor", list(anchors))
        pipe.feed_input("shape", list(shapes))
        pipe.feed_input("mirror", [np.array(int(f), dtype=np.int32) for f in flips])
        pipe.schedule_run()
        self._pending.append((list(datas), boxes32, keys))

    def get(self) -> torch.Tensor:
        """Wait for the oldest submitted batch.

        Returns float32 (B, 3, size, size), on the CPU for device="cpu" and on the GPU
        for device="cuda" (ready on the caller's current stream: that stream waits for the
        copy, the host does not); normalised if ``normalize``, else pixel values 0..255.
        """
        if not self._pending:
            raise RuntimeError("DaliViewDecoder.get: nothing was submitted")
        datas, boxes, keys = self._pending.popleft()
        try:
            # On the GPU: outputs bound to our stream, no host synchronisation.
            (out,) = self._pipe.outputs(cuda_stream=self._stream) if self.device == "cuda" else self._pipe.outputs()
        except Exception as error:
            self._pipe = None  # a failed DALI pipeline cannot be used again
            self._pending.clear()
            raise DecodeError(
                f"DALI cannot decode a batch ({len(datas)} views): {self._diagnose(datas, boxes, keys, error)} "
                f"(DALI: {_dali_reason(error)}; the batches in flight were dropped)"
            ) from error
        return self._to_torch(out, len(datas))

    def _to_torch(self, out, n: int) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        if self.device == "cuda":
            return self._to_torch_cuda(out, n, feed_ndarray)
        # The one copy out of DALI's buffers, which the next run reuses.
        target = torch.empty((n, 3, self.size, self.size), dtype=torch.float32)
        feed_ndarray(out.as_tensor(), target)
        return target

    def _to_torch_cuda(self, out, n: int, feed_ndarray) -> torch.Tensor:
        """Copy DALI's GPU output into a torch tensor on the decoder's stream, ordered for the
        caller's current stream by an event. A copy (not a DLPack view of DALI's buffer) so
        that the memory is torch's: the caching allocator then keeps it alive for every
        stream that uses it (``record_stream``), which it cannot do for DALI's memory."""
        device = torch.device("cuda", self.device_id)
        while self._in_copy and self._in_copy[0][0].query():
            self._in_copy.popleft()  # copies that finished: DALI may reuse those buffers
        with torch.cuda.stream(self._stream):
            target = torch.empty((n, 3, self.size, self.size), dtype=torch.float32, device=device)
        feed_ndarray(out.as_tensor(), target, cuda_stream=self._stream)
        done = torch.cuda.Event()
        done.record(self._stream)
        self._in_copy.append((done, out))  # DALI's buffer stays alive until the copy ran
        caller = torch.cuda.current_stream(device)
        caller.wait_event(done)
        target.record_stream(caller)
        return target

    @staticmethod
    def _diagnose(datas, boxes, keys, error: Exception) -> str:
        """Name the samples DALI could not handle: those ``prepare``'s image check refuses or
        whose box leaves the image; else the one DALI's message numbers (``sample #k``)."""
        from data.imagecheck import BadImage, inspect_image

        problems = []
        for k, data in enumerate(datas):
            name = sample_name(datas, k, keys)
            try:
                info = inspect_image(data, source=name)
                check_box(boxes[k], width=info.width, height=info.height, what=name)
            except (BadImage, ValueError) as bad:
                problems.append(str(bad))
        if problems:
            return "; ".join(problems)
        numbered = re.search(r"sample #(\d+)", str(error))
        if numbered and int(numbered.group(1)) < len(datas):
            return f"{sample_name(datas, int(numbered.group(1)), keys)} (which PIL reads)"
        return f"PIL reads every image and box of it, from {sample_name(datas, 0, keys)} on"

    def __call__(
        self,
        datas: Sequence[bytes],
        boxes: np.ndarray,
        flips: np.ndarray,
        *,
        keys: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Decode one batch and wait for it: datas B bytes, boxes (B, 4) int, flips (B,) bool
        -> float32 (B, 3, size, size). Not allowed while submitted batches are pending."""
        if self._pending:
            raise RuntimeError(
                f"DaliViewDecoder: {len(self._pending)} submitted batches are not collected; "
                "call get() first"
            )
        self.submit(datas, boxes, flips, keys=keys)
        return self.get()

    def map(self, batches: Iterable[_Batch]) -> Iterator[torch.Tensor]:
        """Decode an iterable of ``(datas, boxes, flips)`` (or ``(..., keys)``) tuples,
        keeping up to ``prefetch`` batches in flight; yields float32 (B, 3, size, size)
        in input order."""
        if self._pending:
            raise RuntimeError("DaliViewDecoder.map: submitted batches are not collected; call get() first")
        try:
            for batch in batches:
                if len(self._pending) >= self.prefetch:
                    yield self.get()
                datas, boxes, flips, *rest = batch
                self.submit(datas, boxes, flips, keys=rest[0] if rest else None)
            while self._pending:
                yield self.get()
        finally:
            self.drain()

    def drain(self) -> None:
        """Wait for and discard every batch still in flight (e.g. after abandoning ``map``)."""
        while self._pending:
            try:
                self.get()
            except DecodeError:
                pass  # get() already dropped the rest and reset the pipeline

    @property
    def pending(self) -> int:
        """Number of submitted batches not yet collected."""
        return len(self._pending)
