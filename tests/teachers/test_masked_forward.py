"""The teacher's masked forward: dropping the masked tokens after the position embedding
is the same computation as timm's full forward with attention restricted to CLS + the
visible tokens, read at those positions.

A small ViT (4 blocks, 64 wide) proves the same thing as ViT-B/16 here: the code path
does not depend on width or depth (the real ViT-B/16 case is covered in
``test_checkpoints.py``).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from teachers.vit import build_teacher

SMALL = dict(embed_dim=64, num_heads=4, depth=4)


@pytest.fixture(scope="module")
def teacher():
    return build_teacher("mocov3", random_init=True, seed=1, model_kwargs=SMALL)


def _visible(gen: torch.Generator, batch: int, n: int) -> torch.Tensor:
    """(batch, n) int64: a different ascending random subset of the 196 patches per row."""
    return torch.stack([torch.randperm(196, generator=gen)[:n].sort().values for _ in range(batch)])


def _restricted_attention_reference(teacher, images, visible):
    """timm's own forward over all 197 tokens, every query attending only to CLS + visible.

    Returns (B, 197, C) after the final norm."""
    batch = images.shape[0]
    allowed = torch.zeros(batch, 1, 197, 197, dtype=torch.bool)
    allowed[:, :, :, 0] = True
    for b in range(batch):
        allowed[b, :, :, visible[b] + 1] = True
    with torch.no_grad():
        return teacher.vit.forward_features(images, attn_mask=allowed)


@pytest.mark.parametrize("n_visible", [98, 118, 137])  # mask ratios 0.50 / 0.40 / 0.30
def test_masked_forward_equals_full_forward_with_attention_restricted_to_visible(teacher, n_visible):
    gen = torch.Generator().manual_seed(n_visible)
    images = torch.randn(2, 3, 224, 224, generator=gen)
    visible = _visible(gen, 2, n_visible)
    out = teacher(images, visible)
    ref = _restricted_attention_reference(teacher, images, visible)
    at_visible = torch.gather(ref, 1, (visible + 1).unsqueeze(-1).expand(-1, -1, ref.shape[-1]))

    assert out["cls"].shape == (2, 64) and out["patch"].shape == (2, n_visible, 64)
    assert out["cls"].dtype == out["patch"].dtype == torch.float32
    assert torch.equal(out["index"], visible)
    torch.testing.assert_close(out["cls"], ref[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["patch"], at_visible, rtol=1e-5, atol=1e-5)
    # The masked tokens matter: the unmasked forward gives other tokens.
    full = teacher.forward_full(images)
    assert (full["cls"] - out["cls"]).abs().max() > 1e-2


def test_forward_full_is_timm_forward_features_and_equals_all_patches_visible(teacher):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(1, 3, 224, 224, generator=gen)
    full = teacher.forward_full(images)
    with torch.no_grad():
        ref = teacher.vit.forward_features(images)
    assert torch.equal(full["index"], torch.arange(196)[None])
    torch.testing.assert_close(full["cls"], ref[:, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(full["patch"], ref[:, 1:], rtol=0, atol=1e-6)
    every = teacher(images, torch.arange(196)[None])
    torch.testing.assert_close(every["patch"], full["patch"], rtol=0, atol=1e-6)


def test_rows_are_independent_of_the_rest_of_the_batch(teacher):
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 224, 224, generator=gen)
    visible = _visible(gen, 2, 49)
    pair = teacher(images, visible)
    alone = teacher(images[1:], visible[1:])
    torch.testing.assert_close(pair["patch"][1:], alone["patch"], rtol=1e-5, atol=1e-5)


def test_attention_is_scaled_dot_product_even_if_timm_disabled_it(monkeypatch):
    import timm.layers.config as timm_config

    monkeypatch.setattr(timm_config, "_USE_FUSED_ATTN", 0)
    teacher = build_teacher("ibot", random_init=True, model_kwargs=SMALL)
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    teacher(torch.zeros(1, 3, 224, 224), torch.arange(0, 196, 4)[None])
    assert len(calls) == SMALL["depth"]
    assert calls[0] == (1, SMALL["num_heads"], 1 + 49, 16)  # (B, heads, CLS + visible, head dim)


def test_teacher_is_frozen_and_stays_in_eval_mode(teacher):
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.vit.training
    out = teacher(torch.zeros(1, 3, 224, 224), torch.arange(10)[None])
    assert out["patch"].grad_fn is None
    assert teacher.amp is False  # CPU default: fp32


def test_amp_flag_runs_the_forward_in_bf16_autocast():
    fp32 = build_teacher("dino", random_init=True, model_kwargs=SMALL)
    bf16 = build_teacher("dino", random_init=True, model_kwargs=SMALL, amp=True)
    assert bf16.digest == fp32.digest and bf16.amp is True
    gen = torch.Generator().manual_seed(5)
    images, visible = torch.randn(1, 3, 224, 224, generator=gen), _visible(gen, 1, 98)
    a, b = fp32(images, visible)["patch"], bf16(images, visible)["patch"]
    assert b.dtype == torch.float32
    assert not torch.equal(a, b)  # it really ran in bf16 ...
    torch.testing.assert_close(b, a, rtol=0.1, atol=0.1)  # ... and stayed close


@pytest.mark.parametrize("visible, error, match", [
    (torch.tensor([[5, 3, 9]]), ValueError, "strictly ascending"),
    (torch.tensor([[0, 1, 196]]), ValueError, r"\[0, 196\)"),
    (torch.tensor([[0, 1, 2]], dtype=torch.int32), TypeError, "int64"),
    (torch.tensor([[0, 1], [2, 3]]), ValueError, "B=1"),
])
def test_bad_visible_ids_fail_with_a_clear_message(teacher, visible, error, match):
    with pytest.raises(error, match=match):
        teacher(torch.zeros(1, 3, 224, 224), visible)


def test_images_of_the_wrong_size_fail_with_a_clear_message(teacher):
    with pytest.raises(ValueError, match=r"images must be \(B, 3, 224, 224\), got \(1, 3, 192, 192\)"):
        teacher(torch.zeros(1, 3, 192, 192), torch.arange(4)[None])
