"""train/losses.py: zero iff equal, the formulas by hand, invalid entries never count."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from train.losses import spatial_kl, spatial_mse, token_kl, token_mse

LOSSES = {
    "token_kl": lambda **kw: token_kl(**kw, tau=1.0),
    "spatial_kl": lambda **kw: spatial_kl(**kw, tau=4.0),
    "token_mse": token_mse,
    "spatial_mse": spatial_mse,
}


def _data(seed=0, b=2, t=12, d=8):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, t, d, generator=g)
    y = torch.randn(b, t, d, generator=g)
    valid = torch.rand(b, t, generator=g) < 0.6
    valid[:, 0] = True
    return z, y, valid


@pytest.mark.parametrize("name", LOSSES)
def test_loss_is_zero_when_student_equals_target_and_positive_otherwise(name):
    z, y, valid = _data()
    assert LOSSES[name](student=y.clone(), target=y, valid=valid).abs() < 1e-6
    assert LOSSES[name](student=z, target=y, valid=valid) > 1e-3


def test_token_kl_is_tau_squared_kl_of_softmaxes_averaged_over_valid_tokens():
    z, y, valid = _data(seed=3)
    tau = 2.0
    expected = []
    for b, t in valid.nonzero().tolist():
        p = F.softmax(y[b, t] / tau, dim=0)
        q = F.log_softmax(z[b, t] / tau, dim=0)
        expected.append(tau ** 2 * F.kl_div(q, p, reduction="sum"))
    assert torch.allclose(token_kl(student=z, target=y, valid=valid, tau=tau),
                          torch.stack(expected).mean(), atol=1e-6)


def test_spatial_kl_softmaxes_each_channel_over_the_covered_positions_only():
    z, y, valid = _data(seed=4, b=3)
    valid[2] = False                      # an image with no covered position does not count
    tau = 4.0
    expected = []
    for b in range(2):
        cov = valid[b]
        per_channel = [tau ** 2 * F.kl_div(F.log_softmax(z[b, cov, c] / tau, 0),
                                           F.softmax(y[b, cov, c] / tau, 0), reduction="sum")
                       for c in range(z.shape[-1])]
        expected.append(torch.stack(per_channel).mean())
    got = spatial_kl(student=z, target=y, valid=valid, tau=tau)
    assert torch.allclose(got, torch.stack(expected).mean(), atol=1e-6)


@pytest.mark.parametrize("name", LOSSES)
def test_positions_without_target_change_neither_loss_nor_gradient(name):
    z, y, valid = _data(seed=5)
    z = z.requires_grad_()
    base = LOSSES[name](student=z, target=y, valid=valid)
    base.backward()
    assert torch.all(z.grad[~valid] == 0) and z.grad[valid].abs().sum() > 0
    inv = ~valid.unsqueeze(-1)
    z2 = torch.where(inv, torch.full_like(z, float("nan")), z.detach()).requires_grad_()
    y2 = torch.where(inv, 1e4 * torch.randn_like(y), y)
    other = LOSSES[name](student=z2, target=y2, valid=valid)
    assert torch.allclose(base, other, atol=1e-6)
    other.backward()
    assert torch.isfinite(z2.grad).all() and torch.allclose(z.grad, z2.grad, atol=1e-6)


def test_all_invalid_gives_zero_not_nan():
    z, y, valid = _data()
    none = torch.zeros_like(valid)
    for name, fn in LOSSES.items():
        assert fn(student=z, target=y, valid=none) == 0, name


def test_loss_in_half_precision_inputs_is_computed_in_float32():
    z, y, valid = _data(seed=6)
    full = token_kl(student=z, target=y, valid=valid)
    half = token_kl(student=z.bfloat16(), target=y.bfloat16(), valid=valid)
    assert half.dtype == torch.float32 and torch.allclose(full, half, rtol=0.05)


def test_mismatched_shapes_are_refused():
    z, y, valid = _data()
    with pytest.raises(ValueError, match="shapes disagree"):
        token_kl(student=z, target=y[:, :-1], valid=valid)
    with pytest.raises(ValueError, match="bool"):
        spatial_kl(student=z, target=y, valid=valid.float())
