"""``eval linear|finetune|detection|segmentation --auto-resume``: one command for a job that may be the
first or a requeue. On an empty folder it starts, on a run killed after a checkpoint it resumes,
on a finished one it says so in one line and touches nothing; a finished run of other settings,
and --resume with it, are refused in one line. The run folder's log.txt keeps each command's
start, the progress lines, and its last line (``finished`` or the ``Error:`` line)."""
from pathlib import Path

import pytest
from click.testing import CliRunner

import cli
import core.run
from tests.conftest import one_error

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL_ARGS = ["--model-arg", "img_size=32", "--model-arg", "depth=2"]


class Killed(Exception):
    pass


def _args(toy, out, *extra):
    train, val, ck = toy
    return ["eval", "linear", "--checkpoint", str(ck), *MODEL_ARGS, "--train", str(train), "--val", str(val),
            "--out", str(out), "--device", "cpu", "--workers", "0", "--epochs", "2", "--warmup-epochs", "1",
            "--batch-size", "6", "--micro-batch", "6", "--optimizer", "sgd", "--lr", "0.1", "--cache-features",
            *extra]


def _lines(path: Path) -> list[str]:
    """The log's lines without their timestamps."""
    return [line.split(" ", 2)[2] for line in path.read_text().splitlines()]


def _snapshot(folder):
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_eval_auto_resume_starts_resumes_a_killed_run_and_leaves_a_finished_one(toy, tmp_path, monkeypatch):
    out = tmp_path / "linear"
    real = core.run.save_atomic

    def save_then_die(obj, path):                       # killed right after epoch 1's checkpoint
        real(obj, path)
        raise Killed(path)
    with monkeypatch.context() as m:
        m.setattr(core.run, "save_atomic", save_then_die)
        first = CliRunner().invoke(cli.main, _args(toy, out, "--auto-resume"))
    assert isinstance(first.exception, Killed) and (out / "last.pt").is_file() and not (out / "result.json").exists()
    # a resume of other settings is refused, and the run's log ends with that line
    line = one_error(_args(toy, out, "--auto-resume", "--lr", "0.2"), out / "last.pt", "lr: checkpoint 0.1, now 0.2")
    log = _lines(out / "log.txt")
    assert log[-2].startswith("start: ") and log[-1] == line

    second = CliRunner().invoke(cli.main, _args(toy, out, "--auto-resume"), env={"COMAD_LOG_INTERVAL": "0"})
    assert second.exit_code == 0, (second.output, second.exception)
    assert f"result written to {out / 'result.json'}" in second.stdout
    assert "linear probe: step 4/4 (100%) loss=" in second.stderr              # not a terminal: progress lines
    log = _lines(out / "log.txt")
    starts = [i for i, line in enumerate(log) if line.startswith("start: ")]
    assert len(starts) == 3 and log[starts[0] + 1:starts[1]][-1].startswith("crashed: Killed: ")
    assert log[starts[2] + 1] == f"resumed from {out / 'last.pt'} at step 2"
    assert log[-2].startswith("linear probe: step 4/4 (100%) loss=") and log[-1] == "finished"

    before = _snapshot(out)
    third = CliRunner().invoke(cli.main, _args(toy, out, "--auto-resume"))
    assert third.exit_code == 0, (third.output, third.exception)
    assert third.output.splitlines() == [f"{out} already finished (result.json); nothing to evaluate"]
    assert _snapshot(out) == before
    one_error(_args(toy, out, "--auto-resume", "seed=1"), out, "seed: checkpoint 0, now 1", alone=True)
    one_error(_args(toy, out, "--auto-resume", "--resume"), "--resume and --auto-resume exclude each other",
              alone=True)
    assert _snapshot(out) == before                     # refused before anything is written
