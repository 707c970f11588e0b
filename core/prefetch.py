"""Producer threads and the host-to-device hand-off of their batches: ``Prefetch`` runs a generator
in a thread ahead of its consumer (extraction and training read and decode there), and
``DeviceCopier`` copies each batch to the GPU on its own stream, ordered by events."""
from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch


class Prefetch:
    """Run ``gen`` in a background thread, ``depth`` items ahead; its errors are re-raised
    in the consumer. ``context`` (optional) is entered by the thread around the iteration."""

    _END = object()

    def __init__(self, gen: Iterable, depth: int, *, context: Callable[[], Any] | None = None,
                 name: str = "prefetch"):
        self.q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        self.context = context or contextlib.nullcontext
        self.thread = threading.Thread(target=self._run, args=(gen,), daemon=True, name=name)
        self.thread.start()

    def _put(self, item) -> bool:
        """Put ``item``, giving up when the consumer has closed; True if it was put."""
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, gen):
        try:
            with self.context():
                for item in gen:
                    if not self._put(item):
                        return
            self._put(self._END)
        except BaseException as e:       # surfaced in the consumer
            self._put(e)

    def __iter__(self):
        while True:
            item = self.q.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop the thread after the item it is making, and wait for it: whatever the thread used
        (a DALI decoder) is free again when this returns."""
        self.stop.set()
        if self.thread is not threading.current_thread():
            self.thread.join()


@dataclass
class Sent:
    """A batch on its way to the device: ``tree`` (device tensors on CUDA) and the event
    after its copies (None on the CPU)."""
    tree: Any
    event: Any = None


def _map(tree, fn):
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: _map(v, fn) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map(v, fn) for v in tree)
    return tree


class DeviceCopier:
    """Pinned, side-stream host-to-device copies of batches, ordered by events. ``send`` runs in
    the producer thread, ``receive`` in the consumer.

    ``send`` takes a batch (a dict/list/tuple tree of tensors): on CUDA its CPU tensors are pinned
    and copied on the copier's own stream (``non_blocking`` from pinned memory, so the copy is
    asynchronous), and an event marks the end of the batch's copies. ``receive`` makes the
    consumer's current stream wait for that event (on the GPU; the host does not block) and records
    every device tensor of the batch on the consumer's stream, so the caching allocator does not
    reuse its memory while the consumer's kernels may still read it. Tensors already on the GPU
    (DALI's CUDA output) are ordered the same way: the producer thread runs with the copier's
    stream as its current stream (``producer_stream``), and the decoder makes that stream wait for
    its own work. On the CPU both ends are the identity."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._stream = None

    @property
    def stream(self):
        """The copier's CUDA stream (created on first use; None on the CPU)."""
        if self.cuda and self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def producer_stream(self):
        """Context for the producer thread: the copier's stream becomes its current one."""
        if not self.cuda:
            return contextlib.nullcontext()
        return torch.cuda.stream(self.stream)

    def send(self, tree) -> Sent:
        """Start copying every CPU tensor of ``tree`` to the device; returns at once."""
        if not self.cuda:
            return Sent(tree)
        stream = self.stream
        with torch.cuda.stream(stream):
            moved = _map(tree, lambda t: t.pin_memory().to(self.device, non_blocking=True)
                         if t.device.type == "cpu" else t)
            event = torch.cuda.Event()
            event.record(stream)
        return Sent(moved, event)

    def receive(self, sent: Sent):
        """The batch, usable on the caller's current stream (which waits for the copies)."""
        if sent.event is None:
            return sent.tree
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(sent.event)

        def record(t):
            if t.is_cuda:
                t.record_stream(stream)
            return t
        return _map(sent.tree, record)
