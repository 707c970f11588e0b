"""train/export.py: the hub folder loads in timm strictly and gives the student's features, for a
ViT-Tiny and a ViT-S student; its model card names the teachers, their digests, the data and the
evaluations found; the single file is what `train` writes; the push fails in one line offline."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner

from cli import main
from store.features import FeatureStore
from train.config import load_config
from train.export import _load_student, architecture, find_results, student_file
from train.loop import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# depth 1 keeps the runs short; the widths and heads make the size (timm's name)
STUDENTS = {"vit_tiny_patch16_224": dict(embed_dim=192, num_heads=3),
            "vit_small_patch16_224": dict(embed_dim=384, num_heads=6)}


def _invoke(*args, ok: bool = True):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert (r.exit_code == 0) == ok, (args, r.output, r.exception)
    return r.output


@pytest.fixture(scope="module")
def runs(prepared_data, teacher_store, tmp_path_factory) -> dict[str, Path]:
    """{timm name: a run folder of one step} for a Tiny and a Small student, one block each."""
    out = {}
    for name, size in STUDENTS.items():
        cfg = load_config(None, [
            f"data.images={prepared_data}", f"data.store={teacher_store}", "data.views=2", "data.decoder=pil",
            "data.num_workers=0", "data.shuffle_window=2", "train.batch_size=4", "schedule.epochs=1",
            "schedule.warmup_epochs=0", "model.depth=1", "decoder.depth=1",
            f"model.embed_dim={size['embed_dim']}", f"model.num_heads={size['num_heads']}"])
        out[name] = tmp_path_factory.mktemp("export_run") / "run"
        train(cfg, out_dir=out[name], max_steps=1, progress=False)
    return out


@pytest.mark.parametrize("name", list(STUDENTS))
def test_the_folder_loads_strictly_in_timm_from_the_local_path_and_gives_the_students_features(runs, name,
                                                                                            tmp_path):
    from safetensors.torch import load_file
    from core.state import load_strict
    from data.decode import MEAN, STD
    out = tmp_path / "hub"
    assert str(out) in _invoke("export", runs[name], out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == name and config["num_classes"] == 0
    assert config["model_args"]["depth"] == 1 and config["model_args"]["embed_dim"] == STUDENTS[name]["embed_dim"]
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    cfg = model.pretrained_cfg
    assert tuple(cfg["input_size"]) == (3, 224, 224) and tuple(cfg["mean"]) == MEAN and tuple(cfg["std"]) == STD
    # strict: the weights fit the architecture config.json names, key for key
    load_strict(timm.create_model(name, num_classes=0, depth=1, **STUDENTS[name]), load_file(out / "model.safetensors"),
                what="folder weights")
    _, _, student = _load_student(runs[name])
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.forward_features(images), student.vit.eval().forward_features(images))
        visible = torch.arange(196).expand(2, 196)
        cls, patches = student(images, visible)
        torch.testing.assert_close(model.forward_features(images), torch.cat([cls[:, None], patches], 1))


def test_the_model_card_names_the_teachers_their_digests_the_data_the_steps_and_the_evaluations(
        runs, prepared_data, photo_tree, teacher_store, tmp_path):
    run = runs["vit_small_patch16_224"]
    out, evals = tmp_path / "hub", tmp_path / "evals"
    _invoke("export", run, out, "--results", evals)
    card = (out / "README.md").read_text()
    store = FeatureStore.open(teacher_store)
    for teacher in ("mae", "mocov3", "ibot"):
        assert f"{teacher}: untrained (random init), sha256 {store.teacher(teacher).config['checkpoint_digest']}" \
            in card
    assert f"prepare digest sha256 {store.data_digest}" in card and "1 of 1 steps" in card
    assert "vit_small_patch16_224, embed_dim 384, depth 1, num_heads 6" in card
    assert "**Evaluations:** none found" in card
    # evaluate the train's file and the folder's weights, then export again: both records are listed
    knn = ["--train", prepared_data, "--val", photo_tree, "--workers", 0, "--batch-size", 13, "--device", "cpu",
           "--model", "vit_small_patch16_224", "--model-arg", "depth=1"]
    _invoke("eval", "knn", "--checkpoint", run / "student.safetensors", *knn, "--out", evals / "file")
    _invoke("eval", "knn", "--checkpoint", out / "model.safetensors", *knn, "--out", evals / "folder")
    other = evals / "other" / "result.json"                       # another checkpoint's record is left out
    other.parent.mkdir()
    other.write_text(json.dumps({"task": "knn", "metrics": {"top1": 99.0}, "checkpoint": {"sha256": "0" * 64}}))
    _invoke("export", run, out, "--results", evals)
    card = (out / "README.md").read_text()
    for folder in ("file", "folder"):
        record = json.loads((evals / folder / "result.json").read_text())
        assert f"knn ({evals / folder / 'result.json'}): top1 {record['metrics']['top1']:.2f}" in card
    assert str(other) not in card and "top1 99.00" not in card


def test_the_single_file_form_is_the_file_train_writes_named_for_its_architecture(runs, tmp_path):
    from safetensors import safe_open
    for name, run in runs.items():
        out = tmp_path / f"{name}.safetensors"
        _invoke("export", run, out)
        assert out.read_bytes() == (run / "student.safetensors").read_bytes()
        with safe_open(out, "pt") as f:
            meta = f.metadata()
        assert meta["arch"] == name and json.loads(meta["model_args"])["embed_dim"] == STUDENTS[name]["embed_dim"]


def test_push_to_hub_offline_fails_in_one_line_after_writing_the_folder(runs, tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)   # no request leaves the machine
    out = tmp_path / "hub"
    output = _invoke("export", runs["vit_tiny_patch16_224"], out, "--push-to-hub", "someone/student", ok=False)
    assert output.startswith("Error: --push-to-hub someone/student: the push failed (OfflineModeIsEnabled")
    assert output.count("\n") == 1 and (out / "model.safetensors").is_file()
    output = _invoke("export", runs["vit_tiny_patch16_224"], tmp_path / "x.safetensors", "--push-to-hub", "a/b",
                     ok=False)
    assert "publishes the folder form" in output and output.count("\n") == 1


def test_export_replaces_an_earlier_export_but_refuses_a_folder_of_other_files(runs, tmp_path):
    out = tmp_path / "hub"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    output = _invoke("export", runs["vit_tiny_patch16_224"], out, ok=False)
    assert output.startswith(f"Error: {out}: exists and is not an export folder") and output.count("\n") == 1
    (out / "notes.txt").unlink()
    _invoke("export", runs["vit_tiny_patch16_224"], out)
    before = (out / "model.safetensors").read_bytes()
    _invoke("export", runs["vit_tiny_patch16_224"], out)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub"]     # no staging folder left behind


@pytest.mark.parametrize("arch, size, want", [
    ("vit_tiny_patch16_224", {}, "vit_tiny_patch16_224"),
    ("vit_tiny_patch16_224", dict(embed_dim=384, num_heads=6, depth=3), "vit_small_patch16_224"),
    ("vit_small_patch16_224", dict(embed_dim=768, num_heads=12), "vit_base_patch16_224"),
    ("vit_small_patch16_224", dict(embed_dim=384, num_heads=12), "vit_small_patch16_224"),   # no such size
    ("vit_tiny_patch16_224", dict(embed_dim=256, num_heads=4, depth=2), "vit_tiny_patch16_224"),
    ("deit_tiny_patch16_224", dict(embed_dim=384, num_heads=6), "deit_small_patch16_224"),
])
def test_the_architecture_is_the_timm_name_of_the_students_widths_and_heads(arch, size, want):
    vit = timm.create_model(arch, num_classes=0, device="meta", **size)
    assert architecture(vit) == want


def test_find_results_lists_the_records_of_the_given_digests_once(tmp_path):
    for folder, sha in (("a/knn", "1" * 64), ("b/linear", "2" * 64), ("c/knn", "3" * 64)):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "result.json").write_text(json.dumps(
            {"task": folder.split("/")[1], "metrics": {}, "checkpoint": {"sha256": sha}}))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "result.json").write_text("{not json")
    found = find_results([tmp_path, tmp_path / "a", tmp_path / "missing"], {"1" * 64, "2" * 64})
    assert [(r["task"], Path(r["path"]).parent.parent.name) for r in found] == [("knn", "a"), ("linear", "b")]


def test_the_single_file_has_the_same_bytes_every_time_and_reads_back():
    """safetensors orders the metadata differently from call to call; the export sorts it."""
    from safetensors.torch import load
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, depth=1)
    files = {student_file(vit) for _ in range(8)}
    assert len(files) == 1
    data = files.pop()
    assert (8 + int.from_bytes(data[:8], "little")) % 8 == 0
    state = load(data)
    assert torch.equal(state["blocks.0.attn.qkv.weight"], vit.state_dict()["blocks.0.attn.qkv.weight"])
