"""One reader per job: a cached ``train`` run (a sweep too, and its held-out store) opens its feature
store once and runs each store check once; an extraction opens its store, and its view pixels,
once (train/runstore.py, extract/runner.py)."""
from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

import train.requirements as requirements
import train.runstore as runstore
from data.shards import ImageSet
from extract.config import ExtractConfig
from extract.runner import run_extraction
from store.features import FeatureStore
from store.viewpixels import ViewPixels
from train.config import load_config
from train.loop import train
from train.sweep import parse_variant

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TEACHERS = ("mae", "ibot")


@pytest.fixture
def counted(monkeypatch):
    """Counter of the store opens by path (``open``), of view pixel groups opened (``pixels``) and
    of the calls of each store check by name, counted from now on."""
    calls: Counter = Counter()
    real_open = FeatureStore.open.__func__

    def open_(cls, path, **kw):
        calls["open", str(Path(path))] += 1
        return real_open(cls, path, **kw)

    monkeypatch.setattr(FeatureStore, "open", classmethod(open_))
    real_init = ViewPixels.__init__

    def init(self, root, group):
        calls["pixels", str(root.path)] += 1
        real_init(self, root, group)

    monkeypatch.setattr(ViewPixels, "__init__", init)

    def counting(module, name):
        real = getattr(module, name)

        def check(*args, **kw):
            calls[name] += 1
            return real(*args, **kw)
        monkeypatch.setattr(module, name, check)

    for name in ("student_pixels", "check_mask_ratio", "check_codec"):
        counting(runstore, name)
    counting(requirements, "check_same_basis")          # imported where it runs (train/sweep.py)
    return calls


def _cfg(data, store, **kw):
    base = {"data.images": data, "data.store": store, "data.teachers": f"[{','.join(TEACHERS)}]",
            "data.decoder": "pil", "data.num_workers": 1, "data.shuffle_window": 2, "train.batch_size": 4,
            "model.depth": 1, "decoder.depth": 1, "schedule.epochs": 1, "schedule.warmup_epochs": 0, **kw}
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def test_a_cached_run_opens_its_store_once_and_checks_it_once(prepared_data, teacher_store, tmp_path, counted):
    train(_cfg(prepared_data, teacher_store), out_dir=tmp_path / "run", max_steps=1, progress=False)
    assert counted == Counter({("open", str(teacher_store)): 1, "student_pixels": 1,
                               "check_mask_ratio": len(TEACHERS), "check_codec": len(TEACHERS)})


def test_a_sweep_opens_its_store_and_its_held_out_store_once_each(prepared_data, teacher_store, tmp_path, counted):
    """Two learners of other adapter settings: each setting's codec checked once; the held-out
    store opened once, its basis checked once per teacher, for the check and the report."""
    held = tmp_path / "held"
    shutil.copytree(teacher_store, held)
    counted.clear()
    variants = [parse_variant("frozen:"), parse_variant("trainable:adapters.mode=trainable")]
    summary = train(_cfg(prepared_data, teacher_store), out_dir=tmp_path / "sweep", max_steps=1, progress=False,
                    variants=variants, heldout=(held, prepared_data))
    assert {n: s["status"] for n, s in summary["learners"].items()} == {"frozen": "done", "trainable": "done"}
    assert (tmp_path / "sweep" / "sweep.json").read_text().count('"heldout_images": 13') == 2
    assert counted == Counter({("open", str(teacher_store)): 1, ("open", str(held)): 1, "student_pixels": 1,
                               "check_mask_ratio": len(TEACHERS), "check_codec": 2 * len(TEACHERS),
                               "check_same_basis": len(TEACHERS)})


def _extract(data, store, teacher, **kw):
    settings = dict(store=store, views=2, seed=0, batch_size=8, decoder="pil", stats_images=13, codec="fp16",
                    view_pixels="jpeg", device="cpu", **kw)
    return run_extraction(ExtractConfig(**settings), teacher=teacher, data=ImageSet.open(data), progress=False)


def test_an_extraction_opens_its_store_and_its_view_pixels_once(prepared_data, tmp_path, counted, tiny_teacher):
    """A new store (its view pixels created), a second teacher into it (its view pixels there
    already, the teacher's input), and a store taking another's statistics (that store opened once too)."""
    store, other = tmp_path / "store", tmp_path / "other"
    for name in ("mae", "ibot"):
        counted.clear()
        summary = _extract(prepared_data, store, tiny_teacher(name))
        assert summary["blocks"] == 6 and summary["pixel_blocks"] == (6 if name == "mae" else 0)
        assert counted == Counter({("open", str(store)): 1, ("pixels", str(store)): 1})
    counted.clear()
    summary = _extract(prepared_data, other, tiny_teacher("mae"), stats_from=str(store))
    assert summary["stats"] == f"copied from {store}"
    assert counted == Counter({("open", str(other)): 1, ("open", str(store)): 1, ("pixels", str(other)): 1})
