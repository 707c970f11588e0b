"""train/loader.py: Plan's global batches (the order of data/order.py joined to the data; no
model), ``auto`` streams and views, and the store checks of the cached path. The order alone
and ``auto_streams``: tests/data/test_order.py."""
from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from store.features import FeatureStore, StoreError
from data.shards import ImageSet
from teachers.descriptors import DESCRIPTORS, PAPER_TEACHERS
from train.config import load_config
from train.loader import CachedSource, Plan, resolve_data
from train.runstore import RunStore


def _data(counts):
    """A stand-in for an ImageSet: only ``shards`` is read by Plan."""
    firsts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return SimpleNamespace(shards=[{"first": int(f), "count": int(c)} for f, c in zip(firsts, counts)])


def _global_batches(data, *, world, streams, batch, epoch):
    """Per step: the ranks' local batches, each (batch / world,)."""
    ranks = [list(Plan(data, seed=3, views=2, batch_size=batch, rank=r, world=world, window=2,
                       streams=streams).batch_indices(epoch)) for r in range(world)]
    return [[ranks[r][k][2] for r in range(world)] for k in range(len(ranks[0]))]


@pytest.mark.parametrize("streams", [1, 2, 8])
def test_every_world_size_sees_the_same_global_batches_with_fewer_or_more_streams_than_ranks(streams):
    data = _data([16] * 21 + [5])
    batch = 32
    ref = _global_batches(data, world=1, streams=streams, batch=batch, epoch=1)
    assert len(ref) > 3
    for world in (2, 4, 8):
        got = _global_batches(data, world=world, streams=streams, batch=batch, epoch=1)
        assert len(got) == len(ref)
        for k, (mine, one) in enumerate(zip(got, ref)):
            assert all(len(m) == batch // world for m in mine)
            together = np.concatenate(mine)
            assert len(np.unique(together)) == batch, (world, k)           # ranks never overlap
            assert np.array_equal(np.sort(together), np.sort(one[0])), (world, k)


def test_a_world_size_that_neither_divides_nor_is_divided_by_the_streams_is_refused():
    with pytest.raises(ValueError, match="data.streams=2 and the world size 3"):
        Plan(_data([16] * 8), seed=0, views=2, batch_size=12, world=3, streams=2)


def test_auto_teachers_are_the_stores_in_registry_order_and_a_resumed_run_keeps_its_own(prepared_data, teacher_store,
                                                                                         tmp_path):
    data = ImageSet.open(prepared_data)
    base = [f"data.images={prepared_data}", f"data.store={teacher_store}", "train.batch_size=4"]
    held = FeatureStore.open(teacher_store).teachers                               # sorted by name
    resolved = resolve_data(load_config(None, base), data).data.teachers
    assert resolved == tuple(n for n in DESCRIPTORS if n in held) and sorted(resolved) == held
    assert resolve_data(load_config(None, base), data, recorded={"teachers": ["mae"]}).data.teachers == ("mae",)
    assert resolve_data(load_config(None, base + ["data.teachers=[ibot,mae]"]), data).data.teachers == ("ibot", "mae")
    fresh = load_config(None, [f"data.images={prepared_data}", "data.source=online-fresh", "train.batch_size=4"])
    assert resolve_data(fresh, data).data.teachers == PAPER_TEACHERS                # no store
    other = tmp_path / "store"
    shutil.copytree(teacher_store, other)
    (other / held[0]).rename(other / "vit_x")                                       # a teacher no descriptor names
    with pytest.raises(StoreError) as e:
        resolve_data(load_config(None, [f"data.images={prepared_data}", f"data.store={other}", "train.batch_size=4"]), data)
    assert str(e.value) == (f"{other}: holds teachers ['vit_x'] that teachers/descriptors.py does not describe; "
                            "set data.teachers to the ones to train")


def test_auto_views_come_from_the_store_and_a_disagreeing_value_is_refused_in_one_line(prepared_data,
                                                                                        teacher_store):
    data = ImageSet.open(prepared_data)
    base = [f"data.images={prepared_data}", f"data.store={teacher_store}", "train.batch_size=4"]
    cfg = resolve_data(load_config(None, base), data)
    # 13 images in shards of 5 at batch 4: 2 streams (of 8 and 5 samples) train 2 steps an epoch, 1 stream 3
    assert (cfg.data.views, cfg.data.streams) == (2, 1)
    assert resolve_data(load_config(None, base + ["data.views=2", "data.streams=2"]), data).data.streams == 2
    # a resumed run keeps the streams it recorded
    assert resolve_data(load_config(None, base), data, recorded={"views": 2, "streams": 2}).data.streams == 2
    with pytest.raises(StoreError) as e:
        resolve_data(load_config(None, base + ["data.views=4"]), data)
    assert str(e.value) == (f"{teacher_store}: holds 2 views per image but the config sets data.views=4; "
                            "set data.views to auto or to 1..2")
    for bad in ("data.views=four", "data.streams=0"):
        with pytest.raises(ValueError, match=f"config {bad.split('=')[0]}=.* must be 'auto' or an integer > 0"):
            load_config(None, [bad])


def test_the_cached_path_refuses_a_store_masked_at_other_ratios(prepared_data, teacher_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(teacher_store, store)
    group = FeatureStore.open(store).teacher("ibot").group
    group.attrs["config"] = {**group.attrs["config"], "mask_ratio": 0.25}
    plan = Plan(ImageSet.open(prepared_data), seed=0, views=2, batch_size=4, window=2, streams=2)
    with pytest.raises(StoreError) as e:
        RunStore.open(store, plan.data, seed=0, teachers=("mae", "ibot"))
    assert str(e.value) == (f"{store / 'ibot'}: config mask_ratio=0.25 (n_visible 137) but this run masks "
                            "teacher ibot at 0.3 (n_visible 137, teachers/descriptors.py); extract a new store")


@pytest.mark.parametrize("decoder", ["pil", "dali"])
def test_cached_batches_hold_the_stored_rows_of_their_images_and_an_abandoned_epoch_leaves_none_behind(
        prepared_data, teacher_store, decoder):
    """Every batch's teacher arrays are the store's rows of its images (read one by one), its
    images the decoder's of the stored crops, over windows read ahead and looked up in bulk;
    with DALI one batch is decoding while the next is gathered, and an epoch abandoned after
    one step (its decode in flight) changes nothing in the next one."""
    from data.decode import make_decoder

    data = ImageSet.open(prepared_data)
    plan = Plan(data, seed=0, views=2, batch_size=2, window=1, streams=2)
    source = CachedSource(plan, RunStore.open(teacher_store, data, seed=0, teachers=("mae", "ibot")), decoder=decoder,
                          prefetch=1)
    reference = make_decoder(decoder, batch_size=2, device="cpu")
    fs = FeatureStore.open(teacher_store)
    for epoch in (0, 1):
        abandoned = source.epoch(epoch)
        first = next(abandoned)[1]
        abandoned.close()
        steps = list(source.epoch(epoch))
        assert len(steps) == plan.steps_per_epoch >= 5     # more than the thread and the decoder hold
        assert np.array_equal(steps[0][1]["index"], first["index"])
        for step, batch in steps:
            index = batch["index"].numpy()
            for name in ("mae", "ibot"):
                rows = fs.teacher(name).read_samples(epoch % 2, index)
                assert np.array_equal(rows["index"], index)
                for key, value in batch["teachers"][name].items():
                    assert np.array_equal(value.numpy(), rows[key]), (epoch, step, name, key)
            want = reference(data.read_many(index), rows["boxes"], rows["flips"])
            assert torch.equal(batch["images"], want), (epoch, step)


def test_a_run_on_fewer_views_than_stored_reads_the_first_slots_cached_as_online_and_records_them(
        prepared_data, teacher_store, tmp_path):
    """data.views=1 on a V=2 store: every epoch reads slot 0 (view i mod 2 of image i), cached
    and online-replay batches agree, and the run folder records the budget."""
    from train.loop import train
    from train.sources import build_source

    data = ImageSet.open(prepared_data)
    base = [f"data.images={prepared_data}", f"data.store={teacher_store}", "train.batch_size=4",
            "data.decoder=pil", "data.shuffle_window=2", "data.streams=2"]
    cfg = resolve_data(load_config(None, [*base, "data.views=1", "data.teachers=[mae]"]), data)
    assert cfg.data.views == 1
    plan = Plan(data, seed=0, views=1, store_views=2, batch_size=4, window=2, streams=2)
    cached, _ = build_source(cfg, plan, online=False, device="cpu")
    online, _ = build_source(cfg, plan, online=True, device="cpu")
    fs = FeatureStore.open(teacher_store)
    seen = {}
    for epoch in range(4):
        for (_, cb), (_, ob) in zip(cached.epoch(epoch), online.epoch(epoch)):
            bc, bo = cached.materialize(cb, "cpu"), online.materialize(ob, "cpu")
            index, view = bc["index"].numpy(), bc["view"].numpy()
            assert (view == index % 2).all()                     # slot 0 of the store, every epoch
            for key in ("index", "view", "images", "student_visible"):
                torch.testing.assert_close(bc[key], bo[key], rtol=0, atol=0)
            torch.testing.assert_close(bc["teachers"]["mae"]["index"], bo["teachers"]["mae"]["index"],
                                       rtol=0, atol=0)
            for i, v in zip(index.tolist(), view.tolist()):
                seen.setdefault(i, set()).add(v)
            rows = fs.teacher("mae").read_samples(0, index)
            for key, value in cb["teachers"]["mae"].items():
                assert np.array_equal(value.numpy(), rows[key]), (epoch, key)
    assert len(seen) == len(data) and all(len(v) == 1 for v in seen.values())
    train(load_config(None, [*base, "data.views=1", "data.teachers=[mae]", "schedule.epochs=1",
                             "schedule.warmup_epochs=0"]), out_dir=tmp_path / "run", max_steps=1, progress=False)
    assert load_config(tmp_path / "run" / "config.yaml").data.views == 1
    with pytest.raises(ValueError, match="views=3: a run trains on 1..2 of the store's views"):
        Plan(data, seed=0, views=3, store_views=2, batch_size=4)
