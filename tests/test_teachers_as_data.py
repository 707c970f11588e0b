"""Teachers as data (teachers/descriptors.py): a store of the three ViT-B/16 teachers and a DINOv2
ViT-B/14 (patch 14, run at 196 px on the shared 14 x 14 grid) extracts, verifies, trains with
no overrides, is inspected, exports and evaluates with k-NN, and its cached loss equals the
online-replay loss; a ViT-L teacher's store is 1024 wide and its estimate matches the bytes written.

Every teacher is a tiny one (tests/conftest.py ``tiny_teacher``: one block, its descriptor's
width, which is under test); online replay rebuilds it from the store's build record.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from cli import main
from data import views as V
from store.features import FeatureStore
from data.shards import ImageSet
from teachers.descriptors import PAPER_TEACHERS, descriptor
from tests.conftest import extract_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FOUR = (*PAPER_TEACHERS, "dinov2_b14")


def _invoke(*args) -> str:
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, (args, r.output, r.exception)
    return r.output


@pytest.fixture(scope="module")
def four_teacher_store(teacher_store, prepared_data, tmp_path_factory) -> Path:
    """The shared 3-teacher store (2 views, fp16) plus a random-init DINOv2 ViT-B/14 of one block."""
    store = tmp_path_factory.mktemp("four_teachers") / "store"
    shutil.copytree(teacher_store, store)
    return extract_tiny(prepared_data, store, ["dinov2_b14"])


def test_a_patch_14_teacher_is_stored_on_the_shared_grid_with_its_own_masks(four_teacher_store):
    fs = FeatureStore.open(four_teacher_store)
    assert sorted(fs.teachers) == sorted(FOUR)
    ts, d = fs.teacher("dinov2_b14"), descriptor("dinov2_b14")
    assert (ts.config["patch_size"], ts.config["resolution"], ts.config["embed_dim"]) == (14, 196, 768)
    assert ts.n_visible == V.num_visible(d.mask_ratio) == 137
    sample = ts.read_samples(0, np.arange(4))
    visible, mae_visible = sample["visible"], fs.teacher("mae").read_samples(0, np.arange(4))["visible"]
    assert visible.min() >= 0 and visible.max() < V.NUM_PATCHES and (np.diff(visible, axis=1) > 0).all()
    # its masks are drawn with its own key id: same image and view, not iBOT's (same ratio) masks
    assert not np.array_equal(visible, fs.teacher("ibot").read_samples(0, np.arange(4))["visible"])
    assert mae_visible.shape[1] == 98 and sample["tokens"].shape == (4, 138, 768)


def test_the_four_teacher_cached_loss_equals_the_online_replay_loss(prepared_data, four_teacher_store,
                                                                    step_difference):
    from train.config import load_config
    from train.loader import Plan, resolve_data
    from train.sources import build_source
    from train.objective import build_objective

    data = ImageSet.open(prepared_data)
    cfg = resolve_data(load_config(None, [
        f"data.images={prepared_data}", f"data.store={four_teacher_store}", "data.views=2", "data.shuffle_window=2",
        "data.decoder=pil", "data.num_workers=1", "data.streams=2", "train.batch_size=4"]), data)
    assert cfg.data.teachers == FOUR                                   # auto: every teacher of the store
    plan = Plan(data, seed=0, views=2, batch_size=4, window=2, streams=2)
    cached, stats = build_source(cfg, plan, online=False, device="cpu")
    online, _ = build_source(cfg, plan, online=True, device="cpu")
    _, cb = next(iter(cached.epoch(1)))
    _, ob = next(iter(online.epoch(1)))
    bc, bo = cached.materialize(cb, "cpu"), online.materialize(ob, "cpu")
    assert sorted(bc["teachers"]) == sorted(FOUR)
    for name in FOUR:
        torch.testing.assert_close(bc["teachers"][name]["index"], bo["teachers"][name]["index"], rtol=0, atol=0)
    torch.manual_seed(0)
    loss, rel_loss, rel_grad = step_difference(build_objective(cfg, stats), bo, bc)
    print(f"4 teachers: loss {loss:.6f}, relative loss diff {rel_loss:.2e}, relative gradient diff {rel_grad:.2e}")
    assert rel_loss < 1e-3 and rel_grad < 1e-3                         # the fp16 bound of the 3-teacher proof


def test_a_four_teacher_store_verifies_trains_with_no_overrides_exports_and_evaluates(
        prepared_data, photo_tree, four_teacher_store, tmp_path):
    assert "OK:" in _invoke("verify", four_teacher_store, "--data", prepared_data)
    run, out = tmp_path / "run", tmp_path / "student.safetensors"
    _invoke("train", "--data", prepared_data, "--store", four_teacher_store, "--out", run, "--steps", 3,
            "--batch-size", 4)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["teachers"] == list(FOUR) and cfg["adapters"]["in_dim"] is None
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert losses and all(np.isfinite(losses))
    panel = tmp_path / "panel.png"               # inspect draws the /14 teacher's mask and 4 gate maps
    assert "panel ->" in _invoke("inspect", four_teacher_store, "--data", prepared_data, "--index", 0, "--run", run,
                                 "--out", panel, "--device", "cpu")
    assert panel.stat().st_size > 0
    _invoke("export", run, out)
    _invoke("eval", "knn", "--checkpoint", out, "--train", prepared_data, "--val", photo_tree, "--workers", 0,
            "--batch-size", 13, "--out", tmp_path / "knn")
    knn = json.loads((tmp_path / "knn" / "result.json").read_text())
    assert 0 <= knn["metrics"]["top1"] <= 100


def test_a_vit_l_teachers_store_is_1024_wide_and_its_estimate_matches_the_bytes(prepared_data, tmp_path,
                                                                                tiny_teacher):
    from extract.estimate import estimate_run
    from extract.config import ExtractConfig
    from extract.runner import Extractor, run_extraction

    data = ImageSet.open(prepared_data)
    teacher = tiny_teacher("dinov2_l14")
    assert teacher.embed_dim == descriptor("dinov2_l14").width == 1024
    store = tmp_path / "store"
    run_extraction(ExtractConfig(store=store, views=2, seed=0, batch_size=4, decoder="pil", stats_images=13,
                                 codec="fp16", view_pixels="none", device="cpu"), teacher=teacher, data=data,
                   progress=False)
    ts = FeatureStore.open(store).teacher("dinov2_l14")
    assert ts.config["embed_dim"] == ts.width == 1024 and ts.group["tokens"].shape[-1] == 1024
    assert ts.stats["components"].shape == (1024, 1024)
    assert ts.decode(ts.read_samples(0, [0])).shape == (1, 1 + ts.n_visible, 1024)
    ex = Extractor(teacher, data, seed=0, views=2, batch_size=2, device="cpu", decoder="pil", num_threads=1)
    e = estimate_run(ex, codec="fp16", pca_dim=256, num_images=len(data), views=2, batches=1, stats_images=13,
                     view_pixels="none")
    on_disk = sum(f.stat().st_size for f in (store / "dinov2_l14").rglob("*") if f.is_file())
    print(f"dinov2_l14: estimated {e['total_bytes']} B, store {on_disk} B, {e['total_bytes'] / on_disk - 1:+.2%}")
    assert abs(e["total_bytes"] / on_disk - 1) < 0.05
