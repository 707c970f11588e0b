"""View pixels stored once with the store (store/viewpixels.py, ``extract --view-pixels``).

With JPEG views the teacher runs on the stored view as decoded, so the student reading them
sees the teacher's pixels (PIL exactly, DALI within the decoders' bound); stored JPEG views
against a fresh decode of the original images (the measured bound, printed with ``-s``), raw
views bit-exact; the student's pixels must be the teachers'; one training step from each; a
run from view pixels opens no original image shard; verify; format versions (SIGKILL then resume:
tests/extract/test_extract.py). Every teacher is tiny (tests/conftest.py ``tiny_teacher``) but that
of the default ``extract`` command's test, a full ViT-B/16: the suite's smoke of a real teacher.
"""
import builtins
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from cli import main
from extract.config import ExtractConfig
from extract.runner import Extractor, run_extraction
from store.verify import verify_store
from data import views as V
from data.decode import VIEW_BOUND, denormalize, pil_views
from data.decode.stored import make_view_decoder, pil_stored_views
from store.features import DataInfo, FeatureStore, StoreError
from core.io import sha256_file
from data.shards import ImageSet
from store.viewpixels import ViewPixels
from teachers.vit import default_build
import train.runstore as runstore
from train.config import load_config
from train.loader import CachedSource, Plan, resolve_data
from train.runstore import RunStore
from train.loop import train
from train.sources import build_source
from train.objective import build_objective

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VIEWS = 2


def _extract(data, store, teacher, **kw):
    """``teacher`` (a tiny one) over ``data`` into ``store``: 2 views, batches of 2, fp16 tokens,
    statistics from all 13 images; ``kw`` sets the rest (``view_pixels``: none)."""
    cfg = dict(store=store, views=VIEWS, seed=0, batch_size=2, decoder="pil", stats_images=13, codec="fp16",
               view_pixels="none", device="cpu")
    return run_extraction(ExtractConfig(**{**cfg, **kw}), teacher=teacher, data=ImageSet.open(data),
                          progress=False)


@pytest.fixture(scope="module")
def mae(tiny_teacher):
    return tiny_teacher("mae")


@pytest.fixture(scope="module")
def teacher_inputs():
    """{(slot, image): the (3, 224, 224) views the teacher ran on} while jpeg_store is extracted."""
    return {}


@pytest.fixture(scope="module")
def jpeg_store(prepared_data, tmp_path_factory, teacher_inputs, mae):
    """MAE (random init), 2 views, fp16 tokens and the views as JPEG: one uninterrupted run,
    recording the teacher's input images (``teacher_inputs``)."""
    store = tmp_path_factory.mktemp("jpeg") / "store"
    real = Extractor.view_batch

    def recording(self, index, datas, slot, stored=False):
        vb = real(self, index, datas, slot, stored)
        teacher_inputs.update({(slot, int(i)): image.clone() for i, image in zip(index, vb.images)})
        return vb

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Extractor, "view_batch", recording)
        summary = _extract(prepared_data, store, mae, view_pixels="jpeg")
    assert summary["pixel_blocks"] == 6 and summary["blocks"] == 6
    return store


@pytest.fixture(scope="module")
def source_store(prepared_data, tmp_path_factory, mae):
    """MAE (random init), 2 views, fp16 tokens, no view pixels: the teacher ran on the crops."""
    store = tmp_path_factory.mktemp("source") / "store"
    _extract(prepared_data, store, mae)
    return store


@pytest.fixture(scope="module")
def raw_store(source_store, prepared_data, tmp_path_factory, mae):
    """The source store's tokens; the views then added as raw uint8 by a run that decodes only:
    the teacher forward is made to fail, so no block may need one."""
    store = tmp_path_factory.mktemp("raw") / "store"
    shutil.copytree(source_store, store)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Extractor, "_forward", lambda *a: pytest.fail("a teacher forward for complete tokens"))
        summary = _extract(prepared_data, store, mae, view_pixels="raw")
    assert summary["pixel_blocks"] == 6 and summary["skipped"] == 0
    return store


def _fresh_and_stored(store, data, decode):
    """Per (slot, shard): fresh PIL views of the original images and the stored ones, 0..255."""
    ds, vp = ImageSet.open(data), ViewPixels.open(FeatureStore.open(store))
    for slot in range(VIEWS):
        for shard in range(len(ds.shards)):
            index, datas = vp.read_block(slot, shard)
            boxes, flips = V.view_params(0, index, V.view_of_slot(index, slot, VIEWS), ds.widths[index],
                                         ds.heights[index])
            yield denormalize(pil_views(ds.read_many(index), boxes, flips)), denormalize(decode(datas))


def test_the_teacher_ran_on_the_stored_jpeg_views_as_pil_and_dali_decode_them(jpeg_store, teacher_inputs):
    vp = ViewPixels.open(FeatureStore.open(jpeg_store))
    dali = make_view_decoder("jpeg", "dali", batch_size=8, device="cpu")
    pil_diff, dali_diff = [], []
    for slot, shard in np.argwhere(vp.complete_matrix()):
        index, datas = vp.read_block(int(slot), int(shard))
        seen = denormalize(torch.stack([teacher_inputs[(int(slot), int(i))] for i in index]))
        pil_diff.append((denormalize(pil_stored_views(datas)) - seen).abs().flatten(1))
        dali_diff.append((denormalize(dali(datas)) - seen).abs().flatten(1))
    pil_diff, dali_diff = torch.cat(pil_diff), torch.cat(dali_diff)
    print(f"stored JPEG views vs the teacher's input (0..255, {len(pil_diff)} views): PIL max |diff| "
          f"{float(pil_diff.max()):.2e}; DALI mean {float(dali_diff.mean()):.3f}, worst view mean "
          f"{float(dali_diff.mean(1).max()):.3f}, worst pixel {float(dali_diff.max()):.0f}")
    assert len(pil_diff) == 26 == len(teacher_inputs) and float(pil_diff.max()) < 1e-3
    assert float(dali_diff.mean(1).max()) <= VIEW_BOUND


def test_a_teacher_on_the_jpeg_views_gives_other_tokens_than_on_the_crops(jpeg_store, source_store):
    """The round trip is real: the JPEG store's tokens are not the crops' (fp16 in both)."""
    jpeg, source = (FeatureStore.open(s).teacher("mae") for s in (jpeg_store, source_store))
    assert (jpeg.input, source.input) == ("jpeg", "source")
    a, b = jpeg.read_block(0, 0), source.read_block(0, 0)
    np.testing.assert_array_equal(a["visible"], b["visible"])
    diff = np.abs(a["tokens"].astype(np.float32) - b["tokens"].astype(np.float32)).max()
    assert diff > 1e-3, diff


def test_a_later_teacher_runs_on_the_views_the_store_holds_without_reading_an_image(jpeg_store, prepared_data,
                                                                                    tmp_path, monkeypatch,
                                                                                    tiny_teacher):
    store, seen = tmp_path / "store", {}
    shutil.copytree(jpeg_store, store)
    real = Extractor.view_batch

    def recording(self, index, datas, slot, stored=False):
        vb = real(self, index, datas, slot, stored)
        seen.update({(slot, int(i)): (stored, image.clone()) for i, image in zip(index, vb.images)})
        return vb

    monkeypatch.setattr(Extractor, "view_batch", recording)
    monkeypatch.setattr(ImageSet, "read_many", lambda *a: pytest.fail("read a source image of a stored view"))
    _extract(prepared_data, store, tiny_teacher("mocov3"))          # no --view-pixels: the store's form decides
    assert FeatureStore.open(store).teacher("mocov3").input == "jpeg" and len(seen) == 26
    vp = ViewPixels.open(FeatureStore.open(store))
    for slot, shard in np.argwhere(vp.complete_matrix()):
        index, datas = vp.read_block(int(slot), int(shard))
        assert all(seen[(int(slot), int(i))][0] for i in index)
        assert torch.equal(torch.stack([seen[(int(slot), int(i))][1] for i in index]), pil_stored_views(datas))
    monkeypatch.undo()
    assert verify_store(store, ImageSet.open(prepared_data), progress=False)[0] == []
    group = zarr.open_group(str(store / "mocov3"), mode="a")     # as if extracted before the views existed
    group.attrs["config"] = {k: v for k, v in group.attrs["config"].items() if k != "input"}
    assert any("teachers disagree on input" in p for p in verify_store(store, ImageSet.open(prepared_data),
                                                                        progress=False)[0])
    with pytest.raises(StoreError, match=r"its teachers ran on different pixels \(mocov3 on the source crops, mae "
                                         r"on the stored JPEG views\), so no student pixels match them all"):
        resolve_data(_cfg(prepared_data, store, **{"data.teachers": "[mae,mocov3]"}), ImageSet.open(prepared_data))


def test_stored_jpeg_views_are_within_the_measured_bound_of_a_fresh_decode(jpeg_store, prepared_data):
    diffs = torch.cat([(b - a).abs().flatten(1) for a, b in _fresh_and_stored(jpeg_store, prepared_data,
                                                                               pil_stored_views)])
    mean, worst_view, worst = float(diffs.mean()), float(diffs.mean(1).max()), float(diffs.max())
    print(f"stored JPEG q95 vs fresh decode (0..255, {len(diffs)} views): mean |diff| {mean:.3f}, "
          f"worst view mean {worst_view:.3f}, worst pixel {worst:.0f}")
    assert len(diffs) == 26 and mean <= 1.0 and worst_view <= 2.0 and worst <= 40


def test_dali_decodes_the_stored_jpegs_as_pil_does_and_reads_the_tars_with_their_index(jpeg_store):
    from nvidia.dali import fn, pipeline_def, types

    vp = ViewPixels.open(FeatureStore.open(jpeg_store))
    _, datas = vp.read_block(1, 0)
    dali = make_view_decoder("jpeg", "dali", batch_size=8, device="cpu")
    assert float((denormalize(dali(datas)) - denormalize(pil_stored_views(datas))).abs().max()) <= 1.0

    @pipeline_def(batch_size=8, num_threads=1, device_id=None)
    def reader():
        jpg = fn.readers.webdataset(paths=[str(vp.block_path(1, 0, "tar"))],
                                     index_paths=[str(vp.block_path(1, 0, "idx"))], ext=["jpg"],
                                     pad_last_batch=True)
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB)

    pipe = reader()
    pipe.build()
    (out,) = pipe.run()
    got = np.stack([np.array(out[k]) for k in range(len(datas))])
    want = denormalize(pil_stored_views(datas)).round().permute(0, 2, 3, 1).numpy()
    assert got.shape == (5, 224, 224, 3) and np.abs(got.astype(float) - want).max() <= 1.0
    with tarfile.open(vp.block_path(1, 0, "tar")) as tar:
        assert tar.getnames() == [f"{i:09d}.jpg" for i in range(5)]


def test_raw_views_equal_the_fresh_decode_bit_for_bit(raw_store, source_store, prepared_data):
    for fresh, stored in _fresh_and_stored(raw_store, prepared_data, make_view_decoder("raw", "pil", batch_size=8)):
        torch.testing.assert_close(stored, fresh, rtol=0, atol=1e-3)
        assert torch.equal(stored.round(), fresh.round())
    a, b = zarr.open_group(str(raw_store / "mae"), mode="r"), zarr.open_group(str(source_store / "mae"), mode="r")
    np.testing.assert_array_equal(a["tokens"][...], b["tokens"][...])


def _cfg(data, store, **kw):
    base = {"data.images": data, "data.store": store, "data.views": VIEWS, "data.shuffle_window": 2,
            "data.decoder": "pil", "data.num_workers": 1, "data.streams": 2, "train.batch_size": 4,
            "train.log_every": 1, "schedule.epochs": 4, "schedule.warmup_epochs": 1, "data.teachers": "[mae]"}
    base.update(kw)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


@pytest.mark.parametrize("form", ["jpeg", "raw"])
def test_one_step_from_stored_views_matches_the_fresh_images(form, jpeg_store, raw_store, prepared_data,
                                                             step_difference, monkeypatch):
    store = jpeg_store if form == "jpeg" else raw_store
    plan = Plan(ImageSet.open(prepared_data), seed=0, views=VIEWS, batch_size=4, window=2, streams=2)
    with monkeypatch.context() as mp:   # the fresh crops as a reference, which training refuses for JPEG-fed teachers
        mp.setattr(runstore, "student_pixels", lambda fs, stores, pixels: ("source", None))
        fresh, stats = build_source(_cfg(prepared_data, store, **{"data.pixels": "source"}), plan, device="cpu")
    stored, _ = build_source(_cfg(prepared_data, store, **{"data.pixels": "views"}), plan, device="cpu")
    assert fresh.view_pixels is None and stored.view_pixels.form == form
    for epoch in (0, 1):
        bf = fresh.materialize(next(iter(fresh.epoch(epoch)))[1], "cpu")
        bs = stored.materialize(next(iter(stored.epoch(epoch)))[1], "cpu")
        assert torch.equal(bf["index"], bs["index"])
        pix = (denormalize(bs["images"]) - denormalize(bf["images"])).abs()
        torch.manual_seed(0)
        lf, rel_loss, rel_grad = step_difference(build_objective(_cfg(prepared_data, store), stats), bf, bs)
        print(f"{form} views epoch {epoch}: pixels mean |diff| {float(pix.mean()):.3f} max {float(pix.max()):.0f}; "
              f"loss {lf:.6f}, relative loss diff {rel_loss:.2e}, relative gradient diff {rel_grad:.2e}")
        if form == "raw":
            assert float(pix.max()) < 1e-3 and rel_loss < 1e-6
        else:
            assert rel_loss <= 5e-3 and rel_grad <= 5e-2


def _watch_image_shards(monkeypatch, data) -> list[str]:
    """The paths under DATA/shards opened from now on (os.open and open), appended to the list returned."""
    shards, opened = str(Path(data) / "shards"), []
    real_os_open, real_open = os.open, builtins.open

    def os_open(path, *a, **kw):
        if str(path).startswith(shards):
            opened.append(str(path))
        return real_os_open(path, *a, **kw)

    def py_open(path, *a, **kw):
        if isinstance(path, (str, Path)) and str(path).startswith(shards):
            opened.append(str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", py_open)
    return opened


def test_training_from_view_pixels_opens_no_image_shard(jpeg_store, source_store, prepared_data, tmp_path,
                                                        monkeypatch):
    opened = _watch_image_shards(monkeypatch, prepared_data)
    train(_cfg(prepared_data, jpeg_store, **{"model.depth": 2}), out_dir=tmp_path / "run", max_steps=4,
          progress=False)                                          # data.pixels=auto: the views are complete
    assert opened == []
    assert load_config(tmp_path / "run" / "config.yaml").data.pixels == "views"     # auto, resolved and recorded
    # the same watch sees the source path open them
    plan = Plan(ImageSet.open(prepared_data), seed=0, views=VIEWS, batch_size=4, window=2, streams=2)
    source, _ = build_source(_cfg(prepared_data, source_store, **{"data.pixels": "source"}), plan, device="cpu")
    next(iter(source.epoch(0)))
    assert opened and all(p.endswith(".tar") for p in opened)


def test_extract_by_default_writes_adapter_coefficients_and_jpeg_views_that_training_reads(prepared_data, tmp_path,
                                                                                         monkeypatch):
    """The smoke of a real teacher: the default command builds a full-depth random-init ViT-B/16."""
    store = tmp_path / "store"
    r = CliRunner().invoke(main, ["extract", "--teacher", "mae", "--data", str(prepared_data), "--store", str(store),
                                  "--random-init", "--views", str(VIEWS), "--batch-size", "4", "--decoder", "pil",
                                  "--device", "cpu"])
    assert r.exit_code == 0, r.output
    fs = FeatureStore.open(store)
    ts, vp = fs.teacher("mae"), ViewPixels.open(fs)
    assert (ts.codec, ts.input, vp.form, vp.missing()) == ("adapter", "jpeg", "jpeg", [])
    assert ts.build == default_build("mae", seed=0)                    # the descriptor's ViT-B/16
    opened = _watch_image_shards(monkeypatch, prepared_data)
    train(_cfg(prepared_data, store, **{"model.depth": 2}), out_dir=tmp_path / "run", max_steps=2, progress=False)
    assert opened == [] and load_config(tmp_path / "run" / "config.yaml").data.pixels == "views"


def test_verify_reports_missing_incomplete_and_tampered_view_shards(jpeg_store, prepared_data, tmp_path):
    ds = ImageSet.open(prepared_data)
    assert verify_store(jpeg_store, ds, progress=False)[0] == []
    broken = tmp_path / "broken"

    def fresh_copy():
        shutil.rmtree(broken, ignore_errors=True)
        shutil.copytree(jpeg_store, broken)
        return broken / "pixels" / "slot-1"

    (fresh_copy() / "shard-000002.json").unlink()                     # a block never completed
    problems, _ = verify_store(broken, ds, progress=False)
    assert any("pixels slot 1 shard 2: incomplete" in p for p in problems)
    tar = fresh_copy() / "shard-000000.tar"                           # a damaged tar
    raw = bytearray(tar.read_bytes())
    raw[1000] ^= 0xFF
    tar.write_bytes(bytes(raw))
    problems, _ = verify_store(broken, ds, progress=False)
    assert any("shard-000000.tar differs from its completion record" in p for p in problems)
    (fresh_copy() / "shard-000001.tar").unlink()
    problems, _ = verify_store(broken, ds, progress=False)
    assert any("pixels slot 1 shard 1" in p for p in problems)        # a missing tar
    idx = fresh_copy() / "shard-000000.idx"                           # members out of order, record updated
    head, *lines = idx.read_text().splitlines()
    idx.write_text("\n".join([head, lines[1], lines[0], *lines[2:]]) + "\n")
    record = json.loads((idx.parent / "shard-000000.json").read_text())
    record["idx_sha256"] = sha256_file(idx)
    (idx.parent / "shard-000000.json").write_text(json.dumps(record))
    problems, _ = verify_store(broken, ds, progress=False)
    assert any("pixels slot 1 shard 0" in p and "members are not images 0..4 in order" in p for p in problems)
    fresh_copy()
    zarr.open_group(str(broken / "pixels"), mode="a").attrs["data_digest"] = "0" * 64   # other data's pixels
    problems, _ = verify_store(broken, ds, progress=False)
    assert any("view pixels do not belong to this store" in p for p in problems)


def test_a_version_1_store_opens_and_a_newer_one_is_refused_saying_what_to_do(jpeg_store, prepared_data,
                                                                             tmp_path):
    info = DataInfo.of(ImageSet.open(prepared_data))
    path = tmp_path / "old"
    FeatureStore.create_or_open(path, data=info, views=VIEWS, seed=0).group.attrs["format_version"] = 1
    fs = FeatureStore.open(path, data=info, views=VIEWS, seed=0)     # version 1: no view pixels
    assert ViewPixels.open(fs) is None and fs.teachers == []
    ViewPixels.create_or_open(fs, "raw")                              # adding them raises it to 2
    assert FeatureStore.open(path).group.attrs["format_version"] == 2 and FeatureStore.open(path).teachers == []
    with pytest.raises(StoreError, match="holds view pixels as raw, not jpeg; extract with --view-pixels raw"):
        ViewPixels.create_or_open(FeatureStore.open(path), "jpeg")
    FeatureStore.open(path).group.attrs["format_version"] = 4
    with pytest.raises(StoreError, match=r"format_version 4 is not one this code reads \(1, 2, 3\); update the code"):
        FeatureStore.open(path)


def test_data_pixels_views_without_view_pixels_is_refused_in_one_line(raw_store, prepared_data, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(raw_store, store)
    plan = Plan(ImageSet.open(prepared_data), seed=0, views=VIEWS, batch_size=4, window=2, streams=2)
    (store / "pixels" / "slot-0" / "shard-000001.json").unlink()
    auto = CachedSource(plan, RunStore.open(store, plan.data, seed=0, teachers=["mae"], pixels="auto"), decoder="pil")
    assert auto.view_pixels is None                                   # incomplete: auto decodes the images
    cfg = _cfg(prepared_data, store)
    assert resolve_data(cfg, plan.data).data.pixels == "source"
    # a resumed run keeps the pixels it recorded: a recorded source stays where auto now takes the
    # complete views, and a recorded views is refused, here as anywhere, once the views are incomplete
    complete = _cfg(prepared_data, raw_store)
    assert resolve_data(complete, plan.data).data.pixels == "views"
    assert resolve_data(complete, plan.data, recorded={"pixels": "source"}).data.pixels == "source"
    with pytest.raises(StoreError, match="has 1 incomplete view blocks, but data.pixels=views; run") as info:
        resolve_data(cfg, plan.data, recorded={"pixels": "views"})
    assert "\n" not in str(info.value)
    with pytest.raises(StoreError, match="has 1 incomplete view blocks, but data.pixels=views; run"):
        RunStore.open(store, plan.data, seed=0, teachers=["mae"], pixels="views")
    shutil.rmtree(store / "pixels")
    with pytest.raises(StoreError, match="holds no view pixels, but data.pixels=views"):
        RunStore.open(store, plan.data, seed=0, teachers=["mae"], pixels="views")


def test_the_student_must_read_the_pixels_its_teachers_ran_on(jpeg_store, raw_store, prepared_data, tmp_path):
    plan = Plan(ImageSet.open(prepared_data), seed=0, views=VIEWS, batch_size=4, window=2, streams=2)

    def source(store, pixels):
        return CachedSource(plan, RunStore.open(store, plan.data, seed=0, teachers=["mae"], pixels=pixels),
                            decoder="pil")

    for store in (jpeg_store, raw_store):         # the teachers ran on these views (raw: the crops exactly)
        assert resolve_data(_cfg(prepared_data, store), plan.data).data.pixels == "views"
    assert source(raw_store, "source").view_pixels is None
    with pytest.raises(StoreError, match="teachers mae ran on the stored JPEG views, so the student must read "
                                         "them too: set data.pixels=views$") as info:
        source(jpeg_store, "source")
    assert "\n" not in str(info.value)
    partial = tmp_path / "partial"
    shutil.copytree(jpeg_store, partial)
    (partial / "pixels" / "slot-0" / "shard-000001.json").unlink()
    with pytest.raises(StoreError, match="set data.pixels=views once `python cli.py extract --view-pixels jpeg` "
                                         "has completed the view blocks"):
        resolve_data(_cfg(prepared_data, partial), plan.data)
    older = tmp_path / "older"                    # a store from before teachers ran on the JPEG views
    shutil.copytree(jpeg_store, older)
    group = zarr.open_group(str(older / "mae"), mode="a")
    group.attrs["config"] = {k: v for k, v in group.attrs["config"].items() if k != "input"}
    assert resolve_data(_cfg(prepared_data, older), plan.data).data.pixels == "source"
    assert source(older, "auto").view_pixels is None
    with pytest.raises(StoreError, match="teachers mae ran on the source crops, not on the stored jpeg views, so "
                                         "data.pixels=views would show the student other pixels") as info:
        source(older, "views")
    assert "\n" not in str(info.value)


def test_estimate_counts_the_view_tars(raw_store, jpeg_store, prepared_data, mae):
    from extract.estimate import estimate_run, format_estimate

    data = ImageSet.open(prepared_data)
    ex = Extractor(mae, data, seed=0, views=VIEWS, batch_size=7, device="cpu", decoder="pil", num_threads=1)
    sizes = {}
    for form, store in (("raw", raw_store), ("jpeg", jpeg_store)):
        e = estimate_run(ex, codec="fp16", pca_dim=256, num_images=len(data), views=VIEWS, batches=1,
                         stats_images=4, view_pixels=form)
        on_disk = sum(f.stat().st_size for f in (store / "pixels").rglob("*.tar"))
        sizes[form] = e["view_pixel_bytes"]
        print(f"view tars {form}: estimated {e['pixel_total_bytes']} B, stored {on_disk} B")
        assert f"KiB per view as {form}" in format_estimate(e)
        if form == "raw":               # exact but for the tars' end blocks
            assert abs(e["pixel_total_bytes"] / on_disk - 1) < 0.03
    assert 0 < sizes["jpeg"] < 0.3 * sizes["raw"]
