"""core/optim.py against the recipe as it was written out by hand (the reference functions
below): the one schedule gives the learning rates of the train and eval schedules it replaced
(tests/eval/test_detection.py: the detection one), and timm's weight-decay grouping gives the
same groups and AdamW states as our own loop did."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from core.optim import lr_at, lr_schedule, param_groups

NO_DECAY_NAMES = ("cls_token", "pos_embed", "mask_token")


# --- the reference: the hand-written recipe, as it was ---------------------------------

def ref_schedule(*, total_steps, warmup_steps, peak, kind="cosine", min_lr=0.0, warmup_offset=1):
    s = np.arange(total_steps, dtype=np.float64)
    warm = peak * (s + warmup_offset) / max(1e-12, warmup_steps)
    t = np.clip((s - warmup_steps) / max(1e-12, total_steps - warmup_steps), 0, 1)
    after = min_lr + (peak - min_lr) * 0.5 * (1 + np.cos(math.pi * t)) if kind == "cosine" \
        else np.full_like(s, peak)
    return np.where(s < warmup_steps, warm, after)


def ref_lr_at(step, *, total_steps, warmup_steps, peak, kind="cosine", min_lr=0.0, warmup_offset=1):
    if step < warmup_steps:
        return peak * (step + warmup_offset) / max(1e-12, warmup_steps)
    if kind == "constant":
        return peak
    t = min((step - warmup_steps) / max(1e-12, total_steps - warmup_steps), 1.0)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def ref_groups(module, *, weight_decay, decay_1d=False):
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if not decay_1d and (p.ndim <= 1 or name.endswith(NO_DECAY_NAMES)):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --- schedules ----------------------------------------------------------------------------

SCHEDULES = [dict(total_steps=t, warmup_steps=w, peak=p, kind=k, min_lr=m, warmup_offset=o)
             for t, w in ((100, 10), (37, 0), (35, 10.5), (12, 12), (1, 0), (50, 7.25))
             for p, m in ((1.0, 0.1), (1.5e-4, 0.0), (0.3, 0.3))
             for k in ("cosine", "constant") for o in (0, 1)]


@pytest.mark.parametrize("kw", SCHEDULES, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_one_schedule_gives_todays_train_and_eval_learning_rates(kw):
    want = ref_schedule(**kw)
    np.testing.assert_allclose(lr_schedule(**kw), want, rtol=1e-13, atol=1e-18)
    for step in range(kw["total_steps"] + 3):                   # past the end too (eval/common.py: cosine_lr)
        assert lr_at(step, **kw) == pytest.approx(ref_lr_at(step, **kw), rel=1e-13, abs=1e-18)


# --- parameter groups -----------------------------------------------------------------------

def _modules():
    """Nets whose groups are compared: the student side of a tiny CoMAD objective (cls/pos
    tokens, the decoder's mask token, biases, norms), a timm ViT and a net with frozen parts."""
    import timm
    from train.config import load_config
    from train.objective import build_objective
    cfg = load_config(None, ["model.depth=1", "decoder.depth=1", "adapters.mode=trainable",
                             "adapters.init=random", "data.teachers=[mae,mocov3]"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        objective = build_objective(cfg, None)
        vit = timm.create_model("vit_tiny_patch16_224", num_classes=10, depth=2, img_size=32)
        frozen = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    frozen[0].weight.requires_grad_(False)
    return {"objective": objective.trainable, "vit": vit, "frozen": frozen}


@pytest.mark.parametrize("weight_decay, decay_1d", [(0.05, False), (0.05, True), (0.0, False), (0.3, False)])
def test_timm_weight_decay_groups_equal_todays_groups_and_adamw_states(weight_decay, decay_1d):
    for name, module in _modules().items():
        if name == "frozen":
            module(torch.zeros(1, 3, 5, 5))                      # materialise the lazy layer
        got = param_groups(module, weight_decay=weight_decay, decay_1d=decay_1d)
        want = ref_groups(module, weight_decay=weight_decay, decay_1d=decay_1d)
        assert [g["weight_decay"] for g in got] == [g["weight_decay"] for g in want], name
        assert [[id(p) for p in g["params"]] for g in got] == [[id(p) for p in g["params"]] for g in want], name
        states = []
        for groups in (want, got):
            params = [p for g in groups for p in g["params"]]
            start = [p.detach().clone() for p in params]
            opt = torch.optim.AdamW([dict(g) for g in groups], lr=1e-2, betas=(0.9, 0.95))
            gen = torch.Generator().manual_seed(1)
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
                opt.step()
            states.append(({k: v for k, v in opt.state_dict().items()}, [p.detach().clone() for p in params]))
            with torch.no_grad():
                for p, s in zip(params, start):
                    p.copy_(s)
                    p.grad = None
        (sa, pa), (sb, pb) = states
        assert sa["param_groups"] == sb["param_groups"], name
        assert sa["state"].keys() == sb["state"].keys()
        for k in sa["state"]:
            for field in sa["state"][k]:
                torch.testing.assert_close(sa["state"][k][field], sb["state"][k][field], rtol=0, atol=0)
        assert all(torch.equal(a, b) for a, b in zip(pa, pb)), name


# --- why the schedule is not timm's (docs/eval.md, "Optimisers and schedules") ---------------

def _timm_cosine(*, total_steps, warmup_steps, peak, min_lr):
    """timm's CosineLRScheduler stepped per update: warm-up from 0, then a cosine over the rest."""
    from timm.scheduler import CosineLRScheduler
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=peak)
    sched = CosineLRScheduler(opt, t_initial=total_steps - warmup_steps, warmup_t=warmup_steps, warmup_lr_init=0.0,
                              warmup_prefix=True, lr_min=min_lr, t_in_epochs=False)
    lrs = []
    for step in range(total_steps):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    return np.array(lrs)


@pytest.mark.parametrize("total_steps, warmup_steps, peak, min_lr", [(100, 10, 1.0, 0.1), (37, 5, 1.5e-4, 0.0),
                                                                     (50, 1, 0.3, 0.0)])
def test_timm_cosine_is_the_eval_schedule_but_not_the_train_schedule(total_steps, warmup_steps, peak, min_lr):
    """timm's warm-up starts at warmup_lr_init: MAE's zero-based warm-up (the eval protocols,
    warmup_offset 0) is timm's, the training recipe's first step at peak / warmup (offset 1) is not."""
    kw = dict(total_steps=total_steps, warmup_steps=warmup_steps, peak=peak, min_lr=min_lr)
    theirs = _timm_cosine(**kw)
    np.testing.assert_allclose(theirs, lr_schedule(**kw, warmup_offset=0), rtol=1e-12, atol=1e-18)
    ours = lr_schedule(**kw, warmup_offset=1)
    assert ours[0] == pytest.approx(peak / warmup_steps) and theirs[0] == 0.0
