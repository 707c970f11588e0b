"""data/order.py: the training order on its own (no model, no images): every sample at most
once per epoch, the same global batches on every world size, batch k a function of
(seed, epoch, k) alone, and a bounded dropped tail, on an ImageNet-like shape and on small sets."""
from __future__ import annotations

import numpy as np
import pytest

from data.order import AUTO_STREAMS_KEEP, Order, auto_streams, stream_shards, stream_span, stream_windows

IMAGENET = [256] * 1000 + [143]     # 256,143 images: 1000 full shards and a short last one
SHAPES = {                          # name: (shard counts, global batch)
    "imagenet": (IMAGENET, 4096),
    "41-in-one-shard": ([41], 8),
    "13-in-shards-of-5": ([5, 5, 3], 4),
    "13-in-one-shard": ([13], 4),
}


def _shards(counts):
    firsts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return [[int(f), int(c)] for f, c in zip(firsts, counts)]


def _feasible(counts, batch):
    """The stream counts of 8, 4, 2, 1 the shape can be read as."""
    out = []
    for s in (8, 4, 2, 1):
        try:
            if Order(_shards(counts), seed=0, batch_size=batch, streams=s).steps_per_epoch:
                out.append(s)
        except ValueError:
            pass
    return out


CASES = [(name, s) for name, (counts, batch) in SHAPES.items() for s in _feasible(counts, batch)]


def test_the_shapes_resolve_to_the_streams_a_run_would_take():
    assert {name: auto_streams(_shards(c), global_batch=b) for name, (c, b) in SHAPES.items()} == {
        "imagenet": 8, "41-in-one-shard": 1, "13-in-shards-of-5": 1, "13-in-one-shard": 1}
    assert [s for name, s in CASES if name == "imagenet"] == [8, 4, 2, 1]
    assert [s for name, s in CASES if name == "13-in-shards-of-5"] == [2, 1]


@pytest.mark.parametrize("name, streams", CASES)
def test_every_sample_is_seen_at_most_once_per_epoch(name, streams):
    counts, batch = SHAPES[name]
    order = Order(_shards(counts), seed=7, batch_size=batch, window=4, streams=streams)
    for epoch in (0, 1):
        seen = np.concatenate([index for _, _, index in order.batch_indices(epoch)])
        assert len(seen) == order.steps_per_epoch * batch
        assert len(np.unique(seen)) == len(seen), (epoch, "a sample came twice")
        assert seen.min() >= 0 and seen.max() < sum(counts)


@pytest.mark.parametrize("name, streams", CASES)
def test_one_two_four_and_eight_ranks_see_the_same_global_batches(name, streams):
    counts, batch = SHAPES[name]
    shards = _shards(counts)
    one = [index for _, _, index in Order(shards, seed=7, batch_size=batch, streams=streams).batch_indices(1)]
    for world in (2, 4, 8):
        if batch % world:
            continue
        ranks = [[index for _, _, index in Order(shards, seed=7, batch_size=batch, rank=r, world=world,
                                                 streams=streams).batch_indices(1)] for r in range(world)]
        assert all(len(mine) == len(one) for mine in ranks)
        for k, ref in enumerate(one):
            parts = [mine[k] for mine in ranks]
            assert all(len(p) == batch // world for p in parts)
            together = np.concatenate(parts)
            assert len(np.unique(together)) == batch, (world, k, "two ranks served one sample")
            assert np.array_equal(np.sort(together), np.sort(ref)), (world, k)


@pytest.mark.parametrize("streams, world", [(8, 2), (8, 8), (2, 8), (1, 4)])
def test_each_rank_serves_its_streams_rows_of_the_global_batch(streams, world):
    """Rank r of W serves streams j = r mod W (streams >= W), or part r mod (W / S) of stream
    r // (W / S)'s slice (streams < W); global_batch lists the streams' slices in order."""
    shards, batch = _shards([16] * 37 + [9]), 64
    per = batch // streams
    for k in (0, 3):
        full = Order(shards, seed=1, batch_size=batch, streams=streams).global_batch(2, k).reshape(streams, per)
        for r in range(world):
            got = Order(shards, seed=1, batch_size=batch, rank=r, world=world, streams=streams).batch(2, k)
            if streams >= world:
                want = full[r::world].ravel()
            else:
                share = world // streams
                n = per // share
                want = full[r // share, (r % share) * n:(r % share + 1) * n]
            assert np.array_equal(got, want), (k, r)


@pytest.mark.parametrize("name, streams", CASES)
def test_batch_k_is_computed_from_seed_epoch_and_k_alone(name, streams):
    """Order.batch(e, k) on a fresh Order, which shuffles only the windows step k lies in,
    equals the k-th batch of iterating the epoch from its start."""
    counts, batch = SHAPES[name]
    shards = _shards(counts)
    iterated = [index for _, _, index in Order(shards, seed=5, batch_size=batch, streams=streams).batch_indices(3)]
    for k in sorted({0, 1, len(iterated) // 2, len(iterated) - 1} & set(range(len(iterated)))):
        direct = Order(shards, seed=5, batch_size=batch, streams=streams).batch(3, k)
        assert direct.dtype == np.int64 and direct.shape == (batch,)
        assert np.array_equal(direct, iterated[k]), k
        assert np.array_equal(Order(shards, seed=5, batch_size=batch, streams=streams).global_batch(3, k), direct)
    if len(iterated) > 1 or sum(counts) > batch:   # more than one possible batch: the keys matter
        assert not np.array_equal(Order(shards, seed=5, batch_size=batch, streams=streams).batch(4, 0), iterated[0])
        assert not np.array_equal(Order(shards, seed=6, batch_size=batch, streams=streams).batch(3, 0), iterated[0])


def test_a_step_or_position_outside_the_epoch_is_refused():
    order = Order(_shards([5, 5, 3]), seed=0, batch_size=4, streams=2)
    assert order.steps_per_epoch == 2        # streams of 5 + 3 and 5 samples: two slices of 2
    with pytest.raises(IndexError, match="step 2 is outside an epoch of 2 steps"):
        order.batch(0, 2)
    with pytest.raises(IndexError, match="outside stream 1's epoch"):
        stream_span(_shards([5, 5, 3]), seed=0, epoch=0, stream=1, streams=2, window=4, start=0, stop=6)


@pytest.mark.parametrize("name, streams", CASES)
def test_the_dropped_tail_is_bounded_by_one_shard_per_stream_plus_a_batch(name, streams):
    """Dropped per epoch, from steps_per_epoch: each stream keeps the samples of the shortest
    stream in whole slices; with at most one short shard that is less than one shard per
    stream plus one batch."""
    counts, batch = SHAPES[name]
    order = Order(_shards(counts), seed=0, batch_size=batch, streams=streams)
    size, per = max(counts), batch // streams
    lengths = [sum(counts[k] for k in stream_shards(counts, seed=0, epoch=e, stream=j, streams=streams))
               for e in range(3) for j in range(streams)]
    sure = min(lengths)
    dropped = sum(counts) - order.steps_per_epoch * batch
    assert dropped == sum(counts) - streams * (sure // per) * per
    assert 0 <= dropped < streams * size + batch
    one = Order(_shards(counts), seed=0, batch_size=batch, streams=1).steps_per_epoch
    if streams == auto_streams(_shards(counts), global_batch=batch):
        assert order.steps_per_epoch >= AUTO_STREAMS_KEEP * one


def _random_shapes(n: int, seed: int = 0):
    """n (shard counts, global batch, streams) with a short last shard, sometimes more short
    shards, that can be read as their streams (at least one step)."""
    rng, out = np.random.default_rng(seed), []
    while len(out) < n:
        size, num = int(rng.integers(1, 40)), int(rng.integers(1, 30))
        counts = [size] * num + [int(rng.integers(1, size + 1))]
        for k in rng.choice(len(counts), size=int(rng.integers(0, 3))):
            counts[k] = int(rng.integers(1, size + 1))
        streams = int(rng.choice([1, 2, 4, 8]))
        batch = streams * int(rng.integers(1, 9))
        try:
            Order(_shards(counts), seed=0, batch_size=batch, streams=streams).steps_per_epoch
        except ValueError:
            continue
        out.append((counts, batch, streams))
    return out


@pytest.mark.parametrize("counts, batch, streams", _random_shapes(40))
def test_every_global_batch_of_every_epoch_is_full_for_any_shards_batch_and_streams(counts, batch, streams):
    """Whatever the shuffle puts the short shards in one stream: 60 epochs of a random shape,
    every global batch holds batch_size distinct samples (the epoch is shorter instead)."""
    order = Order(_shards(counts), seed=11, batch_size=batch, streams=streams)
    for epoch in range(60):
        batches = [index for _, _, index in order.batch_indices(epoch)]
        assert len(batches) == order.steps_per_epoch
        assert all(len(b) == batch for b in batches), (epoch, [len(b) for b in batches])
        seen = np.concatenate(batches)
        assert len(np.unique(seen)) == len(seen), epoch


def test_the_reported_short_batches_are_full_now():
    """Shards [5, 5, 3], batch 4, 2 streams, seed 7: epochs 4 and 5 gave batches of 3 (and one
    sample on one of 2 ranks) when the shard of 3 fell to the stream with one shard."""
    for world in (1, 2):
        for epoch in range(50):
            for rank in range(world):
                order = Order(_shards([5, 5, 3]), seed=7, batch_size=4, rank=rank, world=world, streams=2)
                assert all(len(index) == 4 // world for _, _, index in order.batch_indices(epoch)), (epoch, rank)


IMAGENET_1K = [256] * 5004 + [143]   # 1,281,167 images in shards of 256


@pytest.mark.parametrize("batch", [1024, 2048, 4096])
def test_imagenet_shape_gives_full_batches_on_1_2_4_8_ranks_in_every_epoch(batch):
    """The ImageNet-1k manifest shape (no data, no model), 8 streams (what auto picks): in 40
    epochs no stream gets 624 full shards and the short one (what broke: one stream 113 samples
    short in 18 of 40 epochs), every stream holds the epoch's steps, and the last step of each
    epoch is a full local batch on every rank of 1, 2, 4 and 8."""
    shards = _shards(IMAGENET_1K)
    assert auto_streams(shards, global_batch=batch) == 8
    steps = Order(shards, seed=0, batch_size=batch, streams=8).steps_per_epoch
    assert steps == 625 * 256 // (batch // 8)      # the short shard goes to a stream of 626 shards
    for epoch in range(40):
        lengths = [sum(IMAGENET_1K[k] for k in stream_shards(IMAGENET_1K, seed=0, epoch=epoch, stream=j, streams=8))
                   for j in range(8)]
        assert sorted(lengths) == [625 * 256] * 3 + [625 * 256 + 143] + [626 * 256] * 4, epoch
        for world in (1, 2, 4, 8):
            for rank in range(world):
                last = Order(shards, seed=0, batch_size=batch, rank=rank, world=world, streams=8).batch(epoch, steps - 1)
                assert len(last) == batch // world, (epoch, world, rank)


def test_imagenet_drops_half_a_batch_and_the_short_shard_with_eight_streams():
    order = Order(_shards(IMAGENET), seed=0, batch_size=4096, streams=8)
    # 125 shards of 256 a stream = 62.5 slices of 512: 62 steps, half a slice of each stream left
    assert order.steps_per_epoch == 62
    assert sum(IMAGENET) - 62 * 4096 == 8 * 256 + 143


def test_a_stream_reads_its_shards_whole_and_in_sequence():
    """Every window holds exactly the samples of its shards, each shard in one window, and
    the windows a rank touches only move forward."""
    shards = _shards([16] * 21 + [5])
    wins = stream_windows(shards, seed=2, epoch=0, stream=1, streams=2, window=3)
    ids = np.concatenate([s for s, _ in wins])
    assert len(np.unique(ids)) == len(ids) == 11
    for shard_ids, idx in wins:
        want = np.concatenate([np.arange(shards[s][0], shards[s][0] + shards[s][1]) for s in shard_ids])
        assert np.array_equal(np.sort(idx), np.sort(want))
    order = Order(shards, seed=2, batch_size=16, rank=1, world=2, window=3, streams=2)
    last = -1
    for _, touched, _ in order.batch_indices(0):
        assert all(j == 1 for j, _ in touched)
        assert touched[0][1] >= last and [w for _, w in touched] == sorted(w for _, w in touched)
        last = touched[-1][1]


@pytest.mark.parametrize("counts, batch, expected", [
    ([256] * 5004 + [143], 4096, 8),   # ImageNet-1k train: 1,281,167 images
    ([41], 8, 1),                      # a few dozen photos in one shard
    ([5, 5, 3], 4, 1),                 # 13 photos in shards of 5: 2 streams (8 and 5) train 2 of 3 steps
    ([256] * 3 + [232], 256, 4),       # 1000 images: 4 streams of one shard each keep all 3 steps
    ([256] * 39 + [16], 256, 4),       # 10000 images: 4 streams keep 36 of 39 steps, 8 only 32
    ([256] * 39 + [16], 90, 2),        # a batch that 4 and 8 streams do not divide
])
def test_auto_streams_takes_the_most_streams_that_keep_nine_tenths_of_an_epoch(counts, batch, expected):
    assert auto_streams([[0, c] for c in counts], global_batch=batch) == expected


def test_auto_streams_refuses_a_set_smaller_than_one_batch():
    with pytest.raises(ValueError, match="1 image shards of up to 6 samples are too few for a global batch of 8"):
        auto_streams([[0, 6]], global_batch=8)
