"""Official teacher checkpoints: conversion of the four released layouts, safe loading,
fetching without network, and deterministic random teachers.

The files are built here with the official key layouts (random weights plus the extra
entries those files hold). Most use a narrow ViT that keeps ViT-B/16's exact key layout
(12 blocks, patch 16, 224 px: the same 150 names), one uses the real ViT-B/16 shapes.
"""
from __future__ import annotations

import argparse
import hashlib
import pathlib
import random
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from teachers.checkpoints import (
    TEACHERS,
    VIT_B_ARCH,
    CheckpointError,
    CheckpointUnavailableError,
    cached_path,
    expected_keys,
    fetch_official,
    load_official_state_dict,
    safe_load,
)
from teachers.vit import build_teacher

REPO = pathlib.Path(__file__).resolve().parents[2]
NARROW = dict(embed_dim=32, num_heads=2)  # ViT-B/16 key layout, 1/24 of the width


def _timm_model(weights: dict, model_kwargs: dict | None):
    import timm

    with torch.device("meta"):  # no random init: the weights come next
        model = timm.create_model(VIT_B_ARCH, pretrained=False, num_classes=0, **(model_kwargs or {}))
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval()


def _random_like(shapes: dict, gen: torch.Generator, prefix: str = "") -> dict:
    """Random float32 tensors (std 0.02, LayerNorm weights near 1) for name -> shape,
    drawn as one flat vector (fast) and split into views."""
    sizes = [int(np.prod(shape)) for shape in shapes.values()]
    flat = torch.randn(sum(sizes), generator=gen).mul_(0.02)
    out, start = {}, 0
    for (name, shape), size in zip(shapes.items(), sizes):
        t = flat[start:start + size].view(tuple(shape))
        start += size
        if name.endswith("norm.weight") or ".norm1.weight" in name or ".norm2.weight" in name:
            t.add_(1.0)
        out[prefix + name] = t
    return out


def _backbone(gen: torch.Generator, model_kwargs: dict | None = NARROW) -> dict:
    return _random_like(expected_keys(VIT_B_ARCH, model_kwargs), gen)


def _official_file(kind: str, backbone: dict, gen: torch.Generator) -> dict:
    """A checkpoint object with the layout of the official release ``kind``."""
    width = backbone["cls_token"].shape[-1]
    other = {k: v + 1.0 for k, v in backbone.items()}  # momentum encoder / student: other weights
    args = argparse.Namespace(arch="vit_base", patch_size=16, lr=1.5e-4, output_dir="/ckpt")
    if kind == "mae":  # main_pretrain.py layout: encoder + mask token + decoder
        extra = _random_like({
            "mask_token": (1, 1, 16), "decoder_embed.weight": (16, width),
            "decoder_embed.bias": (16,), "decoder_pos_embed": (1, 197, 16),
            "decoder_blocks.0.norm1.weight": (16,), "decoder_blocks.0.attn.qkv.weight": (48, 16),
            "decoder_blocks.0.mlp.fc1.weight": (64, 16), "decoder_norm.weight": (16,),
            "decoder_pred.weight": (768, 16), "decoder_pred.bias": (768,)}, gen)
        return {"model": {**backbone, **extra}, "epoch": 799, "args": args}
    if kind == "mocov3":
        head = _random_like({
            "head.0.weight": (64, width), "head.1.weight": (64,), "head.1.bias": (64,),
            "head.1.running_mean": (64,), "head.1.running_var": (64,),
            "head.3.weight": (16, 64), "head.4.running_mean": (16,), "head.4.running_var": (16,)}, gen)
        head["head.1.num_batches_tracked"] = torch.tensor(1000)
        predictor = _random_like({"0.weight": (64, 16), "1.weight": (64,), "1.bias": (64,),
                                  "3.weight": (16, 64)}, gen, prefix="module.predictor.")
        state = {**{f"module.base_encoder.{k}": v for k, v in {**backbone, **head}.items()},
                 **{f"module.momentum_encoder.{k}": v for k, v in {**other, **head}.items()},
                 **predictor}
        return {"epoch": 300, "arch": "vit_base", "state_dict": state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1.5e-4, "params": [0, 1]}]},
                "scaler": {"scale": 65536.0, "_growth_tracker": 12}}
    dino_head = _random_like({"head.mlp.0.weight": (64, width), "head.mlp.0.bias": (64,),
                              "head.last_layer.weight_g": (128, 1),
                              "head.last_layer.weight_v": (128, 64)}, gen)
    if kind == "ibot":  # checkpoint_teacher.pth
        return {"state_dict": {**backbone, **dino_head,
                               "masked_embed": torch.zeros(1, width)}}
    if kind in ("ibot-full", "dino-full"):  # full training checkpoints (student + teacher)
        teacher = {**{f"backbone.{k}": v for k, v in backbone.items()}, **dino_head}
        student = {**{f"module.backbone.{k}": v for k, v in other.items()},
                   **{f"module.{k}": v for k, v in dino_head.items()}}
        loss = "ibot_loss" if kind == "ibot-full" else "dino_loss"
        if kind == "ibot-full":
            student["module.backbone.masked_embed"] = torch.zeros(1, width)
        return {"student": student, "teacher": teacher, "epoch": 800, "args": args,
                "optimizer": {"state": {}, "param_groups": []},
                loss: {"center": torch.zeros(1, 128)}}
    if kind == "dino":  # dino_vitbase16_pretrain.pth: plain backbone state dict
        return dict(backbone)
    raise ValueError(kind)


TEACHER_OF = {"mae": "mae", "mocov3": "mocov3", "ibot": "ibot", "ibot-full": "ibot",
              "dino": "dino", "dino-full": "dino"}


def test_narrow_test_vit_has_the_exact_vit_b16_key_layout():
    narrow, full = expected_keys(VIT_B_ARCH, NARROW), expected_keys(VIT_B_ARCH)
    assert list(narrow) == list(full) and len(full) == 150
    assert full["pos_embed"] == (1, 197, 768) and narrow["pos_embed"] == (1, 197, 32)


@pytest.mark.parametrize("kind", list(TEACHER_OF))
def test_official_layout_converts_to_the_same_tokens_as_timm_holding_those_weights(kind, tmp_path):
    gen = torch.Generator().manual_seed(sum(map(ord, kind)))
    backbone = _backbone(gen)
    path = tmp_path / f"{kind}.pth"
    torch.save(_official_file(kind, backbone, gen), path)

    teacher = build_teacher(TEACHER_OF[kind], checkpoint=path, model_kwargs=NARROW)
    for key, value in teacher.vit.state_dict().items():
        assert torch.equal(value, backbone[key]), key
    images = torch.randn(1, 3, 224, 224, generator=gen)
    ref = _timm_model(backbone, NARROW).forward_features(images)
    out = teacher.forward_full(images)
    torch.testing.assert_close(out["cls"], ref[:, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out["patch"], ref[:, 1:], rtol=0, atol=1e-6)
    assert teacher.digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert teacher.source == str(path) and teacher.untrained is False
    assert argparse.Namespace not in torch.serialization.get_safe_globals(), "allow-list leaked"


def test_real_vit_b16_mae_file_gives_timm_tokens_on_visible_patches(tmp_path):
    gen = torch.Generator().manual_seed(7)
    backbone = _backbone(gen, model_kwargs=None)
    extra = _random_like({"mask_token": (1, 1, 512), "decoder_embed.weight": (512, 768),
                          "decoder_pos_embed": (1, 197, 512), "decoder_pred.weight": (768, 512)}, gen)
    path = tmp_path / "mae_pretrain_vit_base.pth"
    torch.save({"model": {**backbone, **extra}, "args": argparse.Namespace(mask_ratio=0.75)}, path)

    teacher = build_teacher("mae", checkpoint=path)
    assert teacher.embed_dim == 768 and teacher.num_patches == 196
    images = torch.randn(1, 3, 224, 224, generator=gen)
    visible = torch.randperm(196, generator=gen)[:98].sort().values[None]
    out = teacher(images, visible)
    allowed = torch.zeros(1, 1, 197, 197, dtype=torch.bool)
    allowed[..., 0] = True
    allowed[..., visible[0] + 1] = True
    ref = _timm_model(backbone, None).forward_features(images, attn_mask=allowed)
    assert out["patch"].shape == (1, 98, 768) and torch.equal(out["index"], visible)
    torch.testing.assert_close(out["cls"], ref[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["patch"], ref[:, visible[0] + 1], rtol=1e-5, atol=1e-5)


def test_file_of_another_kind_fails_naming_missing_and_unexpected_keys(tmp_path):
    gen = torch.Generator().manual_seed(1)
    mae = tmp_path / "mae_pretrain_vit_base.pth"
    torch.save(_official_file("mae", _backbone(gen), gen), mae)
    with pytest.raises(CheckpointError) as err:
        load_official_state_dict("mocov3", mae, model_kwargs=NARROW)
    msg = str(err.value)
    assert str(mae) in msg and "mocov3" in msg
    assert "150 missing keys (cls_token, pos_embed," in msg
    assert "unexpected keys (" in msg and "model" in msg and "'state_dict'" in msg

    # A DINO backbone whose keys have a prefix nobody strips: both lists are named.
    dino = tmp_path / "renamed.pth"
    torch.save({f"encoder.{k}": v for k, v in _backbone(gen).items()}, dino)
    with pytest.raises(CheckpointError, match=r"150 missing keys .*150 unexpected keys \(encoder\."):
        load_official_state_dict("dino", dino, model_kwargs=NARROW)


def test_checkpoint_of_another_width_fails_naming_shapes(tmp_path):
    gen = torch.Generator().manual_seed(2)
    path = tmp_path / "dino_vitsmall.pth"
    torch.save(_official_file("dino", _backbone(gen), gen), path)
    with pytest.raises(CheckpointError, match=r"150 keys with other shapes .*cls_token: file "
                                              r"\(1, 1, 32\) vs model \(1, 1, 768\)"):
        build_teacher("dino", checkpoint=path)


def test_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path, code_running_object):
    runs_code, marker = code_running_object
    path = tmp_path / "evil.pth"
    torch.save({"model": runs_code, "epoch": 1}, path)
    with pytest.raises(CheckpointError, match=r"refusing to load .*evil\.pth"):
        build_teacher("mae", checkpoint=path, model_kwargs=NARROW)
    with pytest.raises(CheckpointError, match="refusing"):
        safe_load(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file really is malicious:
    assert marker.read_text() == "code ran"


def test_namespace_is_allowed_only_inside_the_load(tmp_path):
    path = tmp_path / "args.pth"
    torch.save({"args": argparse.Namespace(lr=0.1)}, path)
    assert safe_load(path)["args"].lr == 0.1
    with pytest.raises(Exception, match="Namespace"):
        torch.load(path, weights_only=True)


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(socket, "create_connection", refuse)


def test_without_network_build_fails_fast_naming_file_and_url(tmp_path, monkeypatch):
    _no_network(monkeypatch)
    for name, spec in TEACHERS.items():
        start = time.monotonic()
        with pytest.raises(CheckpointUnavailableError) as err:
            build_teacher(name, cache_dir=tmp_path)
        assert time.monotonic() - start < 3.0
        msg = str(err.value)
        assert spec.filename in msg and spec.url in msg
        assert str(tmp_path / name / spec.filename) in msg
    assert TEACHERS["dino"].url.startswith("https://dl.fbaipublicfiles.com/dino/")
    assert spec.url.startswith("https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/")
    assert not any(tmp_path.iterdir()), "a failed fetch left files behind"


def test_fetch_from_a_server_that_never_answers_times_out(tmp_path, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as server:  # accepts connections (backlog) but never replies
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        url = f"http://127.0.0.1:{server.getsockname()[1]}/dino_vitbase16_pretrain.pth"
        start = time.monotonic()
        with pytest.raises(CheckpointUnavailableError, match="dino_vitbase16_pretrain.pth"):
            fetch_official("dino", cache_dir=tmp_path, timeout_s=0.5, url=url)
        assert time.monotonic() - start < 3.0


def test_official_file_in_the_cache_is_used_without_network(tmp_path, monkeypatch):
    _no_network(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    backbone = _backbone(gen)
    dest = cached_path("dino", tmp_path)
    dest.parent.mkdir(parents=True)
    torch.save(backbone, dest)
    teacher = build_teacher("dino", cache_dir=tmp_path, model_kwargs=NARROW)
    assert teacher.source == str(dest)
    assert torch.equal(teacher.vit.pos_embed, backbone["pos_embed"])


_CHILD = """
from teachers.vit import build_teacher
print(build_teacher("ibot", random_init=True, seed=5, model_kwargs=dict(embed_dim=32, num_heads=2)).digest)
"""


def test_random_init_is_identical_across_processes_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    teacher = build_teacher("ibot", random_init=True, seed=5, model_kwargs=NARROW)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])
    assert teacher.untrained is True and teacher.source == "random-init"

    child = subprocess.run([sys.executable, "-c", _CHILD], cwd=REPO, capture_output=True,
                           text=True, timeout=120, check=True)
    assert child.stdout.strip().splitlines()[-1] == teacher.digest

    other_seed = build_teacher("ibot", random_init=True, seed=6, model_kwargs=NARROW)
    other_name = build_teacher("mae", random_init=True, seed=5, model_kwargs=NARROW)
    assert len({teacher.digest, other_seed.digest, other_name.digest}) == 3
    assert not torch.equal(teacher.vit.pos_embed, other_name.vit.pos_embed)


def test_unknown_teacher_and_conflicting_options_fail_clearly(tmp_path):
    with pytest.raises(KeyError, match="unknown teacher 'beit'.*mae, mocov3, ibot, dino"):
        build_teacher("beit", random_init=True)
    with pytest.raises(ValueError, match="either checkpoint= or random_init=True"):
        build_teacher("mae", checkpoint=tmp_path / "x.pth", random_init=True)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_teacher("mae", checkpoint=tmp_path / "missing.pth")
