"""Sweeps: K learners on one data pass give each learner its own single run's losses, share the
data-side work, resume after a crash, stop a diverged learner alone and refuse data-changing
variants. Under torchrun: tests/train/test_two_ranks.py."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from store.features import StoreError
from train.config import load_config
from train.sweep import Variant, check_variants, load_sweep, parse_variant

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_torch_thread")      # fp32 CPU sums repeat at a fixed thread count

# the base of every sweep here: a 4-block student on the shared 13-image store
BASE = {"data.views": 2, "data.shuffle_window": 2, "data.decoder": "pil", "data.num_workers": 1, "data.streams": 2,
        "train.batch_size": 4, "train.log_every": 1, "schedule.epochs": 4, "schedule.warmup_epochs": 1,
        "model.depth": 4}
# three learners that differ in the gate, the loss and the mask ratio; two draw stochastic depth,
# so each must keep its own generators
VARIANTS = ["uniform:gate.mode=uniform model.drop_path=0.1", "mse:loss.kind=mse",
            "mask70:data.student_visible=59 model.drop_path=0.1"]


def _overrides(data, store, **kw):
    return [f"{k}={v}" for k, v in {"data.images": data, "data.store": store, **BASE, **kw}.items()]


def _rows(run):
    return [json.loads(ln) for ln in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def _losses(run):
    return [r["loss"] for r in _rows(run)]


def test_each_learner_of_a_three_variant_sweep_logs_its_own_single_runs_losses_bit_for_bit(
        prepared_data, teacher_store, tmp_path, monkeypatch):
    from train.loop import train
    from train.objective import CoMADObjective

    grids = []
    real_grid = CoMADObjective.adapted_grid

    def counted(self, batch):
        grids.append(1)
        return real_grid(self, batch)
    monkeypatch.setattr(CoMADObjective, "adapted_grid", counted)
    cfg = load_config(None, _overrides(prepared_data, teacher_store))
    variants = [parse_variant(v) for v in VARIANTS]
    summary = train(cfg, out_dir=tmp_path / "sweep", max_steps=4, progress=False, variants=variants)
    # the three learners' frozen adapters are equal: one adapted grid per batch, not three
    assert len(grids) == 4
    assert {n: s["status"] for n, s in summary["learners"].items()} == dict.fromkeys(["uniform", "mse", "mask70"],
                                                                                      "done")
    for v in variants:
        single = tmp_path / f"single-{v.name}"
        train(load_config(None, _overrides(prepared_data, teacher_store) + list(v.overrides)), out_dir=single,
              max_steps=4, progress=False)
        learner = tmp_path / "sweep" / v.name
        keys = ("loss", "loss_token", "loss_spatial", "gate/mae", "collapse/ibot", "coverage")
        assert [{k: r[k] for k in keys} for r in _rows(learner)] == [{k: r[k] for k in keys} for r in _rows(single)]
        assert len(_rows(learner)) == 4
        a, b = load_config(learner / "config.yaml"), load_config(single / "config.yaml")
        assert a.train.out_dir == str(learner) and a.to_dict()["model"] == b.to_dict()["model"]
        for name in ("config.yaml", "run.json", "last.pt", "student.safetensors", "loss.png"):
            assert (learner / name).is_file(), name
        if importlib.util.find_spec("tensorboard"):                 # the '.[tensorboard]' extra
            assert list(learner.glob("events.out.tfevents.*"))
    # the learners differ (the variants took effect) and the report lists them all
    assert len({tuple(_losses(tmp_path / "sweep" / v.name)) for v in variants}) == 3
    report = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [r["learner"] for r in report] == ["uniform", "mse", "mask70"]
    assert all(r["status"] == "done" and r["steps"] == 4 for r in report)
    assert report[1]["loss"] == _losses(tmp_path / "sweep" / "mse")[-1]
    assert (tmp_path / "sweep" / "losses.png").stat().st_size > 0
    assert "| mse | loss.kind=mse | done | 4 |" in (tmp_path / "sweep" / "sweep.md").read_text()
    # a learner folder is a run folder: export takes it as any run
    from train.export import export_run
    export_run(tmp_path / "sweep" / "mse", tmp_path / "mse.safetensors")
    assert (tmp_path / "mse.safetensors").is_file()


def test_variants_that_change_the_shared_data_pass_are_refused_naming_the_key(tmp_path):
    for text, key in [("data.store=/elsewhere", "data.store"), ("x:train.batch_size=8", "train.batch_size"),
                      ("data.views=1", "data.views"), ("schedule.epochs=9", "schedule.epochs"),
                      ("train.log_every=5", "train.log_every")]:
        with pytest.raises(ValueError, match=f"sets {key}: the learners of a sweep share the data pass"):
            check_variants([parse_variant(text)])
    check_variants([parse_variant("data.student_visible=39"), parse_variant("model.embed_dim=384 model.num_heads=6")])
    assert parse_variant("gate.mode=uniform loss.kind=mse") == Variant("gate.mode-uniform_loss.kind-mse",
                                                                       ("gate.mode=uniform", "loss.kind=mse"))
    assert parse_variant("base:") == Variant("base", ())
    with pytest.raises(ValueError, match="two learners are named 'a'"):
        check_variants([parse_variant("a:gate.mode=uniform"), parse_variant("a:loss.kind=mse")])
    with pytest.raises(ValueError, match="'gate.mode' is not KEY=VALUE"):
        parse_variant("gate.mode uniform")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("learners:\n  kl: {}\n  mse: {loss.kind: mse}\n  betas: {optim.betas: [0.9, 0.99]}\n"
                     "  views: {data.views: 1}\n")
    variants = load_sweep(sweep)
    assert variants[:3] == [Variant("kl"), Variant("mse", ("loss.kind=mse",)),
                            Variant("betas", ("optim.betas=[0.9, 0.99]",))]
    with pytest.raises(ValueError, match="learner 'views' sets data.views"):
        check_variants(variants)
    # the paper's ablations of docs/running.md: a valid sweep whose every learner is a valid config
    from train.config import apply_overrides
    paper = load_sweep(ROOT / "docs" / "ablations.yaml")
    check_variants(paper)
    assert len(paper) == 10 and {v.name for v in paper} >= {"consensus", "gate-uniform", "loss-mse", "mask-0.80"}
    small = load_sweep(ROOT / "docs" / "ablations-vit-small.yaml")     # its own store: tests/train/test_heldout.py
    check_variants(small)
    assert [v.name for v in small] == ["vit-small"]
    for v in [*paper, *small]:
        apply_overrides(load_config(None, []), list(v.overrides)).validate()
    sweep.write_text("learners: [gate.mode=uniform]\n")
    with pytest.raises(ValueError, match=f"{sweep}: needs a 'learners:' mapping"):
        load_sweep(sweep)


def test_the_cli_refuses_a_data_changing_variant_in_one_line(prepared_data, teacher_store, photo_tree, tmp_path):
    from click.testing import CliRunner

    from cli import main
    result = CliRunner().invoke(main, ["train", "--data", str(prepared_data), "--store", str(teacher_store), "--out",
                                       str(tmp_path / "r"), "--variant", "gate.mode=uniform", "--variant",
                                       "b:train.batch_size=8"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)     # no traceback
    assert result.stderr.strip().splitlines() == [
        "Error: learner 'b' sets train.batch_size: the learners of a sweep share the data pass (data, batch, epochs) "
        "and its logging and checkpoint intervals; set it for the whole sweep or train it as its own run"]
    assert not (tmp_path / "r").exists()
    from train.loop import train
    cfg = load_config(None, _overrides(prepared_data, teacher_store))
    with pytest.raises(ValueError, match="learner 'b': .*gate.mod"):
        train(cfg, out_dir=tmp_path / "r", max_steps=2, progress=False, variants=[parse_variant("b:gate.mod=uniform")])
    from data.shards import prepare
    other = prepare(photo_tree, tmp_path / "other", shard_size=4, progress=False, workers=0).root
    with pytest.raises(StoreError, match="(?s)^--heldout: .*store does not match.*DATA must be the images"):
        train(cfg, out_dir=tmp_path / "r", max_steps=2, progress=False, variants=[parse_variant("a:")],
              heldout=(teacher_store, other))
    assert not (tmp_path / "r").exists()                    # refused before any work
    with pytest.raises(ValueError, match="learner 'c': config gate.mode='gated' .*consensus"):
        train(cfg, out_dir=tmp_path / "r", max_steps=2, progress=False, variants=[parse_variant("c:gate.mode=gated")])


def _sweep_cmd(data, store, out, *extra, steps=4, variants=VARIANTS[:2]):
    variants = [a for v in variants for a in ("--variant", v)]
    return [sys.executable, str(ROOT / "cli.py"), "train", "--data", str(data), "--store", str(store), "--out",
            str(out), "--steps", str(steps), "--ckpt-steps", "1", "--device", "cpu", *variants, *extra,
            *_overrides(data, store)[2:]]


def test_a_sweep_crashed_between_its_learners_checkpoints_resumes_with_its_recorded_learners_to_each_ones_losses(
        prepared_data, teacher_store, tmp_path, arm_crash, monkeypatch):
    from click.testing import CliRunner

    from cli import main
    from train.loop import train
    ref, run = tmp_path / "ref", tmp_path / "run"
    cfg = load_config(None, _overrides(prepared_data, teacher_store))
    variants = [parse_variant(v) for v in VARIANTS[:2]]
    train(cfg, out_dir=ref, max_steps=4, progress=False, variants=variants)
    with pytest.raises(arm_crash(monkeypatch, 2, "uniform")):        # mse's last checkpoint is step 1's
        train(cfg, out_dir=run, max_steps=4, ckpt_steps=1, progress=False, variants=variants)
    assert torch.load(run / "mse" / "last.pt", weights_only=False)["step"] == 1 and len(_losses(run / "uniform")) == 2
    # --resume alone: the learners come from the sweep's sweep.yaml
    resume = [a for a in _sweep_cmd(prepared_data, teacher_store, run, "--resume")[2:] if a != "--variant"
              and a not in VARIANTS]
    result = CliRunner().invoke(main, resume)
    assert result.exit_code == 0, (result.output, result.exception)
    for name in ("uniform", "mse"):
        assert _losses(run / name) == _losses(ref / name) and len(_losses(ref / name)) == 4
    # the same folder again without --resume, or with other learners, is refused
    with pytest.raises(FileExistsError, match="already holds a sweep \\(sweep.yaml\\); pass --resume"):
        train(cfg, out_dir=run, max_steps=4, progress=False, variants=variants)
    with pytest.raises(ValueError, match=f"cannot resume the sweep in {run}: it has learners"):
        train(cfg, out_dir=run, max_steps=4, progress=False, variants=variants[:1], resume=True)


def test_a_learner_whose_loss_turns_nan_stops_alone_and_named(prepared_data, teacher_store, tmp_path, monkeypatch):
    import train.learner as learner
    from train.loop import train
    real = learner.build_objective

    def poisoned(cfg, stats):
        obj = real(cfg, stats)
        if cfg.gate.mode != "uniform":
            return obj
        forward, calls = obj.forward, []

        def forward_nan(batch, **kw):
            out = forward(batch, **kw)
            calls.append(1)
            if len(calls) == 3:
                out["loss"] = out["loss"] * float("nan")
            return out
        obj.forward = forward_nan
        return obj
    monkeypatch.setattr(learner, "build_objective", poisoned)
    cfg = load_config(None, _overrides(prepared_data, teacher_store))
    out = tmp_path / "sweep"
    variants = [parse_variant(v) for v in VARIANTS[:2]]
    # the held-out columns come from a store of other images in use; here the training store stands in
    summary = train(cfg, out_dir=out, max_steps=5, ckpt_steps=1, progress=False, variants=variants,
                         heldout=(teacher_store, prepared_data))
    message = ("learner 'uniform': non-finite loss at step 2; stopping (last good checkpoint: "
               f"{out / 'uniform' / 'last.pt'})")
    assert summary["stopped"] == {"uniform": message}
    assert (out / "uniform" / "stopped.txt").read_text().strip() == message
    assert torch.load(out / "uniform" / "last.pt", weights_only=False)["step"] == 2
    assert not (out / "uniform" / "student.safetensors").exists() and len(_losses(out / "uniform")) == 2
    assert len(_losses(out / "mse")) == 5 and (out / "mse" / "student.safetensors").is_file()
    report = {r["learner"]: r for r in json.loads((out / "sweep.json").read_text())}
    assert report["uniform"]["status"] == message and report["mse"]["status"] == "done"
    assert "heldout_total" not in report["uniform"]
    mse = report["mse"]
    assert np.isclose(mse["heldout_total"], mse["heldout_token"] + mse["heldout_spatial"])
    assert 0 < mse["heldout_total"] and np.isfinite(mse["heldout_untrained"])
    # a resume leaves the stopped learner stopped
    again = train(cfg, out_dir=out, max_steps=5, ckpt_steps=1, progress=False, variants=variants, resume=True)
    assert again["stopped"] == {"uniform": message} and len(_losses(out / "mse")) == 5
    # the command names the stopped learner on the console, finishes the others and exits with status 1
    from click.testing import CliRunner

    from cli import main
    result = CliRunner().invoke(main, _sweep_cmd(prepared_data, teacher_store, tmp_path / "cli", steps=5)[2:])
    assert result.exit_code == 1
    lines = [ln for ln in result.stderr.strip().splitlines() if not ln.startswith("sweep of 2 ")]   # progress lines
    assert lines[0].startswith("learner 'uniform': non-finite loss at step 2; stopping")
    assert lines[-1] == "Error: 1 learner(s) stopped: uniform"
    assert "trained 1 of 2 learners for 5 steps" in result.stdout
    assert (tmp_path / "cli" / "mse" / "student.safetensors").is_file()
