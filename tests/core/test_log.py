"""core/log.py and the progress lines of batch jobs: a job whose stderr is a file prints one plain
line per interval (extract, train), and the run folder's log.txt (an extraction's
STORE.<teacher>.extract.log) holds those lines, the command line that started it and its last
line: ``finished``, or the one ``Error:`` line of a refused resume."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.log import command_logs, log_line, open_log
from core.progress import progress_bar

ROOT = Path(__file__).resolve().parents[2]

# the commands of a JSON list, one after another, in one interpreter whose random-init teachers are
# tiny (tests.conftest TINY_CLI), each with its own sys.argv; prints each one's exit status as a line "exit N"
COMMANDS = ("import json, sys, torch, teachers.vit; from tests.conftest import tiny_builds; "
            "teachers.vit.build_teacher = tiny_builds(teachers.vit.build_teacher); torch.set_num_threads(1); "
            "from cli import main\n"
            "for args in json.loads(sys.argv[1]):\n"
            "    try:\n"
            "        sys.argv = ['cli.py', *args]\n"
            "        main(args)\n"
            "    except SystemExit as end:\n"
            "        print('exit', end.code, flush=True)\n")
TRAIN = ["data.views=2", "data.shuffle_window=2", "data.decoder=pil", "data.num_workers=1", "data.streams=2",
         "train.batch_size=4", "train.log_every=1", "schedule.epochs=4", "schedule.warmup_epochs=1", "model.depth=2"]


def _lines(path: Path) -> list[str]:
    """The log's lines without their timestamps (date and time: two words)."""
    return [line.split(" ", 2)[2] for line in path.read_text().splitlines()]


def test_logs_are_shared_by_path_timestamped_and_a_command_reaches_the_ones_it_closed(tmp_path):
    a, b = tmp_path / "a" / "log.txt", tmp_path / "b.log"
    log_line("before any log")                              # nowhere to go
    with command_logs() as final:
        with open_log(a, start="start: a"), open_log(b):
            with open_log(a):                               # a second holder of a: one file
                log_line("both")
            log_line("both, a still open")
        log_line("after both closed")
        final("Error: the last line")
    log_line("after the command")
    assert _lines(a) == ["start: a", "both", "both, a still open", "Error: the last line"]
    assert _lines(b) == ["both", "both, a still open", "Error: the last line"]
    assert a.read_text()[:2] == "20" and a.read_text().split(" ")[1].count(":") == 2


def test_progress_lines_come_per_interval_and_the_last_one_always(tmp_path, monkeypatch):
    import core.progress

    clock = [0.0]
    monkeypatch.setattr(core.progress.time, "monotonic", lambda: clock[0])
    monkeypatch.setenv("COMAD_LOG_INTERVAL", "30")
    monkeypatch.delenv("RANK", raising=False)
    with open_log(tmp_path / "log.txt"):
        bar = progress_bar(total=10, desc="train (cached)", unit="step", file=open(os.devnull, "w"))
        for step in range(10):
            clock[0] += 7.0                                 # 7 s a step: a line every 5th step
            bar.set_postfix(loss=f"{10 - step:.4f}")
            bar.update(1)
        bar.close()
        progress_bar(total=5, desc="cut short", unit="step").close()   # never updated: no line
    assert _lines(tmp_path / "log.txt") == [
        "train (cached): step 5/10 (50%) loss=6.0000 0.14 step/s eta 0:00:35",
        "train (cached): step 10/10 (100%) loss=1.0000 0.14 step/s done in 0:01:10"]
    monkeypatch.setenv("COMAD_LOG_INTERVAL", "soon")
    with pytest.raises(ValueError, match="COMAD_LOG_INTERVAL='soon'"):
        progress_bar(total=1)


@pytest.mark.slow         # one interpreter, ~10 s of imports
def test_batch_jobs_print_interval_lines_and_keep_them_with_their_last_line_in_the_run_log(
        prepared_data, teacher_store, tmp_path):
    store, run = tmp_path / "store", tmp_path / "run"
    train = ["train", "--data", str(prepared_data), "--store", str(teacher_store), "--out", str(run), "--steps", "2",
             "--device", "cpu", *TRAIN]
    commands = [["extract", "--teacher", "mae", "--data", str(prepared_data), "--store", str(store), "--random-init",
                 "--views", "1", "--decoder", "pil", "--device", "cpu", "--batch-size", "4", "--codec", "fp16",
                 "--view-pixels", "none", "stats_images=13"],
                train,
                [*train, "--resume", "optim.base_lr=0.001"]]           # refused: other settings
    with open(tmp_path / "stderr.txt", "w") as stderr:                   # not a terminal: no bar, lines
        done = subprocess.run([sys.executable, "-c", COMMANDS, json.dumps(commands)], cwd=ROOT, stderr=stderr,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "COMAD_LOG_INTERVAL": "0"},
                              timeout=300)
    err = (tmp_path / "stderr.txt").read_text()
    assert [ln for ln in done.stdout.splitlines() if ln.startswith("exit ")] == ["exit 0", "exit 0", "exit 1"], err
    assert "\r" not in err and "Traceback" not in err
    extract = [line for line in err.splitlines() if line.startswith("extract mae: ")]
    # 13 images in blocks of 5, 5 and 3, batches of at most 4: 5 batches, a line after each
    assert [line.split(" (")[0] for line in extract] == [f"extract mae: img {n}/13" for n in (4, 5, 9, 10, 13)]
    assert " blocks=1/3 " in extract[1] and " img/s eta " in extract[1]      # the line of a block's end
    assert " blocks=3/3 " in extract[-1] and " img/s done in " in extract[-1]
    steps = [line for line in err.splitlines() if line.startswith("train (cached): ")]
    assert [line.split(" loss=")[0] for line in steps] == ["train (cached): step 1/2 (50%)",
                                                           "train (cached): step 2/2 (100%)"]
    for line in steps:
        assert all(f" {key}=" in line for key in ("token", "spatial", "recon", "lr", "img_s")), line
    error = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert len(error) == 1 and "optim.base_lr" in error[0]

    log = _lines(store.with_name("store.mae.extract.log"))
    assert log[0].startswith("start: cli.py extract --teacher mae ") and log[0].endswith(")")   # (pid N on HOST)
    assert log[1] == "extract mae: 3 blocks to do, 0 already complete; statistics teacher pass before the blocks"
    assert log[2:-1] == extract and log[-1] == "finished"
    log = _lines(run / "log.txt")
    starts = [i for i, line in enumerate(log) if line.startswith("start: ")]
    assert len(starts) == 2 and "--steps 2" in log[0] and "--resume" in log[starts[1]]
    assert log[1:starts[1]] == [*steps, "finished"]
    assert log[starts[1] + 1:] == error                      # the refused resume's one line, and nothing else
