"""eval/knn.py and eval/data.py: the k-NN vote, the datasets, `eval knn` end to end."""
import json
import math
import pickle

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

import cli
from eval.data import EvalImages, eval_transform, make_loader, probe_train_transform
from eval.knn import knn_accuracy, knn_scores, topk_accuracy

COLOURS = {"blue": (30, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_vit(seed=0):
    """A 2-block ViT-Tiny at 32 px, randomly initialised from ``seed`` (global RNG kept)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, depth=2)


def make_toy_folder(root, *, per_class, seed):
    """ImageFolder of 40x48 images: a class-coloured rectangle on a noisy gray field,
    saved as JPEG, PNG and palette PNG in turn."""
    rng = np.random.default_rng(seed)
    for c, (name, rgb) in enumerate(COLOURS.items()):
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            img = rng.integers(90, 140, size=(40, 48, 3)).astype(np.uint8)
            y, x = rng.integers(0, 12), rng.integers(0, 14)
            img[y:y + 26, x:x + 32] = np.clip(np.array(rgb) + rng.integers(-20, 20, 3), 0, 255)
            pil = Image.fromarray(img)
            if j % 3 == 0:
                pil.save(root / name / f"{j:03d}.jpg", quality=90)
            elif j % 3 == 1:
                pil.save(root / name / f"{j:03d}.png")
            else:
                pil.convert("P").save(root / name / f"{j:03d}.png")
    return root


def test_knn_vote_matches_hand_computed_weights():
    memory = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]]), dim=1)
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[1.0, 0.0]])
    scores = knn_scores(memory, labels, query, num_classes=3, k=2, temperature=0.5)
    expected = torch.tensor([[math.exp(1.0 / 0.5), math.exp(0.8 / 0.5), 0.0]])
    torch.testing.assert_close(scores, expected)


def test_knn_on_separable_features_is_above_95_percent_and_blocking_changes_nothing():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(10, 64, generator=g), dim=1)
    mem_labels = torch.arange(10).repeat_interleave(50)
    qry_labels = torch.arange(10).repeat_interleave(20)
    mem = F.normalize(centres[mem_labels] + 0.15 * torch.randn(500, 64, generator=g), dim=1)
    qry = F.normalize(centres[qry_labels] + 0.15 * torch.randn(200, 64, generator=g), dim=1)
    acc = knn_accuracy(mem, mem_labels, qry, qry_labels, num_classes=10)
    assert acc["top1"] > 95.0 and acc["top5"] >= acc["top1"]
    whole = knn_scores(mem, mem_labels, qry, num_classes=10, max_elements=10 ** 9)
    blocked = knn_scores(mem, mem_labels, qry, num_classes=10, max_elements=1500)  # 3 rows
    # Blocking changes only the GEMM's summation order: each cosine moves by at most
    # D * eps (unit vectors), each weight exp(sim / T) by a relative D * eps / T, and the
    # sum of k positive weights adds k * eps. Same neighbours, same predictions, same scores
    # within that bound (the scores are ~1e5; float32's default rtol 1.3e-6 is below it).
    eps, k, temperature = torch.finfo(torch.float32).eps, 20, 0.07
    torch.testing.assert_close(blocked, whole, rtol=64 * eps / temperature + k * eps, atol=0)
    assert torch.equal((whole > 0), (blocked > 0))                 # the same classes got votes
    assert torch.equal(whole.argmax(1), blocked.argmax(1))
    assert topk_accuracy(whole, qry_labels) == topk_accuracy(blocked, qry_labels) == acc
    # random labels: the vote is at chance, so the metric can fail
    shuffled = mem_labels[torch.randperm(500, generator=g)]
    assert knn_accuracy(mem, shuffled, qry, qry_labels, num_classes=10)["top1"] < 40.0


def test_topk_accuracy_counts_hits_within_k():
    scores = torch.tensor([[0.9, 0.05, 0.03, 0.01, 0.005, 0.005],
                           [0.1, 0.2, 0.3, 0.15, 0.12, 0.13],
                           [0.0, 0.0, 0.1, 0.2, 0.3, 0.4]])
    acc = topk_accuracy(scores, torch.tensor([0, 0, 0]))
    assert acc["top1"] == pytest.approx(100 / 3) and acc["top5"] == pytest.approx(200 / 3)


def test_image_folder_dataset_reads_every_mode_as_rgb_and_aligns_val_classes(tmp_path):
    root = make_toy_folder(tmp_path / "train", per_class=3, seed=0)
    ds = EvalImages(root, transform=eval_transform(32))
    assert ds.layout == "imagefolder" and ds.classes == ["blue", "green", "red"]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    x, y = ds[4]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 1
    assert ds.image(2).mode == "RGB"  # saved as palette PNG
    (tmp_path / "val" / "red").mkdir(parents=True)
    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "val" / "red" / "a.png")
    val = EvalImages(tmp_path / "val", classes=ds.classes)
    assert val.labels.tolist() == [2]  # "red" keeps the train index, not its own 0


def test_packed_set_gives_the_same_samples_as_its_image_folder_with_any_worker_count(tmp_path):
    from data.shards import prepare

    src = make_toy_folder(tmp_path / "src", per_class=3, seed=0)
    prepare(src, tmp_path / "packed", shard_size=4, progress=False, workers=0)
    folder = EvalImages(src, transform=probe_train_transform(32), seed=7)
    packed = EvalImages(tmp_path / "packed", transform=probe_train_transform(32), seed=7)
    assert packed.layout == "packed" and packed.classes == folder.classes
    # prepare writes the folder's samples in a seeded order: packed image i is the folder's
    # image with the same relative path, with the same label and pixels
    in_folder = {str(f.relative_to(src)): j for j, f in enumerate(folder._files)}
    match = [in_folder[packed._packed.source(i)] for i in range(len(packed))]
    assert sorted(match) == list(range(len(folder))) and match != sorted(match)
    assert packed.labels.tolist() == folder.labels[match].tolist()
    plain = {name: EvalImages(root, transform=eval_transform(32)) for name, root in
             (("folder", src), ("packed", tmp_path / "packed"))}
    for i, j in enumerate(match):
        assert packed.read(i) == folder.read(j)
        x, y = plain["packed"][i]
        assert torch.equal(x, plain["folder"][j][0]) and y == plain["folder"][j][1]
    batches = {}
    for name, ds, workers in [("folder", folder, 0), ("packed", packed, 0),
                              ("packed2", pickle.loads(pickle.dumps(packed)), 2)]:
        loader = make_loader(ds, batch_size=4, shuffle=True, seed=3, epoch=1,
                             num_workers=workers)
        batches[name] = [(x.clone(), y.clone()) for x, y in loader]
    assert len(batches["packed"]) == len(batches["packed2"]) == len(batches["folder"]) == 3
    for (xa, ya), (xb, yb) in zip(batches["packed"], batches["packed2"]):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    # the epoch changes the augmentation and the order: the comparison above can fail
    other = [x for x, _ in make_loader(packed, batch_size=4, shuffle=True, seed=3, epoch=2)]
    assert not torch.equal(other[0], batches["packed"][0][0])


@pytest.mark.parametrize("case", ["flat", "empty_class", "unfinished_pack", "foreign_class"])
def test_dataset_in_wrong_layout_fails_naming_what_is_missing(tmp_path, case):
    root = tmp_path / "data"
    root.mkdir()
    if case == "flat":
        Image.new("RGB", (8, 8)).save(root / "a.png")
        expected = r"no class subfolders: expected .*data/<class>/<image>.*one folder per class"
    elif case == "empty_class":
        make_toy_folder(root, per_class=1, seed=0)
        (root / "zebra").mkdir()
        (root / "zebra" / "notes.txt").write_text("x")
        expected = r"class folders without images .*: zebra \(1 of 4\)"
    elif case == "unfinished_pack":
        make_toy_folder(root, per_class=1, seed=0)
        (root / "shards").mkdir()
        (root / "shards" / "shard-000000.tar").write_bytes(b"")
        expected = r"has shards/\*.tar but no manifest.json: an unfinished `prepare`"
    else:
        make_toy_folder(root, per_class=1, seed=0)
        expected = r"classes not in the reference \(train\) set: blue, green \(2 of 3\)"
    with pytest.raises(ValueError, match=expected):
        EvalImages(root, classes=["red"] if case == "foreign_class" else None)


def test_eval_knn_command_separates_toy_classes_and_writes_record(tmp_path):
    train = make_toy_folder(tmp_path / "train", per_class=12, seed=1)
    val = make_toy_folder(tmp_path / "val", per_class=6, seed=2)
    ck = tmp_path / "student.pth"
    torch.save({"model": tiny_vit().state_dict()}, ck)
    out = tmp_path / "knn"
    res = CliRunner().invoke(cli.main, [
        "eval", "knn", "--checkpoint", str(ck), "--model-arg", "img_size=32",
        "--model-arg", "depth=2", "--train", str(train), "--val", str(val),
        "--out", str(out), "--device", "cpu", "--batch-size", "16", "--workers", "0"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    rec = json.loads((out / "result.json").read_text())
    assert rec["metrics"]["top1"] > 95.0, rec["metrics"]
    assert rec["task"] == "knn" and len(rec["checkpoint"]["sha256"]) == 64
    assert rec["git_commit"] is not None
    s = rec["settings"]
    assert (s["k"], s["k_effective"], s["temperature"]) == (20, 20, 0.07)
    assert (s["train_images"], s["val_images"], s["num_classes"]) == (36, 18, 3)
    assert s["timm_kwargs"] == {"img_size": 32, "depth": 2} and s["input_size"] == 32
    assert "top1" in res.output and "knn" in res.output
    # the resolved config: every default, and the options as given
    assert rec["config"]["k"] == 20 and rec["config"]["batch_size"] == 16
    assert rec["config"]["model_args"] == ["img_size=32", "depth=2"] and rec["config"]["train"] == str(train)


def test_two_knn_runs_on_two_checkpoints_with_default_options_keep_both_results(tmp_path, monkeypatch):
    train = make_toy_folder(tmp_path / "train", per_class=2, seed=1)
    for seed in (0, 1):
        (tmp_path / f"run{seed}").mkdir()
        torch.save(tiny_vit(seed).state_dict(), tmp_path / f"run{seed}" / "student.pth")   # one name, two files
    monkeypatch.chdir(tmp_path)
    for seed in (0, 1):
        res = CliRunner().invoke(cli.main, [
            "eval", "knn", "--checkpoint", f"run{seed}/student.pth", "--model-arg", "img_size=32",
            "--model-arg", "depth=2", "--train", str(train), "--val", str(train), "--device", "cpu",
            "--workers", "0"])
        assert res.exit_code == 0, res.output + repr(res.exception)
    results = sorted((tmp_path / "runs" / "eval").glob("student-*/knn/result.json"))
    assert len(results) == 2, results
    records = [json.loads(r.read_text()) for r in results]
    assert {r["checkpoint"]["path"] for r in records} == {"run0/student.pth", "run1/student.pth"}
    for path, rec in zip(results, records):    # each folder is named for the checkpoint it holds
        assert path.parent.parent.name == f"student-{rec['checkpoint']['sha256'][:8]}"


def test_eval_knn_command_refuses_checkpoint_of_other_size(tmp_path):
    train = make_toy_folder(tmp_path / "train", per_class=1, seed=1)
    ck = tmp_path / "student.pth"
    torch.save(tiny_vit().state_dict(), ck)
    res = CliRunner().invoke(cli.main, [
        "eval", "knn", "--checkpoint", str(ck), "--model-arg", "depth=2",
        "--train", str(train), "--val", str(train), "--out", str(tmp_path / "r"),
        "--device", "cpu", "--workers", "0"])
    assert res.exit_code != 0
    assert "pos_embed: checkpoint (1, 5, 192) vs model (1, 197, 192)" in res.output, res.output
    assert not (tmp_path / "r" / "result.json").exists()
