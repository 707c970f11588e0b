"""Any timm ViT as a teacher (``timm:NAME``, teachers/descriptors.py ``timm_descriptor``): a CLIP ViT
(pre-norm, its own mean/std), a DeiT with a distillation token, a patch-8 DINO ViT (run at 112 px
on the shared grid, mask ratio set at extraction) and a pooled ViT without a class token, each
random-init and tiny, extracted beside the paper's teachers into one store that verifies, trains
with no overrides, and gives cached == online-replay loss; each teacher sees the view normalised
with its own mean/std; the model card names the teachers' weights licences."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

import teachers.descriptors as T
from cli import main
from data import views as V
from data.shards import ImageSet
from store.features import FeatureStore
from tests.conftest import extract_tiny, one_error

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CLIP, DEIT, DINO8, GAP = ("timm:vit_base_patch16_clip_224.openai", "timm:deit_tiny_distilled_patch16_224",
                          "timm:vit_small_patch8_224.dino", "timm:vit_medium_patch16_gap_256")
TIMM = (CLIP, DEIT, DINO8, GAP)


def _invoke(*args) -> str:
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, (args, r.output, r.exception)
    return r.output


@pytest.fixture(scope="module")
def timm_store(teacher_store, prepared_data, tmp_path_factory) -> Path:
    """The shared store of the paper's three (tiny) teachers plus the four timm teachers, tiny."""
    store = tmp_path_factory.mktemp("timm_teachers") / "store"
    shutil.copytree(teacher_store, store)
    T.register(T.with_mask_ratio(T.timm_descriptor(DINO8), 0.3))   # as `extract --mask-ratio 0.3` does
    return extract_tiny(prepared_data, store, TIMM)


def test_a_timm_teachers_descriptor_is_read_from_its_model():
    clip, deit, dino8, gap = (T.descriptor(n) for n in TIMM)
    assert (clip.width, clip.patch_size, clip.resolution, clip.class_token) == (768, 16, 224, True)
    assert clip.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073)) and clip.mean != T.IMAGENET_MEAN
    assert (deit.width, deit.dist_token, deit.mean) == (192, True, T.IMAGENET_MEAN)
    assert (dino8.patch_size, dino8.resolution, dino8.grid) == (8, 112, V.GRID)      # the grid rule: 14 x 8 px
    assert (gap.class_token, gap.pool, gap.width, gap.mean) == (False, "avg", 512, (0.5, 0.5, 0.5))
    assert clip.arch == "vit_base_patch16_clip_224.openai" and clip.license == "apache-2.0"
    # the mask key: from the name only, pinned (part of every stored mask's key), above the described ids
    assert T.key_id_of(CLIP) == clip.key_id == 815_158_992
    assert len({d.key_id for d in (clip, deit, dino8, gap)}) == 4
    assert min(d.key_id for d in (clip, deit, dino8, gap)) > max(d.key_id for d in T.DESCRIPTORS.values())
    assert T.TeacherDescriptor.from_record(json.loads(json.dumps(clip.record()))) == clip


def test_a_model_the_masked_forward_cannot_run_is_refused_in_one_line(prepared_data, tmp_path):
    with pytest.raises(ValueError, match="teacher timm:resnet18: the masked forward cannot run resnet18: it is a "
                                         "ResNet, not a timm VisionTransformer"):
        T.descriptor("timm:resnet18")
    one_error(["extract", "--teacher", "timm:no_such_vit", "--data", prepared_data, "--store", tmp_path / "s",
               "--random-init"], "timm:no_such_vit", "timm cannot build 'no_such_vit'")
    one_error(["extract", "--teacher", "mae", "--mask-ratio", "0.3", "--data", prepared_data, "--store",
               tmp_path / "s", "--random-init"], "teacher mae's mask ratio is 0.5", "timm:NAME")


def test_each_teacher_sees_the_view_normalised_with_its_own_mean_and_std(tiny_teacher):
    from data.decode import normalize_uint8

    pixels = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8)
    view = normalize_uint8(pixels)                                 # what every decoder gives: ImageNet statistics
    for name in ("mae", CLIP, GAP):
        teacher, seen = tiny_teacher(name), []
        teacher.vit.patch_embed.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        teacher.forward_full(view)
        d = T.descriptor(name)
        mean, std = (torch.tensor(x).view(1, 3, 1, 1) for x in (d.mean, d.std))
        own = (pixels.permute(0, 3, 1, 2).float() / 255 - mean) / std
        torch.testing.assert_close(seen[0], own, rtol=0, atol=2e-6)


def test_a_pooled_vit_stores_in_the_cls_slot_its_heads_pooling_of_the_tokens_it_saw(tiny_teacher):
    teacher = tiny_teacher(GAP)
    images = torch.randn(2, 3, 224, 224)
    visible = torch.arange(0, 196, 2).expand(2, -1).contiguous()
    out = teacher(images, visible)
    # timm's avg pool: the mean of the final tokens of the visible patches (no prefix tokens here)
    torch.testing.assert_close(out["cls"], teacher.vit.fc_norm(out["patch"].mean(1)), rtol=1e-5, atol=1e-5)
    other = teacher(images, torch.arange(1, 196, 2).expand(2, -1).contiguous())["cls"]
    assert not torch.allclose(out["cls"], other)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_timm_teachers_checkpoint_file_loads_strictly_without_its_classifier(tmp_path, suffix):
    import timm
    from safetensors.torch import save_file

    from teachers.checkpoints import CheckpointError
    from teachers.vit import build_teacher

    torch.manual_seed(0)
    classifier = timm.create_model(DEIT[len("timm:"):], pretrained=False, depth=1)     # with its heads
    weights = {k: v.contiguous() for k, v in classifier.state_dict().items()}
    path = tmp_path / f"deit{suffix}"
    save_file(weights, path) if suffix == ".safetensors" else torch.save({"model": weights}, path)
    teacher = build_teacher(DEIT, checkpoint=path, model_kwargs={"depth": 1})
    assert not teacher.untrained and teacher.source == str(path)
    assert torch.equal(teacher.vit.blocks[0].attn.qkv.weight, weights["blocks.0.attn.qkv.weight"])
    del weights["blocks.0.attn.qkv.weight"]
    save_file(weights, path) if suffix == ".safetensors" else torch.save({"model": weights}, path)
    with pytest.raises(CheckpointError, match=r"1 missing keys \(blocks.0.attn.qkv.weight\)"):
        build_teacher(DEIT, checkpoint=path, model_kwargs={"depth": 1})


def test_a_distillation_token_runs_in_the_forward_but_is_not_stored(tiny_teacher):
    teacher = tiny_teacher(DEIT)
    images = torch.randn(2, 3, 224, 224)
    features = teacher.vit.forward_features(images)                # timm's own forward: (B, 2 + 196, 192)
    full = teacher.forward_full(images)
    torch.testing.assert_close(full["cls"], features[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full["patch"], features[:, 2:], rtol=1e-5, atol=1e-5)


def test_the_store_records_each_timm_teacher_and_draws_its_masks_with_its_own_key_and_ratio(timm_store):
    fs = FeatureStore.open(timm_store)
    assert sorted(fs.teachers) == sorted(("mae", "mocov3", "ibot", *TIMM))
    for name in TIMM:
        ts, d = fs.teacher(name), T.descriptor(name)
        assert ts.config["descriptor"] == d.record() and ts.width == d.width
        assert ts.config["build"]["arch"] == d.arch and ts.config["resolution"] == d.resolution
        visible = ts.read_samples(0, np.arange(4))["visible"]
        assert np.array_equal(visible, V.teacher_visible(0, np.arange(4), V.view_of_slot(np.arange(4), 0, 2), name))
    assert fs.teacher(DINO8).n_visible == V.num_visible(0.3) and fs.teacher(CLIP).n_visible == V.num_visible(0.4)
    assert fs.teacher("mae").config["descriptor"] is None or fs.teacher("mae").config["descriptor"]["license"]


def test_a_teacher_whose_key_id_is_a_stored_teachers_is_refused(timm_store):
    FeatureStore.open(timm_store).teacher(CLIP)                    # registers the store's record
    twin = dataclasses.replace(T.descriptor(DEIT), name="timm:vit_tiny_patch16_224",
                               key_id=T.descriptor(CLIP).key_id)
    with pytest.raises(ValueError, match=f"teachers {CLIP} and timm:vit_tiny_patch16_224 share the mask key id"):
        T.register(twin)
    with pytest.raises(ValueError, match="is already known in this process with other facts .*mask_ratio 0.3 vs 0.5"):
        T.register(T.with_mask_ratio(T.descriptor(DINO8), 0.5))


def test_the_timm_teachers_cached_loss_equals_the_online_replay_loss(prepared_data, timm_store, step_difference):
    from train.config import load_config
    from train.loader import Plan, resolve_data
    from train.objective import build_objective
    from train.sources import build_source

    data = ImageSet.open(prepared_data)
    cfg = resolve_data(load_config(None, [
        f"data.images={prepared_data}", f"data.store={timm_store}", "data.views=2", "data.shuffle_window=2",
        "data.decoder=pil", "data.num_workers=1", "data.streams=2", "train.batch_size=4"]), data)
    assert cfg.data.teachers == ("mae", "mocov3", "ibot", *sorted(TIMM))   # auto: the described, then timm's
    plan = Plan(data, seed=0, views=2, batch_size=4, window=2, streams=2)
    cached, stats = build_source(cfg, plan, online=False, device="cpu")
    online, _ = build_source(cfg, plan, online=True, device="cpu")      # rebuilt from the store's build records
    _, cb = next(iter(cached.epoch(1)))
    _, ob = next(iter(online.epoch(1)))
    bc, bo = cached.materialize(cb, "cpu"), online.materialize(ob, "cpu")
    for name in TIMM:
        torch.testing.assert_close(bc["teachers"][name]["index"], bo["teachers"][name]["index"], rtol=0, atol=0)
    torch.manual_seed(0)
    loss, rel_loss, rel_grad = step_difference(build_objective(cfg, stats), bo, bc)
    print(f"7 teachers: loss {loss:.6f}, relative loss diff {rel_loss:.2e}, relative gradient diff {rel_grad:.2e}")
    assert rel_loss < 1e-3 and rel_grad < 1e-3                         # the fp16 bound of the 3-teacher proof


def test_the_store_verifies_is_inspected_and_trains_with_no_overrides(prepared_data, timm_store, tmp_path):
    assert "OK:" in _invoke("verify", timm_store, "--data", prepared_data)
    panel = tmp_path / "panel.png"                                 # every teacher's mask of a view
    assert "panel ->" in _invoke("inspect", timm_store, "--data", prepared_data, "--index", 0, "--out", panel)
    assert panel.stat().st_size > 0
    run = tmp_path / "run"
    _invoke("train", "--data", prepared_data, "--store", timm_store, "--out", run, "--steps", 2, "--batch-size", 4)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["teachers"] == ["mae", "mocov3", "ibot", *sorted(TIMM)]
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert losses and all(np.isfinite(losses))


def test_the_model_card_carries_the_most_restrictive_teacher_licence_and_imagenets_terms(
        prepared_data, teacher_store, tmp_path):
    from train.export import card_license, export_run

    trained = [{"name": "mae", "untrained": False, "license": "CC-BY-NC-4.0"},
               {"name": "ibot", "untrained": False, "license": "Apache-2.0"},
               {"name": "dino", "untrained": True, "license": "Apache-2.0"}]
    lic, text = card_license(trained, imagenet=True)
    assert lic == "cc-by-nc-4.0" and "mae CC-BY-NC-4.0, ibot Apache-2.0" in text and "ImageNet's terms" in text
    assert "dino" not in text                                      # an untrained teacher carries no licence
    assert card_license(trained[1:], imagenet=False)[0] == "apache-2.0"
    assert T.most_restrictive(["apache-2.0", "some-custom"]) == "other"
    # a run on a store whose mae is a released (non-commercial) checkpoint: copy, mark it trained
    store = tmp_path / "store"
    shutil.copytree(teacher_store, store)
    attrs = json.loads((store / "mae" / "zarr.json").read_text())
    attrs["attributes"]["config"]["untrained"] = False
    (store / "mae" / "zarr.json").write_text(json.dumps(attrs))
    run = tmp_path / "run"
    _invoke("train", "--data", prepared_data, "--store", store, "--out", run, "--steps", 1, "--batch-size", 4)
    out = export_run(run, tmp_path / "export")
    card = (out / "README.md").read_text()
    assert "license: cc-by-nc-4.0" in card and "mae CC-BY-NC-4.0" in card
    assert json.loads((out / "config.json").read_text())["pretrained_cfg"]["license"] == "cc-by-nc-4.0"
