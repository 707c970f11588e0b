"""train.wandb=true: W&B gets metrics.jsonl's rows at their steps, the run id lives in the run folder
and a resume after a crash continues the same W&B run; without wandb, one line naming the extra."""
import importlib.machinery
import json
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from train.config import load_config
from train.loop import train
from train.tracking import RECORD, WandbMissing, require_wandb, run_id


def _overrides(data, store, **kw):
    base = {"data.images": data, "data.store": store, "data.views": 2, "data.shuffle_window": 2,
            "data.decoder": "pil", "data.num_workers": 1, "train.batch_size": 4, "train.log_every": 1,
            "schedule.epochs": 2, "schedule.warmup_epochs": 1, "train.wandb": True, **kw}
    return [f"{k}={v}" for k, v in base.items()]


def _rows(run):
    return [json.loads(ln) for ln in (Path(run) / "metrics.jsonl").read_text().splitlines()]


class FakeWandb(types.ModuleType):
    """Records what the loop asks of ``wandb``: each init's arguments and each run's logged rows."""

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)     # found by find_spec
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kw):
        self.inits.append(kw)
        fake = self

        class FakeRun:
            def log(self, values, step):
                fake.logged.append({"step": step, **values})

            def finish(self):
                fake.finished += 1
        return FakeRun()


def test_wandb_gets_every_metrics_row_at_its_step_and_a_resume_reuses_the_run_id(
        prepared_data, teacher_store, tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = load_config(None, _overrides(prepared_data, teacher_store, **{"train.wandb_project": "ablations"}))
    out = tmp_path / "run"
    train(cfg, out_dir=out, max_steps=4, ckpt_steps=2, progress=False)
    rows = _rows(out)
    assert len(rows) == 4 and fake.logged == rows and fake.finished == 1
    rid = run_id(out)
    first = fake.inits[0]
    assert len(rid) == 8 and first["id"] == rid and first["project"] == "ablations"
    assert first["resume"] == "allow" and first["dir"] == str(out)
    assert first["config"]["train"]["wandb"] is True and first["config"]["data"]["store"] == str(teacher_store)
    train(cfg, out_dir=out, max_steps=4, ckpt_steps=2, progress=False, resume=True)
    assert fake.inits[1]["id"] == rid and run_id(out) == rid
    # a new run in another folder is another W&B run
    train(cfg, out_dir=tmp_path / "other", max_steps=1, progress=False)
    assert fake.inits[2]["id"] != rid and run_id(tmp_path / "other") == fake.inits[2]["id"]


def test_without_wandb_a_wandb_run_ends_in_one_line_naming_the_extra(prepared_data, teacher_store,
                                                                      tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)      # import wandb fails, find_spec finds nothing
    with pytest.raises(WandbMissing, match=r"pip install '\.\[wandb\]'"):
        require_wandb()
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "--data", str(prepared_data), "--store", str(teacher_store),
                                  "--out", str(out), "--steps", "1", *_overrides(prepared_data, teacher_store)[2:]])
    lines = [ln for ln in r.output.splitlines() if "Error:" in ln]
    assert r.exit_code != 0 and "Traceback" not in r.output, r.output
    assert len(lines) == 1 and "pip install '.[wandb]'" in lines[0] and "train.wandb" in lines[0], r.output
    assert not (out / "last.pt").exists()
    # the same run without W&B trains
    assert CliRunner().invoke(main, ["train", "--data", str(prepared_data), "--store", str(teacher_store),
                                     "--out", str(out), "--steps", "1",
                                     *_overrides(prepared_data, teacher_store, **{"train.wandb": False})[2:]]
                              ).exit_code == 0


@pytest.mark.slow                       # the wandb package's own service process, twice
def test_offline_wandb_run_crashed_and_resumed_continues_the_same_wandb_run(prepared_data, teacher_store, tmp_path,
                                                                           monkeypatch, arm_crash):
    """The real wandb package, offline: a run that crashed right after its checkpoint of step 3 and is
    resumed continues the run id its folder records."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    cfg = load_config(None, _overrides(prepared_data, teacher_store, **{"model.depth": 2, "schedule.epochs": 4}))
    with pytest.raises(arm_crash(monkeypatch, 3)):
        train(cfg, out_dir=out, max_steps=6, ckpt_steps=1, progress=False)
    rid = run_id(out)
    assert rid is not None and len(_rows(out)) == 3
    train(cfg, out_dir=out, max_steps=6, ckpt_steps=1, resume=True, progress=False)
    assert run_id(out) == rid and json.loads((out / RECORD).read_text())["project"] == "comad"
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4, 5, 6]
    # both runs wrote their offline W&B files for the one run id (wandb sync merges them)
    offline = sorted((out / "wandb").glob(f"offline-run-*-{rid}"))
    assert len(offline) == 2 and all((d / f"run-{rid}.wandb").stat().st_size > 0 for d in offline)
