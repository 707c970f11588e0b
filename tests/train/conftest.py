"""Fixtures of the training tests: a crash of the loop right after a chosen checkpoint, in process;
a tiny run's config on the shared store (``tiny_run_config``) and its logged losses (``logged_losses``)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

# a 2-block student on the shared 13-image store: 2 steps an epoch, a 4-epoch schedule
TINY_RUN = {"data.views": 2, "data.shuffle_window": 2, "data.decoder": "pil", "data.num_workers": 1,
            "data.streams": 2, "train.batch_size": 4, "train.log_every": 1, "schedule.epochs": 4,
            "schedule.warmup_epochs": 1, "model.depth": 2}


def tiny_run_config(data, store, **overrides):
    """The config of a ``TINY_RUN`` on ``data`` and ``store``, ``overrides`` (KEY=value) on top."""
    from train.config import load_config
    return load_config(None, [f"data.images={data}", f"data.store={store}",
                              *(f"{k}={v}" for k, v in {**TINY_RUN, **overrides}.items())])


def logged_losses(run) -> list[float]:
    """The losses of RUN/metrics.jsonl, in order."""
    return [json.loads(ln)["loss"] for ln in (Path(run) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def no_loss_plots(monkeypatch):
    """No loss.png / losses.png (matplotlib: most of a tiny run's time; not what is tested here)."""
    monkeypatch.setattr("train.plots.plot_losses", lambda *args, **kw: None)


class Crash(Exception):
    """A run that died right after a checkpoint (raised by ``arm_crash``)."""


def _arm(monkeypatch, step: int, learner: str | None = None) -> type[Crash]:
    from train.learner import Learner

    real, fired = Learner.checkpoint, []

    def checkpoint(self, **kw):
        real(self, **kw)
        if not fired and self.step == step and learner in (None, self.name):
            fired.append(step)
            raise Crash(f"{self.label}after the checkpoint of step {step}")
    monkeypatch.setattr(Learner, "checkpoint", checkpoint)
    return Crash


@pytest.fixture(scope="session")
def arm_crash():
    """``arm_crash(monkeypatch, step, learner=None)``: the training loop raises the returned
    exception class once, right after the checkpoint of ``step`` (steps done) is written: of
    the learner of that name in a sweep, else of the first learner to write it. The loop closes
    its run folders on the way out, so the same process can then resume them, as a new process
    resumes the folders of a killed one."""
    return _arm
