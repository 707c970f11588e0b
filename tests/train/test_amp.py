"""Mixed precision (core/precision.py): fp16 autocast with a gradient scaler trains on the CPU
with its loss parts in float32 where bf16 keeps them so, a resumed fp16 run repeats the losses
and restores the scaler, train.amp refuses other settings, and a teacher runs under amp="fp16"."""
import json
from pathlib import Path

import pytest
import torch

from core.precision import amp_dtype, autocast_dtype, grad_scaler
from train.config import load_config
from train.learner import make_optimizer, train_step
from train.loop import train
from train.objective import build_objective

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the tiny objective of tests/train/test_objective.py: width 48, 2 + 2 blocks, teacher width 64
TINY = ["model.embed_dim=48", "model.depth=2", "model.num_heads=3", "decoder.width=48", "decoder.num_heads=3",
        "adapters.in_dim=64", "adapters.init=random", "adapters.mode=trainable", "optim.base_lr=1e-2",
        "schedule.warmup_epochs=0"]
N_K = {"mae": 98, "mocov3": 118, "ibot": 137}
SMALL = TINY[:5]                 # the student and decoder only (the store gives the adapters)


def _batch(seed=0, b=2, c=64):
    g = torch.Generator().manual_seed(seed)

    def ascending(n):
        return torch.stack([torch.sort(torch.randperm(196, generator=g)[:n])[0] for _ in range(b)])
    teachers = {n: {"cls": torch.randn(b, c, generator=g).half(), "patch": torch.randn(b, k, c, generator=g).half(),
                    "index": ascending(k)} for n, k in N_K.items()}
    return {"images": torch.randn(b, 3, 224, 224, generator=g), "student_visible": ascending(49),
            "teachers": teachers}


def _objective():
    torch.manual_seed(0)
    cfg = load_config(overrides=TINY)
    objective = build_objective(cfg)
    return objective, make_optimizer(cfg, objective)


def _grad_norm(objective) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in objective.trainable.parameters()
                                                       if p.grad is not None])))


def test_fp16_autocast_with_a_grad_scaler_trains_on_the_cpu_and_keeps_the_loss_parts_float32_as_bf16_does():
    batch = _batch()
    objective, opt = _objective()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = objective(batch)
    float32_in_bf16 = {k for k, v in bf16.items() if v.dtype == torch.float32}
    assert {"loss", "loss_token", "loss_spatial", "loss_recon"} <= float32_in_bf16

    scaler = grad_scaler(torch.float16, "cpu")
    assert isinstance(scaler, torch.amp.GradScaler) and grad_scaler(torch.bfloat16, "cpu") is None
    seen = []
    hook = objective.student.vit.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    losses = []
    for _ in range(6):
        parts = train_step(objective, opt, batch, lr=1e-2, clip_grad=0.05, amp=torch.float16, scaler=scaler)
        assert {k for k, v in parts.items() if v.dtype == torch.float32} >= float32_in_bf16
        # unscaled before clipping: the stored gradients have the clipped norm, not 1/scale of it
        assert _grad_norm(objective) == pytest.approx(0.05, rel=1e-2)
        losses.append(float(parts["loss"].detach()))
    hook.remove()
    assert seen == [torch.float16] * 6                 # autocast really ran the matmuls in fp16
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
    assert scaler.get_scale() == 65536.0               # no overflow: no step skipped


def test_a_step_whose_fp16_gradients_overflow_is_skipped_and_the_scale_halves():
    batch = _batch(seed=1)
    objective, opt = _objective()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 120)    # scaled gradients overflow
    before = [p.detach().clone() for p in objective.trainable.parameters()]
    parts = train_step(objective, opt, batch, lr=1e-2, clip_grad=0.0, amp=torch.float16, scaler=scaler)
    assert torch.isfinite(parts["loss"])
    assert all(torch.equal(a, p) for a, p in zip(before, objective.trainable.parameters()))
    assert scaler.get_scale() == 2.0 ** 119
    train_step(objective, opt, batch, lr=1e-2, clip_grad=0.0, amp=torch.float16,
               scaler=torch.amp.GradScaler("cpu"))
    assert not all(torch.equal(a, p) for a, p in zip(before, objective.trainable.parameters()))


def _losses(run):
    return [json.loads(ln)["loss"] for ln in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_fp16_run_killed_after_a_checkpoint_resumes_to_the_same_losses_with_its_scaler_state(
        prepared_data, teacher_store, tmp_path, arm_crash, monkeypatch):
    """The CPU runs fp32 whatever train.amp says; here it honours fp16 (autocast and scaler), and
    the scaler doubles its scale every step, so a resume that started a fresh scaler would end
    with another scale in its checkpoint."""
    import train.learner as learner
    monkeypatch.setattr(learner, "autocast_dtype", lambda amp, device: amp_dtype(amp))
    monkeypatch.setattr(learner, "grad_scaler", lambda dtype, device: torch.amp.GradScaler(
        "cpu", init_scale=2.0 ** 8, growth_interval=1) if dtype == torch.float16 else None)
    cfg = load_config(None, [f"data.images={prepared_data}", f"data.store={teacher_store}", "data.views=2",
                             "data.shuffle_window=2", "data.decoder=pil", "data.num_workers=1", "data.streams=2",
                             "data.teachers=[mae]", "train.batch_size=4", "train.log_every=1", "schedule.epochs=4",
                             "schedule.warmup_epochs=1", "train.amp=fp16", "train.clip_grad=1.0", *SMALL])
    ref, run = tmp_path / "ref", tmp_path / "run"
    train(cfg, out_dir=ref, max_steps=3, ckpt_steps=1, progress=False)
    with pytest.raises(arm_crash(monkeypatch, 2)):
        train(cfg, out_dir=run, max_steps=3, ckpt_steps=1, progress=False)
    assert torch.load(run / "last.pt", weights_only=False)["scaler"]["scale"] == 2.0 ** 10
    train(cfg, out_dir=run, max_steps=3, ckpt_steps=1, resume=True, progress=False)
    assert len(_losses(ref)) == 3 and _losses(run) == _losses(ref)
    ends = [torch.load(r / "last.pt", weights_only=False)["scaler"] for r in (ref, run)]
    assert ends[0] == ends[1] and ends[0]["scale"] == 2.0 ** 11


def test_train_amp_takes_bf16_fp16_or_none_and_refuses_fp8_in_one_line():
    for amp in ("bf16", "fp16", "none"):
        assert load_config(overrides=[f"train.amp={amp}"]).train.amp == amp
    with pytest.raises(ValueError) as refused:
        load_config(overrides=["train.amp=fp8"])
    assert str(refused.value) == "config train.amp='fp8' is not one of ['bf16', 'fp16', 'none']"
    assert autocast_dtype("fp16", "cpu") is None and autocast_dtype("none", "cpu") is None   # the CPU runs fp32
    assert amp_dtype("fp16") == torch.float16 and amp_dtype("bf16") == torch.bfloat16 and amp_dtype("none") is None


def test_a_teacher_under_amp_fp16_runs_its_matmuls_in_fp16_on_the_cpu_and_returns_float32(tiny_teacher):
    teacher = tiny_teacher("mae")
    fp32 = teacher.set_amp(None)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 224, 224, generator=g)
    visible = torch.stack([torch.sort(torch.randperm(196, generator=g)[:98])[0] for _ in range(2)])
    ref = fp32(images, visible)
    assert fp32.amp_dtype is None and not fp32.amp
    seen = []
    hook = teacher.vit.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        half = teacher.set_amp("fp16")
        assert half.amp_dtype == torch.float16 and half.amp
        with torch.autocast("cpu", dtype=torch.bfloat16):           # the teacher's setting wins
            out = half(images, visible)
    finally:
        hook.remove()
        teacher.set_amp(None)
    assert seen == [torch.float16]
    for key in ("cls", "patch"):
        assert out[key].dtype == torch.float32 and torch.isfinite(out[key]).all()
        torch.testing.assert_close(out[key], ref[key], rtol=0, atol=0.05)
    assert torch.equal(out["index"], visible)
    assert teacher.set_amp(True).amp_dtype == torch.bfloat16 and teacher.set_amp(False).amp_dtype is None
    teacher.set_amp(None)
    with pytest.raises(ValueError, match="teacher mae: amp='fp8'"):
        teacher.set_amp("fp8")


def test_eval_training_steps_under_fp16_take_a_scaler_restored_from_the_checkpoint():
    """eval/dense_train.py (detection, segmentation): the scaler a resumed run continues with is
    its checkpoint's; a step through it is taken and grows the scale."""
    from types import SimpleNamespace

    from eval.dense_train import backward_step, scaler_for
    saved = {"scale": 8.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 1, "_growth_tracker": 0}
    run = SimpleNamespace(resumed=True, state={"scaler": saved})
    assert scaler_for(run, torch.bfloat16, "cpu") is None and scaler_for(run, None, "cpu") is None
    assert scaler_for(SimpleNamespace(resumed=False, state=None), torch.float16, "cpu").get_scale() == 65536.0
    scaler = scaler_for(run, torch.float16, "cpu")
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    before = model.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(torch.randn(4, 8)).float().pow(2).mean()
    backward_step(loss, opt, scaler)
    assert not torch.equal(model.weight, before) and scaler.get_scale() == 16.0
