"""ADE20K segmentation: label convention, layout, transforms, metrics, slide inference, UperNet end to end."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cli import main
from eval.ade import AdeSegmentation, list_pairs, read_label, reduce_zero_label, resolve_layout
from eval.segmentation import SegmentationMetrics, slide_logits, window_starts
from eval.upernet import UperHead

ARGS = ["--model-arg", "img_size=64", "--model-arg", "depth=2"]
FAST = ["--image-size", "64", "--batch-size", "2", "--channels", "32", "--workers", "0", "--warmup", "1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_reduce_zero_label_ignores_other_and_shifts_classes_down():
    label = np.array([[0, 1, 2], [150, 255, 7]], np.uint8)
    assert reduce_zero_label(label).tolist() == [[255, 0, 1], [149, 255, 6]]


def test_perfect_segmentation_of_ade_label_maps_scores_100(toy_ade_dir):
    metrics = SegmentationMetrics(num_classes=150)
    for _, label_path in list_pairs(*resolve_layout(toy_ade_dir, "validation")):
        label = read_label(label_path, num_classes=150)
        assert (label == 255).any() and (label == 149).any()  # "other" present and ignored; class 150 -> 149
        prediction = label.clone()
        prediction[label == 255] = 7  # whatever is predicted on ignored pixels does not count
        metrics.update(prediction, label)
    assert metrics.compute() == {"mIoU": 100.0, "aAcc": 100.0}


def test_partial_segmentation_scores_its_hand_computed_miou_and_accuracy():
    label = torch.tensor([[0, 0, 1, 1, 255],
                          [0, 0, 1, 1, 255]])
    prediction = torch.tensor([[0, 1, 1, 1, 3],
                               [0, 1, 1, 1, 3]])
    metrics = SegmentationMetrics(num_classes=150)
    metrics.update(prediction, label)
    result = metrics.compute()
    # class 0: 2 right of 4 labelled, union 4 -> 1/2; class 1: 4 right, union 6 -> 2/3; class 3 is
    # predicted only on ignored pixels and the other 147 classes nowhere: all left out of the mean
    assert result["mIoU"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    assert result["aAcc"] == pytest.approx(100 * 6 / 8)
    metrics.update(torch.tensor([[5]]), torch.tensor([[0]]))  # a false positive brings class 5 into the mean
    assert metrics.compute()["mIoU"] == pytest.approx(100 * (2 / 5 + 2 / 3 + 0) / 3)


def test_wrong_layout_fails_naming_what_is_missing(toy_ade_dir, tmp_path):
    shutil.copytree(toy_ade_dir / "images", tmp_path / "images")
    with pytest.raises(FileNotFoundError, match="annotations/training"):
        resolve_layout(tmp_path, "training")
    shutil.copytree(toy_ade_dir / "annotations", tmp_path / "annotations")
    (tmp_path / "annotations" / "validation" / "ADE_validation_00000002.png").unlink()
    with pytest.raises(FileNotFoundError, match="ADE_validation_00000002.jpg"):
        list_pairs(*resolve_layout(tmp_path, "validation"))
    result = CliRunner().invoke(main, ["eval", "segmentation", str(tmp_path / "images"), "--checkpoint",
                                       str(next((toy_ade_dir / "annotations" / "training").iterdir()))])
    assert result.exit_code == 1 and "Traceback" not in result.output      # one Error: line (cli.py)
    assert "Error:" in result.output and "images/training" in result.output


def test_label_beyond_the_classes_fails_naming_the_file(tmp_path):
    path = tmp_path / "bad.png"
    Image.fromarray(np.full((4, 4), 151, np.uint8)).save(path)
    with pytest.raises(ValueError, match="bad.png: label 151 exceeds the 150 classes"):
        read_label(path, num_classes=150)


def test_training_crops_are_square_padded_with_ignore_and_keyed_by_seed_epoch_index(toy_ade_dir):
    train = AdeSegmentation(toy_ade_dir, "training", train=True, image_size=64, seed=5)
    for index in range(len(train)):
        image, label = train[index]
        assert image.shape == (3, 64, 64) and label.shape == (64, 64) and label.dtype == torch.int64
        assert set(label.unique().tolist()) <= {0, 1, 149, 255}
    image, label = train[2]
    assert torch.equal(train[2][0], image) and torch.equal(train[2][1], label)
    train.set_epoch(1)
    assert not torch.equal(train[2][0], image)
    val = AdeSegmentation(toy_ade_dir, "validation", train=False, image_size=64)
    image, label = val[0]  # 48 x 80 -> shorter side 64, label kept at its own size for scoring
    assert tuple(image.shape) == (3, 64, 107) and tuple(label.shape) == (48, 80)


def test_window_starts_cover_the_image_and_end_flush():
    assert window_starts(64, crop=64, stride=42) == [0]
    assert window_starts(40, crop=64, stride=42) == [0]
    assert window_starts(150, crop=64, stride=42) == [0, 42, 84, 86]


def test_slide_inference_equals_a_whole_image_forward_for_a_pointwise_model():
    """Averaging overlapping windows (and padding the edge ones) must not change a per-pixel model."""
    model = torch.nn.Conv2d(3, 5, kernel_size=1)
    image = torch.randn(3, 100, 150, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model(image[None])[0]
    slid = slide_logits(model, image, crop=64, stride=42, num_classes=5, batch=3)
    assert torch.allclose(slid, whole, atol=1e-5)


def test_uperhead_returns_logits_at_the_finest_level():
    features = [torch.randn(2, 16, 32 // s, 48 // s) for s in (1, 2, 4, 8)]
    head = UperHead(in_channels=[16] * 4, channels=8, num_classes=150).eval()
    with torch.no_grad():
        assert tuple(head(features).shape) == (2, 150, 32, 48)


def _run(args):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_segmentation_command_trains_scores_and_resumes_to_the_same_weights(
        toy_ade_dir, dense_vit_checkpoint, tmp_path, keep_run_folder):
    kept = tmp_path / "after_iter_1"       # the run folder a run killed after iteration 1 would leave behind
    keep_run_folder(lambda state: state["progress"]["iter"] == 1, kept)
    common = ["eval", "segmentation", str(toy_ade_dir), "--checkpoint", str(dense_vit_checkpoint), *ARGS, *FAST,
              "--iters", "3", "--checkpoint-every", "1"]
    _run(common + ["--out", str(tmp_path / "a")])
    record = json.loads((tmp_path / "a" / "result.json").read_text())
    assert record["task"] == "segmentation" and set(record["metrics"]) == {"mIoU", "aAcc"}
    assert all(0.0 <= v <= 100.0 for v in record["metrics"].values())
    assert record["settings"]["num_classes"] == 150 and record["settings"]["iters"] == 3
    assert record["config"]["iters"] == 3 and record["config"]["channels"] == 32

    run_b = tmp_path / "b"
    shutil.copytree(kept, run_b)
    result = _run(common + ["--out", str(run_b), "--resume"])
    assert "after iteration 1" in result.output
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(run_b / "checkpoint.pt", weights_only=False)
    assert a["progress"] == b["progress"] == {"iter": 3}
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert json.loads((run_b / "result.json").read_text())["metrics"] == record["metrics"]
