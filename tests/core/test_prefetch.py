"""core/prefetch.py: the producer thread's order, errors and shutdown; the CPU hand-off."""
import threading

import pytest
import torch

from core.prefetch import DeviceCopier, Prefetch


def test_prefetch_keeps_order_and_reraises_the_producers_error():
    def gen():
        yield from range(5)
        raise KeyError("shard 3")

    got = []
    with pytest.raises(KeyError, match="shard 3"):
        for item in Prefetch(gen(), 2):
            got.append(item)
    assert got == [0, 1, 2, 3, 4]


def test_close_stops_the_producer_and_waits_for_it():
    made, entered = [], threading.Event()

    def gen():
        for i in range(1000):
            made.append(i)
            entered.set()
            yield i

    pf = Prefetch(gen(), 2)
    first = next(iter(pf))
    entered.wait()
    pf.close()
    assert first == 0 and not pf.thread.is_alive()
    assert len(made) <= 4          # depth 2 in the queue, one being put, one being made


def test_the_cpu_hand_off_returns_the_batch_itself():
    copier = DeviceCopier("cpu")
    batch = {"images": torch.ones(2, 3), "teachers": {"mae": {"visible": torch.arange(4)}}, "n": 2}
    sent = copier.send(batch)
    assert sent.event is None and copier.receive(sent) is batch
    with copier.producer_stream():
        pass
