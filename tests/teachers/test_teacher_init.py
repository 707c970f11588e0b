"""teachers/vit.py random init: timm's ViT initialisation law (drawn fast, on the meta
device then filled), every tensor set, deterministic per (name, seed), and a module it has no
rule for refused by name."""
import pytest
import torch
from torch import nn

from teachers.vit import _random_vit, build_teacher

NARROW = dict(embed_dim=64, num_heads=2, depth=2)


def test_random_init_follows_timms_vit_law():
    vit = build_teacher("mae", random_init=True, seed=0, model_kwargs=NARROW).vit
    linears = [m for m in vit.modules() if isinstance(m, nn.Linear)]
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert weights.std().item() == pytest.approx(0.02, rel=0.03) and abs(weights.mean().item()) < 1e-3
    assert all(m.bias is None or not m.bias.any() for m in linears)
    assert vit.pos_embed.std().item() == pytest.approx(0.02, rel=0.05)
    assert 0 < vit.cls_token.abs().max().item() < 1e-5
    norms = [m for m in vit.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any() for m in norms)
    conv = vit.patch_embed.proj            # nn.Conv2d's own init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = (3 * 16 * 16) ** -0.5
    assert conv.weight.abs().max().item() <= bound and conv.weight.std().item() > bound / 3
    assert all(torch.isfinite(t).all() for t in vit.state_dict().values())


def test_random_init_repeats_per_name_and_seed():
    a = build_teacher("ibot", random_init=True, seed=3, model_kwargs=NARROW).vit.state_dict()
    b = build_teacher("ibot", random_init=True, seed=3, model_kwargs=NARROW).vit.state_dict()
    c = build_teacher("ibot", random_init=True, seed=4, model_kwargs=NARROW).vit.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"])


def test_a_tensor_without_an_init_rule_is_refused_by_name(monkeypatch):
    import teachers.vit as teachers

    real = teachers._create

    def with_extra(arch, model_kwargs):
        vit = real(arch, model_kwargs)
        vit.extra_scale = nn.Parameter(torch.ones(3))
        return vit

    monkeypatch.setattr(teachers, "_create", with_extra)
    with pytest.raises(ValueError, match="no initialisation for.*extra_scale"):
        _random_vit("vit_base_patch16_224", NARROW)
