"""The user's journey on a small set, on default settings: prepare -> extract (3 teachers) ->
train -> export -> eval, through the command line where a user would type it.

The set is 41 photos (the session's 13 photos, three times, and two more) in one image
shard of 256, extracted with 2 views: the defaults (``data.views`` and ``data.streams``
``auto``) must fit it as they fit ImageNet. The teachers are the tests' tiny ones
(tests/conftest.py ``tiny_teacher``) to keep extraction to seconds; the student is the real
ViT-Tiny, since its export must load in timm's ``vit_tiny_patch16_224``.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEPS = 6


def _invoke(*args) -> str:
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, (args, r.output, r.exception)
    return r.output


@pytest.fixture(scope="module")
def small_set(photo_tree, tmp_path_factory, tiny_teacher) -> tuple[Path, Path]:
    """(prepared data of 41 images in one shard, its 3-teacher store with 2 views)."""
    from extract.config import ExtractConfig
    from extract.runner import run_extraction
    from data.shards import ImageSet

    root = tmp_path_factory.mktemp("small_set")
    photos = sorted(p for p in photo_tree.rglob("*") if p.is_file())
    copies = [(p, c) for c in range(3) for p in photos] + [(p, 3) for p in photos[:2]]
    for p, c in copies:
        dest = root / "photos" / p.parent.name / f"{p.stem}_{c}{p.suffix}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dest)
    _invoke("prepare", root / "photos", root / "data", "--workers", "0", "--no-progress")
    data = ImageSet.open(root / "data")
    assert len(data) == 41 and len(data.shards) == 1
    for name in ("mae", "mocov3", "ibot"):
        teacher = tiny_teacher(name)
        run_extraction(ExtractConfig(store=root / "store", views=2, seed=0, batch_size=41, decoder="pil",
                                     stats_images=8, codec="fp16", view_pixels="none", device="cpu"), teacher=teacher,
                       data=data, progress=False)
    return root / "data", root / "store"


@pytest.fixture(scope="module")
def exported(small_set, tmp_path_factory) -> tuple[Path, Path]:
    """(run folder, exported student): `train` with no overrides, then `export RUN OUT`.

    6 steps of 8 (an epoch is 5: the run crosses into epoch 1 and its view slot); the same
    command with ``--steps 20`` differs only in length."""
    data, store = small_set
    root = tmp_path_factory.mktemp("small_run")
    run, out = root / "run", root / "student.safetensors"
    _invoke("train", "--data", data, "--store", store, "--out", run, "--steps", STEPS, "--batch-size", 8)
    _invoke("export", run, out)
    return run, out


def test_train_on_a_small_set_with_the_defaults_records_the_resolved_views_and_streams(exported):
    run, _ = exported
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["views"] == 2                      # from the store
    assert cfg["data"]["streams"] == 1                    # one shard of 41: one stream
    assert torch.load(run / "last.pt", weights_only=False)["step"] == STEPS
    from train.config import load_config
    assert load_config(run / "config.yaml").data.streams == 1   # the resolved dump loads back


def test_the_export_loads_in_timm_with_and_without_its_classifier(exported):
    import timm
    from safetensors.torch import load_file
    _, out = exported
    state = load_file(out)
    for kw in ({}, {"num_classes": 0}):
        model = timm.create_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(out)),
                                  **kw)
        assert torch.equal(model.state_dict()["blocks.11.mlp.fc2.weight"], state["blocks.11.mlp.fc2.weight"])
    assert "head.weight" not in model.state_dict()


def test_the_export_evaluates_with_knn_and_a_linear_probe(exported, prepared_data, photo_tree, tmp_path):
    import json
    from eval.config import LinearConfig
    from eval.linear import run_linear
    _, out = exported
    _invoke("eval", "knn", "--checkpoint", out, "--train", prepared_data, "--val", photo_tree, "--workers", 0,
            "--batch-size", 13, "--out", tmp_path / "knn")
    knn = json.loads((tmp_path / "knn" / "result.json").read_text())
    assert 0 <= knn["metrics"]["top1"] <= 100 and knn["checkpoint"]["path"] == str(out)
    cfg = LinearConfig.from_dict(dict(checkpoint=str(out), model="vit_tiny_patch16_224", train=str(photo_tree),
                                      val=str(photo_tree), epochs=1, warmup_epochs=0, batch_size=13, micro_batch=13,
                                      cache_features=True, workers=0))
    metrics, _ = run_linear(cfg, out=tmp_path / "linear", device="cpu")
    assert 0 <= metrics["top1"] <= 100


def test_the_export_builds_the_finetune_detection_and_segmentation_models(exported):
    from eval.common import load_backbone
    from eval.detection import build_mask_rcnn
    from eval.finetune import build_classifier
    from eval.segmentation import Segmenter
    from safetensors.torch import load_file
    _, out = exported
    qkv = load_file(out)["blocks.0.attn.qkv.weight"]
    net = build_classifier(checkpoint=out, model="vit_tiny_patch16_224", timm_kwargs={}, num_classes=3,
                           drop_path=0.1, seed=0)
    assert net.head.out_features == 3 and torch.equal(net.blocks[0].attn.qkv.weight, qkv)
    # as run_detection / run_segmentation build them
    vit = load_backbone(out, model="vit_tiny_patch16_224", dynamic_img_size=True, drop_path_rate=0.1)
    assert torch.equal(vit.blocks[0].attn.qkv.weight, qkv)
    build_mask_rcnn(vit=vit, num_classes=3, image_size=64, heads="light")
    seg = Segmenter(vit=load_backbone(out, model="vit_tiny_patch16_224", dynamic_img_size=True,
                                      drop_path_rate=0.1), num_classes=4, channels=16).eval()
    with torch.no_grad():
        assert seg(torch.zeros(1, 3, 64, 64)).shape[:2] == (1, 4)
