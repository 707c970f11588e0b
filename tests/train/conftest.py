"""Fixtures of the training tests: a crash of the loop right after a chosen checkpoint, in process."""
from __future__ import annotations

import pytest


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
