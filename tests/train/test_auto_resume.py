"""``train --auto-resume``: one command for a job that may be the first or a requeue. On an empty
folder it starts, on a run (or sweep) killed after a checkpoint it resumes, on a finished one it
says so in one line and touches nothing; with --resume it is refused."""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")      # fp32 CPU sums repeat at a fixed thread count

# a 2-block student on the shared 13-image store, 4 steps, a checkpoint after every step
SETTINGS = ["data.views=2", "data.shuffle_window=2", "data.decoder=pil", "data.num_workers=1", "data.streams=2",
            "train.batch_size=4", "train.log_every=1", "schedule.epochs=4", "schedule.warmup_epochs=1",
            "model.depth=2"]
VARIANTS = ["uniform:gate.mode=uniform", "mse:loss.kind=mse"]


def _train(data, store, out, *extra):
    """``cli.py train`` in this process; the CliRunner result."""
    return CliRunner().invoke(main, ["train", "--data", str(data), "--store", str(store), "--out", str(out),
                                     "--steps", "4", "--ckpt-steps", "1", "--device", "cpu", *extra, *SETTINGS])


def _ok(result):
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def _losses(run):
    return [json.loads(ln)["loss"] for ln in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def _snapshot(folder):
    """Every file of ``folder``: its bytes and modification time."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _variants():
    return [a for v in VARIANTS for a in ("--variant", v)]


def test_auto_resume_starts_an_empty_run_resumes_a_killed_one_and_leaves_a_finished_one(
        prepared_data, teacher_store, tmp_path, arm_crash, monkeypatch):
    ref, run = tmp_path / "ref", tmp_path / "run"
    _ok(_train(prepared_data, teacher_store, ref))
    # an empty folder: a plain start, killed right after the checkpoint of step 2
    with pytest.raises(arm_crash(monkeypatch, 2)):
        result = _train(prepared_data, teacher_store, run, "--auto-resume")
        raise result.exception
    assert _losses(run) == _losses(ref)[:2]
    # the same command again continues from that checkpoint to the uninterrupted losses
    assert "trained 4 steps" in _ok(_train(prepared_data, teacher_store, run, "--auto-resume")).stdout
    assert _losses(run) == _losses(ref) and len(_losses(ref)) == 4
    # and once more: finished, one line, nothing written
    before = _snapshot(run)
    result = _ok(_train(prepared_data, teacher_store, run, "--auto-resume"))
    assert result.output.splitlines() == [f"{run} already finished (4 steps); nothing to train"]
    assert _snapshot(run) == before


def test_auto_resume_of_a_sweep_starts_resumes_each_learner_and_leaves_a_finished_sweep(
        prepared_data, teacher_store, tmp_path, arm_crash, monkeypatch):
    ref, run = tmp_path / "ref", tmp_path / "run"
    _ok(_train(prepared_data, teacher_store, ref, *_variants()))
    # an empty folder: a new sweep, killed after uniform's checkpoint of step 2 (mse's last is step 1's)
    with pytest.raises(arm_crash(monkeypatch, 2, "uniform")):
        result = _train(prepared_data, teacher_store, run, "--auto-resume", *_variants())
        raise result.exception
    assert _losses(run / "uniform") == _losses(ref / "uniform")[:2]
    assert _losses(run / "mse") == _losses(ref / "mse")[:2]
    # --auto-resume alone: the learners come from RUN/sweep.yaml, each from its own checkpoint
    assert "trained 2 of 2 learners" in _ok(_train(prepared_data, teacher_store, run, "--auto-resume")).stdout
    for name in ("uniform", "mse"):
        assert _losses(run / name) == _losses(ref / name) and len(_losses(ref / name)) == 4
    before = _snapshot(run)
    result = _ok(_train(prepared_data, teacher_store, run, "--auto-resume", *_variants()))
    assert result.output.splitlines() == [f"{run} already finished (4 steps); nothing to train"]
    assert _snapshot(run) == before


def test_resume_and_auto_resume_together_are_refused_in_one_line(prepared_data, teacher_store, tmp_path):
    result = _train(prepared_data, teacher_store, tmp_path / "run", "--resume", "--auto-resume")
    assert result.exit_code == 1
    assert result.output.splitlines() == ["Error: --resume and --auto-resume exclude each other; give one of them"]
    assert not (tmp_path / "run").exists()
