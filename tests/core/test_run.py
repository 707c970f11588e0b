"""core/run.py and core/io.py: the run folder, atomic saves, the step-metrics accumulator."""
from __future__ import annotations

import json
import sys

import pytest
import torch
import yaml

from core.io import save_atomic, write_atomic
from core.run import StepMetrics, open_run, read_metrics, saved_config

CFG = {"model": {"depth": 2, "names": ("a", "b")}, "data": {"path": "/data/x", "seed": 0}}


def _open(path, resume=False, config=CFG, **kw):
    return open_run(path, config=config, resume=resume, movable=["data.path"], compare={"total_steps": 10},
                    info={"world_size": 1}, **kw)


def test_new_run_records_config_git_commit_and_refuses_to_be_reopened(tmp_path):
    with _open(tmp_path / "run") as run:
        assert not run.resumed and run.step == 0
        run.log({"step": 1, "loss": 2.0})
        run.save({"step": 1, "w": torch.ones(2)})
    assert saved_config(tmp_path / "run") == {"model": {"depth": 2, "names": ["a", "b"]},
                                              "data": {"path": "/data/x", "seed": 0}}
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["total_steps"] == 10 and info["world_size"] == 1
    assert len(info["git_commit"]) == 40 and isinstance(info["git_dirty"], bool)
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == [{"step": 1, "loss": 2.0}]
    with pytest.raises(FileExistsError, match=r"already holds a run \(last.pt\); pass --resume"):
        _open(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint at"):
        _open(tmp_path / "empty", resume=True)
    (tmp_path / "run" / "config.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="holds no config.yaml"):
        _open(tmp_path / "run", resume=True)


def test_resume_with_other_settings_is_refused_in_one_line_naming_each_key(tmp_path):
    with _open(tmp_path / "run") as run:
        run.save({"step": 3})
    other = {"model": {"depth": 4, "names": ("a", "b")}, "data": {"path": "/moved", "seed": 0}}
    with pytest.raises(ValueError) as e:
        open_run(tmp_path / "run", config=other, resume=True, movable=["data.path"], compare={"total_steps": 12})
    msg = str(e.value)
    assert "\n" not in msg and "model.depth: checkpoint 2, now 4" in msg and "total_steps: checkpoint 10, now 12" in msg
    assert "data.path" not in msg                      # a movable key may differ
    moved = {"model": {"depth": 2, "names": ["a", "b"]}, "data": {"path": "/moved", "seed": 0}}
    with _open(tmp_path / "run", resume=True, config=moved) as run:   # lists equal tuples
        assert run.resumed and run.step == 3 and run.state == {"step": 3}
    assert saved_config(tmp_path / "run")["data"]["path"] == "/moved"


def test_resume_trims_metrics_to_the_checkpoint_step_and_skips_a_cut_line(tmp_path):
    with _open(tmp_path / "run") as run:
        for step in range(1, 6):
            run.log({"step": step, "loss": float(step)})
            if step == 3:
                run.save({"step": 3})
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')                   # killed mid-line
    with _open(tmp_path / "run", resume=True) as run:
        run.log({"step": 4, "loss": 40.0})
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_only_rank_zero_writes(tmp_path):
    (tmp_path / "run").mkdir()
    with _open(tmp_path / "run", rank=1) as run:
        run.log({"step": 1, "loss": 1.0})
        run.save({"step": 1})
    assert list((tmp_path / "run").iterdir()) == []


def test_atomic_save_that_fails_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_atomic({"step": 1}, path)
    write_atomic(tmp_path / "config.yaml", "a: 1\n")

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "last.pt"]
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == {"a": 1}


def test_accumulator_finds_the_first_non_finite_step_and_means_the_interval():
    acc = StepMetrics("cpu")
    for step, loss in enumerate([1.0, 3.0, float("nan"), float("inf"), 2.0]):
        acc.add(step, {"loss": torch.tensor(loss), "part": torch.tensor(float(step))})
    assert acc.first_non_finite() == 2
    assert acc.reduce()["part"] == pytest.approx(2.0)
    acc = StepMetrics("cpu")
    acc.add(7, {"loss": torch.tensor(1.0)})
    acc.add(8, {"loss": torch.tensor(3.0)})
    assert acc.first_non_finite() is None and acc.reduce() == {"loss": 2.0}
    assert acc.reduce() == {}                          # reset after each interval


def test_tensorboard_events_beside_metrics_only_when_tensorboard_is_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)     # not installed
    with _open(tmp_path / "without") as run:
        run.log({"step": 1, "loss": 1.0})
    assert not list((tmp_path / "without").glob("events.out.tfevents.*"))
    monkeypatch.undo()
    pytest.importorskip("tensorboard")
    with _open(tmp_path / "with") as run:
        run.log({"step": 1, "loss": 1.0})
    assert list((tmp_path / "with").glob("events.out.tfevents.*"))
