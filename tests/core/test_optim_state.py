"""core/optim.py and core/state.py: schedules by step, parameter groups, strict loading."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from core.optim import lr_at, lr_schedule, param_groups
from core.state import load_strict, read_state_dict


def test_cosine_schedule_warms_up_peaks_and_ends_at_min_lr():
    lrs = lr_schedule(total_steps=100, warmup_steps=10, peak=1.0, min_lr=0.1)
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert np.all(np.diff(lrs[10:]) <= 0) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert [lr_at(s, total_steps=100, warmup_steps=10, peak=1.0, min_lr=0.1) for s in range(100)] \
        == pytest.approx(lrs.tolist(), rel=1e-12)
    assert np.all(lr_schedule(total_steps=20, warmup_steps=4, peak=2.0, kind="constant")[4:] == 2.0)


def test_mae_schedule_with_fractional_warmup_epochs_starts_at_zero():
    spe, epochs, warm = 7, 5, 1.5                       # MAE: lr = base * epoch / warmup_epochs, then cosine
    for step in range(spe * epochs):
        epoch = step / spe
        want = 0.5 * epoch / warm if epoch < warm else \
            0.5 * 0.5 * (1 + math.cos(math.pi * (epoch - warm) / (epochs - warm)))
        got = lr_at(step, total_steps=spe * epochs, warmup_steps=warm * spe, peak=0.5, warmup_offset=0)
        assert got == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_param_groups_leave_biases_norms_and_tokens_undecayed():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.norm = nn.Linear(4, 4), nn.LayerNorm(4)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
            self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)
    net = Net()
    decay, no_decay = param_groups(net, weight_decay=0.05)
    assert decay["weight_decay"] == 0.05 and [p is net.fc.weight for p in decay["params"]] == [True]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0
    decay, no_decay = param_groups(net, weight_decay=0.05, decay_1d=True)
    assert len(decay["params"]) == 5 and no_decay["params"] == []


def test_layer_decay_groups_scale_the_lr_by_depth():
    import timm
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2, img_size=32)
    groups = param_groups(vit, weight_decay=0.05, layer_decay=0.5)
    names = {id(p): n for n, p in vit.named_parameters()}
    scale = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert scale["blocks.1.attn.qkv.weight"] == 1.0 and scale["blocks.0.attn.qkv.weight"] == 0.5
    assert scale["patch_embed.proj.weight"] == 0.25 and scale["cls_token"] == 0.25
    assert sum(len(g["params"]) for g in groups) == len(list(vit.parameters()))
    assert all(g["weight_decay"] == 0.0 for g in groups if any(p.ndim <= 1 for p in g["params"]))


def test_strict_loading_names_missing_unexpected_and_misshaped_keys_in_one_line(tmp_path):
    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["extra.weight"] = state.pop("1.bias")
    state["0.weight"] = torch.zeros(5, 2)
    with pytest.raises(ValueError) as e:
        load_strict(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)), state, what="checkpoint c.pt")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("checkpoint c.pt: ")
    assert "missing keys (1): 1.bias" in msg and "unexpected keys (1): extra.weight" in msg
    assert "shape mismatches (1): 0.weight: checkpoint (5, 2) vs model (3, 2)" in msg
    torch.save({"model": {"module." + k: v for k, v in net.state_dict().items()}}, tmp_path / "ddp.pt")
    other = load_strict(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)), read_state_dict(tmp_path / "ddp.pt"),
                        what="ddp.pt")
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), net.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="student checkpoint .*nope.pt: no such file"):
        read_state_dict(tmp_path / "nope.pt", what="student checkpoint")
