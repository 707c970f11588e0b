"""COCO detection: pyramid, data layout and LSJ, result writer + COCOeval, Mask R-CNN end to end."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner

from cli import main
from eval.coco import CocoInstances, evaluate, resolve_layout, to_results, write_results
from eval.dense_train import param_groups
from eval.pyramid import SimpleFeaturePyramid
from samples.toy_coco import make_toy_coco

ARGS = ["--model-arg", "img_size=64", "--model-arg", "depth=2"]
FAST = ["--image-size", "64", "--batch-size", "4", "--heads", "light", "--roi-batch", "32", "--workers", "0",
        "--warmup", "1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _vit(**kw):
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=64, depth=2, **kw)


def test_pyramid_gives_strides_4_to_64_with_256_channels_on_non_square_input():
    pyramid = SimpleFeaturePyramid(vit=_vit(dynamic_img_size=True)).eval()
    with torch.no_grad():
        levels = pyramid(torch.randn(2, 3, 96, 128))
    assert list(levels) == ["0", "1", "2", "3", "pool"]
    assert pyramid.out_channels == 256
    shapes = {k: tuple(v.shape) for k, v in levels.items()}
    assert shapes == {"0": (2, 256, 24, 32), "1": (2, 256, 12, 16), "2": (2, 256, 6, 8), "3": (2, 256, 3, 4),
                      "pool": (2, 256, 2, 2)}


def test_pyramid_refuses_fixed_size_vit_and_inputs_not_multiple_of_16():
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        SimpleFeaturePyramid(vit=_vit())
    with pytest.raises(ValueError, match="72x64 is not a multiple of 16"):
        SimpleFeaturePyramid(vit=_vit(dynamic_img_size=True))(torch.randn(1, 3, 72, 64))


def test_param_groups_decay_lr_by_depth_and_skip_weight_decay_on_norms_and_biases():
    model = torch.nn.Module()
    model.backbone = SimpleFeaturePyramid(vit=_vit(dynamic_img_size=True))
    groups = param_groups(model, weight_decay=0.1, layer_decay=0.5)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_param[id(named["backbone.vit.patch_embed.proj.weight"])]["lr_scale"] == 0.5 ** 3
    assert by_param[id(named["backbone.vit.blocks.0.attn.qkv.weight"])]["lr_scale"] == 0.5 ** 2
    assert by_param[id(named["backbone.vit.blocks.1.attn.qkv.weight"])]["lr_scale"] == 0.5
    assert by_param[id(named["backbone.outputs.0.0.weight"])]["lr_scale"] == 1.0
    assert by_param[id(named["backbone.vit.blocks.1.attn.qkv.weight"])]["weight_decay"] == 0.1
    for name in ("backbone.vit.blocks.1.attn.qkv.bias", "backbone.vit.pos_embed", "backbone.vit.norm.weight"):
        assert by_param[id(named[name])]["weight_decay"] == 0.0, name
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_default_vitdet_heads_train_and_predict_at_each_images_own_size(toy_coco_dir):
    from eval.detection import build_mask_rcnn

    train = CocoInstances(toy_coco_dir, "train", train=True, image_size=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_mask_rcnn(vit=_vit(dynamic_img_size=True), num_classes=3, image_size=64, heads="vitdet",
                                roi_batch=16)
        images, targets = zip(*(train[i] for i in range(2)))
        losses = model.train()(list(images), list(targets))
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval().roi_heads.score_thresh = 0.0  # an untrained model: keep every detection
    with torch.no_grad():
        outputs = model([torch.rand(3, 40, 56), torch.rand(3, 96, 80)])
    for (h, w), out in zip([(40, 56), (96, 80)], outputs):
        assert len(out["boxes"]) > 0 and out["masks"].shape[1:] == (1, h, w)
        assert out["boxes"][:, 2].max() <= w and out["boxes"][:, 3].max() <= h


def test_official_and_short_layouts_resolve(toy_coco_dir, tmp_path):
    ann, images = resolve_layout(toy_coco_dir, "val")
    assert (ann.name, images.name) == ("instances_val2017.json", "val2017")
    short = make_toy_coco(tmp_path / "short", train=1, val=1, size=32, short_layout=True)
    ann, images = resolve_layout(short, "train")
    assert (ann.name, images.name) == ("instances_train.json", "train")


def test_wrong_layout_fails_naming_what_is_missing(toy_coco_dir, tmp_path):
    shutil.copytree(toy_coco_dir / "annotations", tmp_path / "annotations")
    with pytest.raises(FileNotFoundError, match=r"train2017 \(official\)"):
        resolve_layout(tmp_path, "train")
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(main, ["eval", "detection", str(empty), "--checkpoint",
                                       str(toy_coco_dir / "annotations" / "instances_val2017.json")])
    assert result.exit_code == 1 and "Traceback" not in result.output      # one Error: line (cli.py)
    assert "Error:" in result.output and "annotations/instances_train2017.json" in result.output


def test_ground_truth_submitted_through_result_writer_scores_ap_100(toy_coco_dir, tmp_path):
    val = CocoInstances(toy_coco_dir, "val", train=False)
    bbox, segm = [], []
    for image_id in val.image_ids:
        anns = val.coco.imgToAnns[image_id]
        prediction = {
            "boxes": torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                    a["bbox"][1] + a["bbox"][3]] for a in anns]),
            "labels": torch.tensor([val.category_to_label[a["category_id"]] for a in anns]),
            "scores": torch.ones(len(anns)),
            "masks": torch.from_numpy(np.stack([val.coco.annToMask(a) for a in anns])[:, None]).float(),
        }
        b, s = to_results(image_id=image_id, prediction=prediction, label_to_category=val.label_to_category)
        bbox += b
        segm += s
    write_results(tmp_path / "segm.json", segm)
    assert json.loads((tmp_path / "segm.json").read_text()) == segm  # RLE counts are JSON strings
    assert {r["category_id"] for r in bbox} <= {3, 7, 11}  # labels mapped back to the sparse COCO ids
    for iou_type, results in (("bbox", bbox), ("segm", segm)):
        scores = evaluate(val.coco, results, iou_type=iou_type, image_ids=val.image_ids)
        assert (scores["AP"], scores["AP50"], scores["AP75"]) == (100.0, 100.0, 100.0), iou_type
    # a detector that misses one instance (of the first image) loses recall: AP drops below 100
    first = val.image_ids[0]
    dropped = [r for r in bbox if r["image_id"] != first] + [r for r in bbox if r["image_id"] == first][1:]
    assert evaluate(val.coco, dropped, iou_type="bbox", image_ids=val.image_ids)["AP"] < 100.0
    assert evaluate(val.coco, [], iou_type="segm", image_ids=val.image_ids)["AP"] == 0.0


def test_lsj_sample_keeps_boxes_on_their_masks_and_is_keyed_by_seed_epoch_index(toy_coco_dir):
    train = CocoInstances(toy_coco_dir, "train", train=True, image_size=64, seed=3)
    image, target = train[1]
    assert image.dtype == torch.float32 and max(image.shape[-2:]) <= 64
    assert target["masks"].shape[-2:] == image.shape[-2:] and len(target["boxes"]) == len(target["labels"])
    assert set(target["labels"].tolist()) <= {1, 2, 3}
    for box, mask in zip(target["boxes"], target["masks"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if len(ys):  # the mask's extent sits inside its box, within resampling error
            assert xs.min() >= box[0] - 1.5 and xs.max() + 1 <= box[2] + 1.5
            assert ys.min() >= box[1] - 1.5 and ys.max() + 1 <= box[3] + 1.5
    again = train[1]
    assert torch.equal(again[0], image) and torch.equal(again[1]["boxes"], target["boxes"])
    draws = set()
    for epoch in range(4):
        train.set_epoch(epoch)
        draws.add(tuple(train[1][0].shape))
    assert len(draws) > 1  # the scale jitter differs between epochs


def test_rle_annotations_give_the_same_masks_as_polygons_and_crowds_are_left_out(toy_coco_dir, tmp_path):
    shutil.copytree(toy_coco_dir, tmp_path / "coco")
    path = tmp_path / "coco" / "annotations" / "instances_train2017.json"
    polygons = CocoInstances(tmp_path / "coco", "train", train=True, image_size=64)
    dataset = json.loads(path.read_text())
    for ann in dataset["annotations"]:  # every instance as compressed RLE instead of a polygon
        rle = polygons.coco.annToRLE(ann)
        ann["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    first = dataset["images"][0]
    height, width = first["height"], first["width"]
    dataset["annotations"].append({  # a crowd over the whole image, uncompressed RLE (COCO's crowd form)
        "id": 999, "image_id": first["id"], "category_id": 3, "iscrowd": 1, "bbox": [0, 0, width, height],
        "area": width * height, "segmentation": {"size": [height, width], "counts": [0, height * width]}})
    path.write_text(json.dumps(dataset))
    rles = CocoInstances(tmp_path / "coco", "train", train=True, image_size=64)
    for index in range(len(rles)):
        a, b = polygons[index][1], rles[index][1]
        assert torch.equal(a["masks"], b["masks"]) and torch.equal(a["labels"], b["labels"])


def _run(args):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_detection_command_trains_writes_coco_results_and_resumes_to_the_same_weights(
        toy_coco_dir, dense_vit_checkpoint, tmp_path, keep_run_folder):
    kept = tmp_path / "after_epoch_1"      # the run folder a run killed after epoch 1 would leave behind
    keep_run_folder(lambda state: state["progress"]["epoch"] == 1, kept)
    common = ["eval", "detection", str(toy_coco_dir), "--checkpoint", str(dense_vit_checkpoint), *ARGS, *FAST,
              "--epochs", "2"]
    run_a = tmp_path / "a"
    _run(common + ["--out", str(run_a)])
    record = json.loads((run_a / "result.json").read_text())
    assert record["task"] == "detection"
    for key in ("box_AP", "box_AP50", "box_AP75", "mask_AP", "mask_AP50", "mask_AP75"):
        assert 0.0 <= record["metrics"][key] <= 100.0, key
    assert record["settings"]["epochs"] == 2 and record["checkpoint"]["sha256"]
    assert record["config"]["heads"] == "light" and record["config"]["scale_range"] == [0.1, 2.0]
    segm = json.loads((run_a / "segm_results.json").read_text())
    assert all(isinstance(r["segmentation"]["counts"], str) and r["category_id"] in (3, 7, 11) for r in segm)
    assert len((run_a / "metrics.jsonl").read_text().splitlines()) == 2

    run_b = tmp_path / "b"
    shutil.copytree(kept, run_b)
    result = _run(common + ["--out", str(run_b), "--resume"])
    assert "resumed" in result.output and "after epoch 1" in result.output
    a = torch.load(run_a / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(run_b / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((run_b / "result.json").read_text())["metrics"] == record["metrics"]
    assert (run_b / "metrics.jsonl").read_text() == (run_a / "metrics.jsonl").read_text()

    result = CliRunner().invoke(main, common + ["--out", str(run_b), "--resume", "--lr", "1e-3"])
    assert result.exit_code == 1 and "Error:" in result.output and "Traceback" not in result.output
    assert "lr: checkpoint 0.0001, now 0.001" in result.output


@pytest.mark.slow
def test_detection_learns_coloured_shapes(tmp_path):
    """bench/detection_toy.py's run (docs/eval.md) with 16 sampled RoIs per image instead of 64
    (the same 32 steps; most of a step is the mask head on the positive RoIs): box AP50 well
    above zero after a short CPU run."""
    from bench.detection_toy import run_toy

    metrics = run_toy(tmp_path, roi_batch=16, threads=2)
    assert metrics["box_AP50"] > 20.0, metrics


def _reference_detection_lr(step, *, total, lr, warmup, lr_steps=(0.889, 0.963)):
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return lr * warm * 0.1 ** sum(step >= int(f * total) for f in lr_steps)


@pytest.mark.parametrize("total, warmup", [(1000, 250), (90, 0), (40, 1), (9, 20), (300, 300)])
def test_one_schedule_gives_todays_detection_step_schedule(total, warmup):
    """eval.detection.lr_at (core.optim's one schedule, kind "step") against the hand-written one it replaced."""
    from eval.detection import lr_at as detection_lr
    for step in range(total + 2):
        assert detection_lr(step, total=total, lr=1e-4, warmup=warmup) == pytest.approx(
            _reference_detection_lr(step, total=total, lr=1e-4, warmup=warmup), rel=1e-13)
