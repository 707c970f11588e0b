"""eval/common.py: strict checkpoint loading, result records, small helpers."""
import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from eval.common import (checkpoint_digest, format_table, git_commit, load_backbone,
                         parse_model_args, read_state_dict, write_result)

TINY = dict(img_size=32, depth=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_model(**kw):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", num_classes=0, **{**TINY, **kw}).eval()


def _same_outputs(a, b):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a(x), b(x))


@pytest.mark.parametrize("layout", ["plain.pth", "model.pt", "state_dict.pth", "module.pth",
                                    "plain.safetensors"])
def test_load_backbone_round_trips_every_checkpoint_layout(tmp_path, layout):
    src = _tiny_model()
    state = src.state_dict()
    path = tmp_path / layout
    if layout.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif layout.startswith("model"):
        torch.save({"model": state, "epoch": 3}, path)
    elif layout.startswith("state_dict"):
        torch.save({"state_dict": state}, path)
    elif layout.startswith("module"):
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    loaded = load_backbone(path, model="vit_tiny_patch16_224", **TINY)
    assert not loaded.training
    assert _same_outputs(src, loaded)


def test_checkpoint_of_wrong_resolution_fails_naming_shape_mismatch(tmp_path):
    path = tmp_path / "ck.pth"
    torch.save(_tiny_model().state_dict(), path)
    with pytest.raises(ValueError) as err:
        load_backbone(path, model="vit_tiny_patch16_224", img_size=64, depth=2)
    msg = str(err.value)
    assert "pos_embed" in msg and "(1, 5, 192)" in msg and "(1, 17, 192)" in msg
    assert str(path) in msg


def test_checkpoint_with_head_and_missing_block_fails_naming_keys(tmp_path):
    state = timm.create_model("vit_tiny_patch16_224", num_classes=10, **TINY).state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("blocks.1.")}
    path = tmp_path / "ck.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        load_backbone(path, model="vit_tiny_patch16_224", **TINY)
    msg = str(err.value)
    assert "unexpected keys (2): head.bias, head.weight" in msg
    assert "missing keys" in msg and "blocks.1.attn.qkv.weight" in msg


def test_an_all_zero_classifier_as_export_writes_it_is_dropped_and_a_trained_one_is_not(tmp_path):
    src = _tiny_model()
    state = {**src.state_dict(), "head.weight": torch.zeros(1000, 192), "head.bias": torch.zeros(1000)}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "export.safetensors"))
    assert _same_outputs(src, load_backbone(tmp_path / "export.safetensors", **TINY))
    state["head.bias"][3] = 0.5
    torch.save(state, tmp_path / "trained.pth")
    with pytest.raises(ValueError, match=r"unexpected keys \(2\): head.bias, head.weight"):
        load_backbone(tmp_path / "trained.pth", **TINY)


def test_checkpoint_of_another_architecture_fails(tmp_path):
    path = tmp_path / "small.pth"
    torch.save(timm.create_model("vit_small_patch16_224", num_classes=0, **TINY).state_dict(),
               path)
    expected = r"shape mismatches \(30\): blocks.0.attn.proj.bias: checkpoint \(384,\) vs model"
    with pytest.raises(ValueError, match=expected):
        load_backbone(path, model="vit_tiny_patch16_224", **TINY)


def test_unreadable_or_non_state_dict_checkpoints_fail_naming_the_file(tmp_path):
    listing = tmp_path / "list.pth"
    torch.save([1, 2, 3], listing)
    with pytest.raises(ValueError, match="list.pth: holds no state dict"):
        read_state_dict(listing)
    weird = tmp_path / "weights.npz"
    weird.write_bytes(b"nothing")
    with pytest.raises(ValueError, match="weights.npz: unknown file type '.npz'"):
        read_state_dict(weird)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        read_state_dict(tmp_path / "absent.pth")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="garbage.pt: cannot be read"):
        read_state_dict(garbage)


def test_write_result_records_metric_settings_digest_and_commit(tmp_path):
    ck = tmp_path / "ck.pth"
    torch.save(_tiny_model().state_dict(), ck)
    out = tmp_path / "sub" / "result.json"
    rec = write_result(out, task="knn", metrics={"top1": 97.5},
                       settings={"k": 20, "train": tmp_path, "pair": (1, 2)}, checkpoint=ck)
    on_disk = json.loads(out.read_text())
    assert on_disk == rec
    assert on_disk["task"] == "knn" and on_disk["metrics"] == {"top1": 97.5}
    assert on_disk["settings"] == {"k": 20, "train": str(tmp_path), "pair": [1, 2]}
    assert on_disk["checkpoint"]["sha256"] == hashlib.sha256(ck.read_bytes()).hexdigest()
    assert on_disk["checkpoint"]["sha256"] == checkpoint_digest(ck)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                          capture_output=True, text=True).stdout.strip()
    assert on_disk["git_commit"] == git_commit() == head and len(head) == 40
    assert on_disk["time"].endswith("+00:00")


def test_format_table_aligns_columns_and_rounds_floats():
    text = format_table([{"task": "knn", "top1": 97.4567}, {"task": "linear", "top1": 5.0}])
    lines = text.splitlines()
    assert lines[0].split() == ["task", "top1"]
    assert lines[2].split() == ["knn", "97.46"] and lines[3].split() == ["linear", "5.00"]
    assert len({len(line) for line in lines}) == 1


def test_parse_model_args_reads_yaml_values_and_rejects_malformed():
    assert parse_model_args(["img_size=32", "drop_path_rate=0.1", "class_token=true"]) == {
        "img_size": 32, "drop_path_rate": 0.1, "class_token": True}
    with pytest.raises(ValueError, match="'img_size': expected KEY=VALUE"):
        parse_model_args(["img_size"])
