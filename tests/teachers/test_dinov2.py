"""DINOv2 teachers (B/14, L/14, with and without registers): the official files convert exactly
(tokens moved to timm's layout, position embedding resampled from 518 px's 37 x 37 to the grid
rule's 14 x 14), foreign and code-running files are refused, and the masked forward is timm's
forward on the 196 px resize of the 224 px view with the registers run and dropped.

The files are built here with the official key layout (random tensors of the official shapes:
DinoVisionTransformer at 518 px, ``mask_token``, ``register_tokens`` in reg4 files); two blocks
instead of 12 / 24 keep a ViT-L cheap on the CPU, the key layout is otherwise the real one.
"""
from __future__ import annotations

import pathlib

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from teachers.checkpoints import (
    TEACHERS,
    CheckpointError,
    expected_keys,
    load_official_state_dict,
)
from teachers.vit import build_teacher
from teachers.descriptors import DESCRIPTORS, descriptor

DINOV2 = [n for n in DESCRIPTORS if n.startswith("dinov2")]
DEPTH2 = {"depth": 2}
OFFICIAL_GRID = 37                       # 518 px / 14: the resolution DINOv2 was trained at


def _official_state(name: str, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors with the official DINOv2 file's keys and shapes (2 blocks)."""
    plain_arch = descriptor(name).arch.replace("_reg4", "")       # official keys = plain timm + extras
    shapes = dict(expected_keys(plain_arch, {"img_size": 14 * OFFICIAL_GRID, **DEPTH2}))
    width = shapes["cls_token"][-1]
    assert shapes["pos_embed"] == (1, 1 + OFFICIAL_GRID ** 2, width)
    shapes["mask_token"] = (1, width)
    if descriptor(name).registers:
        shapes["register_tokens"] = (1, 4, width)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        t = torch.randn(tuple(shape), generator=gen).mul_(0.02)
        if key.endswith(("norm1.weight", "norm2.weight", "norm.weight", ".gamma")):
            t.add_(1.0)               # LayerNorm weights and LayerScale near 1: the blocks matter
        out[key] = t
    return out


def _expected_conversion(name: str, official: dict) -> dict[str, torch.Tensor]:
    """The mapping in docs/teachers.md ("Key layouts and conversion"), written out."""
    out = {k: v for k, v in official.items() if k not in ("mask_token", "register_tokens")}
    if descriptor(name).registers:
        out["reg_token"] = official["register_tokens"]
        out["cls_token"] = official["cls_token"] + official["pos_embed"][:, 0]
        out["pos_embed"] = resample_abs_pos_embed(official["pos_embed"][:, 1:], [14, 14], num_prefix_tokens=0)
    else:
        out["pos_embed"] = resample_abs_pos_embed(official["pos_embed"], [14, 14], num_prefix_tokens=1)
    return out


@pytest.fixture(scope="module")
def official_files(tmp_path_factory) -> dict[str, tuple[pathlib.Path, dict]]:
    """name -> (path of its official-layout file, the tensors written there)."""
    folder = tmp_path_factory.mktemp("dinov2")
    files = {}
    for seed, name in enumerate(DINOV2):
        state = _official_state(name, seed)
        path = folder / TEACHERS[name].filename
        torch.save(state, path)
        files[name] = path, state
    return files


@pytest.fixture(scope="module")
def loaded(official_files) -> dict:
    """name -> the teacher built strictly from its official-layout file."""
    return {name: build_teacher(name, checkpoint=path, model_kwargs=DEPTH2)
            for name, (path, _) in official_files.items()}


def test_every_descriptor_has_one_converter_in_descriptor_order():
    assert list(TEACHERS) == list(DESCRIPTORS)
    for name in DINOV2:
        spec = TEACHERS[name]
        stem = "dinov2_vitb14" if "_b14" in name else "dinov2_vitl14"
        reg = "_reg4" if name.endswith("_reg4") else ""
        assert spec.filename == f"{stem}{reg}_pretrain.pth"
        assert spec.url == f"https://dl.fbaipublicfiles.com/dinov2/{stem}/{spec.filename}"


@pytest.mark.parametrize("name", DINOV2)
def test_official_file_converts_exactly_by_the_mapping_and_loads_strictly(name, official_files, loaded):
    path, official = official_files[name]
    converted = load_official_state_dict(name, path, model_kwargs=DEPTH2)
    expected = _expected_conversion(name, official)
    assert list(converted) == list(expected_keys(name=name, model_kwargs=DEPTH2))
    assert set(converted) == set(expected)
    for key, value in converted.items():
        assert value.dtype == torch.float32 and torch.equal(value, expected[key]), key
    width = descriptor(name).width
    assert converted["pos_embed"].shape == ((1, 196, width) if descriptor(name).registers else (1, 197, width))

    teacher = loaded[name]
    assert all(torch.equal(v, expected[k]) for k, v in teacher.vit.state_dict().items())
    assert (teacher.embed_dim, teacher.num_patches, teacher.img_size) == (width, 196, (196, 196))
    assert teacher.untrained is False and teacher.source == str(path)


def test_resample_keeps_the_cls_entry_out_of_the_grid_and_a_constant_grid_constant(official_files):
    path, official = official_files["dinov2_b14"]
    plain = load_official_state_dict("dinov2_b14", path, model_kwargs=DEPTH2)
    assert torch.equal(plain["pos_embed"][:, 0], official["pos_embed"][:, 0])
    assert torch.equal(plain["cls_token"], official["cls_token"])
    _, official = official_files["dinov2_b14_reg4"]
    flat = dict(official, pos_embed=torch.full_like(official["pos_embed"], 0.5))
    flat["pos_embed"][:, 0] = 2.0                   # the CLS entry: onto cls_token, not into the grid
    converted, where = TEACHERS["dinov2_b14_reg4"].convert(flat)
    assert where == "the file's top level" and converted["pos_embed"].shape == (1, 196, 768)
    torch.testing.assert_close(converted["pos_embed"], torch.full((1, 196, 768), 0.5), rtol=0, atol=1e-6)
    assert torch.equal(converted["cls_token"], official["cls_token"] + 2.0)


@pytest.mark.parametrize("change, key", [("drop", "blocks.1.ls2.gamma"), ("add", "head.weight"),
                                         ("drop", "register_tokens")])
def test_file_with_a_missing_or_extra_key_is_refused_in_one_line_naming_it(change, key, official_files, tmp_path):
    _, official = official_files["dinov2_b14_reg4"]
    state = dict(official)
    if change == "drop":
        del state[key]
    else:
        state[key] = torch.zeros(3, 768)
    path = tmp_path / "dinov2_vitb14_reg4_pretrain.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        build_teacher("dinov2_b14_reg4", checkpoint=path, model_kwargs=DEPTH2)
    msg = str(err.value)
    named = "reg_token" if key == "register_tokens" else key   # the timm name of what is missing
    assert "\n" not in msg and str(path) in msg and named in msg
    assert ("1 missing keys" if change == "drop" else "1 unexpected keys") in msg


def test_file_with_registers_for_a_plain_teacher_and_the_reverse_are_refused(official_files):
    reg_path, _ = official_files["dinov2_l14_reg4"]
    with pytest.raises(CheckpointError, match=r"0 missing keys .*1 unexpected keys \(register_tokens\)"):
        load_official_state_dict("dinov2_l14", reg_path, model_kwargs=DEPTH2)
    plain_path, _ = official_files["dinov2_l14"]
    with pytest.raises(CheckpointError, match=r"1 missing keys \(reg_token\); 0 unexpected keys"):
        load_official_state_dict("dinov2_l14_reg4", plain_path, model_kwargs=DEPTH2)


def test_pickle_that_would_run_code_is_refused_before_it_runs(tmp_path, code_running_object):
    runs_code, marker = code_running_object
    path = tmp_path / "dinov2_vitl14_reg4_pretrain.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 1024), "pos_embed": runs_code}, path)
    with pytest.raises(CheckpointError, match=r"refusing to load .*dinov2_vitl14_reg4_pretrain\.pth"):
        build_teacher("dinov2_l14_reg4", checkpoint=path, model_kwargs=DEPTH2)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file really runs code
    assert marker.read_text() == "code ran"


def _images(seed: int, size: int = 224, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["dinov2_b14", "dinov2_b14_reg4"])
def test_all_visible_masked_forward_equals_forward_full(name, loaded):
    teacher, images = loaded[name], _images(1)
    every = teacher(images, torch.arange(196).expand(2, -1))
    full = teacher.forward_full(images)
    assert torch.equal(every["index"], full["index"])
    torch.testing.assert_close(every["cls"], full["cls"], rtol=0, atol=1e-6)
    torch.testing.assert_close(every["patch"], full["patch"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", DINOV2)
def test_forward_at_196_px_is_timm_forward_features_without_its_registers(name, loaded):
    teacher, images = loaded[name], _images(2, size=196)
    skip = 1 + descriptor(name).registers            # timm's order: CLS, registers, patches
    with torch.no_grad():
        ref = teacher.vit.forward_features(images)
    assert ref.shape[1] == skip + 196
    full = teacher.forward_full(images)
    width = descriptor(name).width
    assert full["cls"].shape == (2, width) and full["patch"].shape == (2, 196, width)
    torch.testing.assert_close(full["cls"], ref[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full["patch"], ref[:, skip:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["dinov2_b14", "dinov2_l14_reg4"])
def test_masked_forward_is_timm_forward_with_attention_restricted_to_cls_registers_and_visible(name, loaded):
    teacher, images = loaded[name], _images(3, size=196, batch=1)
    visible = torch.randperm(196, generator=torch.Generator().manual_seed(3))[:137].sort().values[None]
    skip = 1 + descriptor(name).registers
    allowed = torch.zeros(1, 1, skip + 196, skip + 196, dtype=torch.bool)
    allowed[..., :skip] = True
    allowed[..., visible[0] + skip] = True
    with torch.no_grad():
        ref = teacher.vit.forward_features(images, attn_mask=allowed)
    out = teacher(images, visible)
    assert out["patch"].shape == (1, 137, descriptor(name).width) and torch.equal(out["index"], visible)
    torch.testing.assert_close(out["cls"], ref[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["patch"], ref[:, visible[0] + skip], rtol=1e-5, atol=1e-5)


def test_224_px_view_gives_the_tokens_of_its_antialiased_196_px_resize(loaded):
    teacher, views = loaded["dinov2_l14_reg4"], _images(4)
    visible = torch.arange(0, 196, 3).expand(2, -1)
    resized = F.interpolate(views, size=(196, 196), mode="bilinear", antialias=True, align_corners=False)
    a, b = teacher(views, visible), teacher(resized, visible)
    assert torch.equal(a["cls"], b["cls"]) and torch.equal(a["patch"], b["patch"])
    nearest = teacher(F.interpolate(views, size=(196, 196), mode="nearest"), visible)
    assert not torch.allclose(nearest["patch"], a["patch"], atol=1e-3)   # the resize is the one named


def test_registers_run_in_the_forward_and_are_dropped_from_the_output(loaded, monkeypatch):
    teacher = loaded["dinov2_l14_reg4"]
    images, visible = _images(5, batch=1), torch.arange(0, 196, 4)[None]
    lengths = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        lengths.append(args[0].shape[2])
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    out = teacher(images, visible)
    assert lengths == [1 + 4 + 49] * 2                    # CLS + 4 registers + visible, every block
    assert out["cls"].shape == (1, 1024) and out["patch"].shape == (1, 49, 1024)
    saved = teacher.vit.reg_token.clone()
    try:
        teacher.vit.reg_token.zero_()
        assert not torch.allclose(teacher(images, visible)["patch"], out["patch"], atol=1e-4)
    finally:
        teacher.vit.reg_token.copy_(saved)


def test_images_of_another_size_fail_naming_both_accepted_sizes(loaded):
    with pytest.raises(ValueError, match=r"images must be \(B, 3, 224, 224\) or \(B, 3, 196, 196\), "
                                         r"got \(1, 3, 192, 192\)"):
        loaded["dinov2_b14"](torch.zeros(1, 3, 192, 192), torch.arange(4)[None])


def test_registers_with_an_embedded_class_run_as_timms_own_forward():
    # timm's layout: the position embedding covers CLS, the registers and the patches
    teacher = build_teacher("dinov2_b14_reg4", random_init=True, model_kwargs={"depth": 1, "no_embed_class": False})
    images = _images(2, batch=1)
    reference = teacher.vit.forward_features(F.interpolate(images, size=(196, 196), mode="bilinear",
                                                           antialias=True, align_corners=False))
    full = teacher.forward_full(images)
    torch.testing.assert_close(full["cls"], reference[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full["patch"], reference[:, 5:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", DINOV2)
def test_random_init_builds_each_dinov2_teacher_deterministically(name):
    a = build_teacher(name, random_init=True, seed=3, model_kwargs=DEPTH2)
    b = build_teacher(name, random_init=True, seed=3, model_kwargs=DEPTH2)
    c = build_teacher(name, random_init=True, seed=4, model_kwargs=DEPTH2)
    assert a.digest == b.digest != c.digest
    sa, sb = a.vit.state_dict(), b.vit.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    d = descriptor(name)
    assert (a.embed_dim, a.num_patches, a.img_size) == (d.width, 196, (196, 196))
    gammas = [m.gamma for m in a.vit.modules() if hasattr(m, "gamma")]   # timm's ViT LayerScale
    assert len(gammas) == 4 and all(torch.equal(g, torch.full_like(g, 1e-5)) for g in gammas)
    if d.registers:
        assert a.vit.reg_token.shape == (1, 4, d.width) and 0 < a.vit.reg_token.abs().max() < 1e-5
    assert all(torch.isfinite(t).all() for t in sa.values())
    out = a(_images(6, batch=1), torch.arange(0, 196, 2)[None])
    assert out["patch"].shape == (1, 98, d.width) and torch.isfinite(out["patch"]).all()
