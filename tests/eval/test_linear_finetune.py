"""eval/linear.py and eval/finetune.py: the optimiser pieces, both commands end to end,
resumption after a crash right after a checkpoint, and refusal to resume a different run."""
import json
import math
import random

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cli
import core.run
from eval.common import cosine_lr
from eval.config import LinearConfig
from eval.linear import LARS, probe_head, run_linear

MODEL_ARGS = ["--model-arg", "img_size=32", "--model-arg", "depth=2"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class SimulatedKill(Exception):
    pass


def _interrupt_after_first_save(monkeypatch, saves: int = 1):
    """Make the run die right after its first (or its ``saves``-th) per-epoch checkpoint is durable."""
    real, done = core.run.save_atomic, []

    def save_then_die(obj, path):
        real(obj, path)
        done.append(path)
        if len(done) == saves:
            raise SimulatedKill(f"after epoch {saves}")

    monkeypatch.setattr(core.run, "save_atomic", save_then_die)


def test_lars_scales_matrix_updates_by_trust_ratio_and_leaves_vectors_plain():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([w, b], lr=2.0, weight_decay=0.5, momentum=0.9, trust_coefficient=0.01)
    w.grad = torch.tensor([[0.5, -2.0]])
    b.grad = torch.tensor([0.25])
    opt.step()
    update = torch.tensor([[0.5, -2.0]]) + 0.5 * torch.tensor([[3.0, 4.0]])  # [[2, 0]]
    q = 0.01 * 5.0 / update.norm()
    torch.testing.assert_close(w.data, torch.tensor([[3.0, 4.0]]) - 2.0 * q * update)
    torch.testing.assert_close(b.data, torch.tensor([1.0 - 2.0 * 0.25]))  # no decay, no trust


def test_probe_head_is_batchnorm_without_affine_then_linear_and_seeded():
    head = probe_head(8, 3, seed=5)
    bn, fc = head
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert isinstance(fc, torch.nn.Linear) and fc.weight.std() < 0.03
    assert torch.equal(fc.weight, probe_head(8, 3, seed=5)[1].weight)
    assert not torch.equal(fc.weight, probe_head(8, 3, seed=6)[1].weight)


def test_cosine_lr_warms_up_linearly_then_decays_to_the_floor():
    kw = dict(steps_per_epoch=10, epochs=10, warmup_epochs=2, base_lr=1.0, min_lr=0.1)
    assert cosine_lr(0, **kw) == 0.0 and cosine_lr(10, **kw) == pytest.approx(0.5)
    assert cosine_lr(20, **kw) == pytest.approx(1.0)
    assert cosine_lr(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert cosine_lr(100, **kw) == pytest.approx(0.1)


def test_eval_linear_command_learns_toy_classes_with_augmentation(toy, tmp_path):
    train, val, ck = toy
    out = tmp_path / "linear"
    res = CliRunner().invoke(cli.main, [
        "eval", "linear", "--checkpoint", str(ck), *MODEL_ARGS, "--train", str(train),
        "--val", str(val), "--out", str(out), "--device", "cpu", "--workers", "0",
        "--epochs", "3", "--warmup-epochs", "1", "--batch-size", "6", "--micro-batch", "4",
        "--optimizer", "sgd", "--lr", "0.1"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    rec = json.loads((out / "result.json").read_text())
    assert rec["metrics"]["top1"] > 80.0, rec["metrics"]
    s = rec["settings"]
    assert s["augment"].startswith("RandomResizedCrop") and s["steps_per_epoch"] == 2
    assert (s["optimizer"], s["lr"], s["batch_size"], s["epochs"]) == ("sgd", 0.1, 6, 3)
    assert rec["checkpoint"]["sha256"] == s["checkpoint_sha256"]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [r["epoch"] for r in logged] == [1, 2, 3]
    assert rec["config"]["lr"] == 0.1 and rec["config"]["derived"] == {"lr": 0.1}    # the resolved config
    assert LinearConfig.from_dict(rec["config"]).lr == 0.1                          # loads back, derived checked


def test_linear_probe_resumed_after_kill_ends_identical_and_refuses_other_settings(
        toy, tmp_path, monkeypatch):
    train, val, ck = toy
    kw = dict(checkpoint=str(ck), model="vit_tiny_patch16_224", model_args=("img_size=32", "depth=2"),
              train=str(train), val=str(val), epochs=2, warmup_epochs=1, batch_size=4, micro_batch=4,
              cache_features=True, workers=0)
    cfg = LinearConfig.from_dict(kw)
    whole, _ = run_linear(cfg, out=tmp_path / "whole", device="cpu")
    with monkeypatch.context() as m:
        _interrupt_after_first_save(m)
        with pytest.raises(SimulatedKill):
            run_linear(cfg, out=tmp_path / "cut", device="cpu")
    with pytest.raises(FileExistsError, match="pass --resume"):
        run_linear(cfg, out=tmp_path / "cut", device="cpu")
    with pytest.raises(ValueError, match=r"other settings: lr: checkpoint None, now 0\.5"):
        run_linear(cfg.override(["lr=0.5"]), out=tmp_path / "cut", device="cpu", resume=True)
    resumed, settings = run_linear(cfg, out=tmp_path / "cut", device="cpu", resume=True)
    assert resumed == whole
    assert settings["augment"].startswith("NONE: center-crop features cached")
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)["head"]
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["head"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def _finetune_args(train, val, ck, out):
    return ["eval", "finetune", "--checkpoint", str(ck), *MODEL_ARGS, "--train", str(train),
            "--val", str(val), "--out", str(out), "--device", "cpu", "--workers", "0",
            "--epochs", "2", "--warmup-epochs", "1", "--batch-size", "4", "--lr", "1e-3"]


def test_eval_finetune_resumes_after_kill_to_identical_weights_without_touching_global_rng(
        toy, tmp_path, monkeypatch):
    train, val, ck = toy
    rng_before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    runner = CliRunner()
    res = runner.invoke(cli.main, _finetune_args(train, val, ck, tmp_path / "whole"))
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert torch.equal(rng_before[0], torch.get_rng_state())
    assert rng_before[1] == random.getstate()
    assert np.array_equal(rng_before[2], np.random.get_state()[1])

    with monkeypatch.context() as m:
        _interrupt_after_first_save(m)
        res = runner.invoke(cli.main, _finetune_args(train, val, ck, tmp_path / "cut"))
        assert isinstance(res.exception, SimulatedKill)
    assert not (tmp_path / "cut" / "result.json").exists()
    res = runner.invoke(cli.main, _finetune_args(train, val, ck, tmp_path / "cut")
                        + ["--resume"])
    assert res.exit_code == 0, res.output + repr(res.exception)

    whole = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert whole["epoch"] == cut["epoch"] == 2
    assert all(torch.equal(whole["model"][k], cut["model"][k]) for k in whole["model"])
    a, b = (json.loads((tmp_path / f / "result.json").read_text()) for f in ("whole", "cut"))
    assert a["metrics"] == b["metrics"] and set(a["metrics"]) == {"top1", "top5", "best_top1"}
    s = a["settings"]
    assert (s["mixup"], s["cutmix"], s["label_smoothing"], s["drop_path"]) == (0.8, 1.0, 0.1, 0.1)
    assert s["auto_augment"] == "rand-m9-mstd0.5-inc1" and s["layer_decay"] == 0.75
    # layer-wise lr decay: head at full lr, patch embedding at 0.75 ** (depth + 1)
    scales = sorted({g["lr_scale"] for g in whole["optimizer"]["param_groups"]})
    assert scales == pytest.approx([0.75 ** 3, 0.75 ** 2, 0.75, 1.0])


def test_eval_finetune_refuses_odd_micro_batch_for_mixup(toy, tmp_path):
    train, val, ck = toy
    args = _finetune_args(train, val, ck, tmp_path / "r")
    args[args.index("--batch-size") + 1] = "5"
    res = CliRunner().invoke(cli.main, args)
    assert res.exit_code != 0 and "even micro-batch, got 5" in res.output, res.output


def test_eval_linear_crashed_mid_run_resumes_to_the_uninterrupted_result_and_metrics(toy, tmp_path, monkeypatch):
    """The augmented probe (a new crop and flip per epoch), crashed right after epoch 2's checkpoint,
    then --resume: the same metrics.jsonl rows, result metrics and head weights as a run that was
    never interrupted."""
    from core.run import read_metrics

    train, val, ck = toy

    def args(out, *extra):
        return ["eval", "linear", "--checkpoint", str(ck), *MODEL_ARGS, "--train", str(train), "--val", str(val),
                "--out", str(out), "--device", "cpu", "--workers", "0", "--epochs", "4", "--warmup-epochs", "1",
                "--batch-size", "6", "--micro-batch", "3", "--optimizer", "sgd", "--lr", "0.1", *extra]

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    runner = CliRunner()
    res = runner.invoke(cli.main, args(whole))
    assert res.exit_code == 0, res.output + repr(res.exception)
    with monkeypatch.context() as m:
        _interrupt_after_first_save(m, saves=2)
        assert isinstance(runner.invoke(cli.main, args(cut)).exception, SimulatedKill)
    assert len(read_metrics(cut / "metrics.jsonl")) == 2 and not (cut / "result.json").exists()
    res = runner.invoke(cli.main, args(cut, "--resume"))
    assert res.exit_code == 0, res.output + repr(res.exception)
    rows = read_metrics(whole / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert read_metrics(cut / "metrics.jsonl") == rows
    a, b = (json.loads((p / "result.json").read_text()) for p in (whole, cut))
    assert a["metrics"] == b["metrics"] and a["config"] == b["config"]
    heads = [torch.load(p / "last.pt", weights_only=True)["head"] for p in (whole, cut)]
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


def test_a_diverging_linear_probe_stops_naming_the_first_non_finite_step(toy, tmp_path):
    train, val, ck = toy
    cfg = LinearConfig.from_dict(dict(checkpoint=str(ck), model_args=("img_size=32", "depth=2"), train=str(train),
                                      val=str(val), epochs=3, warmup_epochs=0, batch_size=4, micro_batch=4,
                                      cache_features=True, workers=0, optimizer="sgd", lr=1e38))
    with pytest.raises(FloatingPointError, match=r"linear probe: non-finite loss at step (\d+) \(epoch 0\)"):
        run_linear(cfg, out=tmp_path / "run", device="cpu")
    assert not (tmp_path / "run" / "last.pt").exists()           # nothing of the diverged epoch is kept


def _lars_runs(weight_decay: float):
    """(our LARS's weights, timm Lars's weights) after 3 steps on the same gradients: timm's with
    matrices in an always-adapted group and vectors in a plain one, eps 0 (MAE's split)."""
    from timm.optim import Lars
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(6, 5, generator=gen), torch.randn(6, generator=gen)]
    grads = [[torch.randn(t.shape, generator=gen) for t in init] for _ in range(3)]
    out = []
    for make in (lambda w, b: LARS([w, b], lr=0.5, weight_decay=weight_decay),
                 lambda w, b: Lars([dict(params=[w], weight_decay=weight_decay, always_adapt=True),
                                    dict(params=[b], weight_decay=0.0)], lr=0.5, momentum=0.9, eps=0.0)):
        w, b = (torch.nn.Parameter(t.clone()) for t in init)
        opt = make(w, b)
        for gw, gb in grads:
            w.grad, b.grad = gw.clone(), gb.clone()
            opt.step()
        out.append(torch.cat([w.detach().flatten(), b.detach()]))
    return out


def test_timm_lars_is_maes_lars_only_without_weight_decay():
    """Why eval/linear.py keeps its LARS (docs/eval.md): timm's trust ratio differs once the
    weight decay is not zero."""
    ours, theirs = _lars_runs(0.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    ours, theirs = _lars_runs(0.05)        # timm: trust * |w| / (|g| + wd |w|); MAE: trust * |w| / |g + wd w|
    assert (ours - theirs).abs().max() > 1e-4
