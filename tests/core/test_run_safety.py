"""A run folder runs no code, has one writer, and survives a full disk: a crafted or damaged
checkpoint is refused in one line by every command that loads it, a second writer of a run
folder is refused naming the holder, a failed save names its file and keeps the previous one,
and the temporary files of killed writers go when the folder's next run starts."""
from __future__ import annotations

import builtins
import os
import shutil
import socket

import pytest
import torch
from click.testing import CliRunner

import core.io
from cli import main
from core.lock import Locked
from core.run import lock_folder, open_run
from tests.conftest import one_error

CFG = {"model": {"depth": 2}}


def _train(data, store, out, *extra):
    return ["train", "--data", data, "--store", store, "--out", out, "--steps", 1, "--batch-size", 4,
            "--device", "cpu", "model.depth=1", "data.decoder=pil", *extra]


def _linear(photos, out, *extra):
    """An ``eval linear`` whose --checkpoint is no checkpoint: it stops after opening its run folder."""
    junk = out.parent / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    return ["eval", "linear", "--checkpoint", junk, "--train", photos, "--val", photos, "--device", "cpu",
            "--workers", 0, "--out", out, *extra]


@pytest.fixture(scope="module")
def trained_run(prepared_data, teacher_store, tmp_path_factory):
    """A finished one-step training run folder (read-only: copy it)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    r = CliRunner().invoke(main, [str(a) for a in _train(prepared_data, teacher_store, run)])
    assert r.exit_code == 0, r.output
    return run


@pytest.mark.parametrize("command", ["train --resume", "export", "inspect --run", "eval linear --resume"])
def test_a_crafted_checkpoint_is_refused_in_one_line_by_every_command_that_loads_it_and_runs_no_code(
        command, trained_run, prepared_data, teacher_store, photo_tree, tmp_path, code_running_object):
    run = tmp_path / "run"
    runs_code, marker = code_running_object
    if command == "eval linear --resume":                  # an eval run folder with its config, then --resume
        one_error(_linear(photo_tree, run))
        args = _linear(photo_tree, run, "--resume")
    else:
        shutil.copytree(trained_run, run)
        args = {"train --resume": _train(prepared_data, teacher_store, run, "--resume"),
                "export": ["export", run, tmp_path / "student.safetensors"],
                "inspect --run": ["inspect", teacher_store, "--data", prepared_data, "--index", 0, "--run", run,
                                  "--out", tmp_path / "panel.png", "--device", "cpu"]}[command]
    torch.save({"step": 1, "model": {}, "meta": {"config": {}}, "payload": runs_code}, run / "last.pt")
    line = one_error(args)
    assert line.startswith(f"Error: {run / 'last.pt'}: not a checkpoint this code can load safely ("), line
    assert not marker.exists()


def test_a_truncated_checkpoint_on_resume_is_refused_in_one_line_naming_it(
        trained_run, prepared_data, teacher_store, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    whole = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(whole[:len(whole) // 2])
    line = one_error(_train(prepared_data, teacher_store, run, "--resume"))
    assert line.startswith(f"Error: {run / 'last.pt'}: not a readable checkpoint ("), line
    assert "damaged or cut short" in line


@pytest.mark.parametrize("held", ["train", "sweep", "sweep learner", "eval linear"])
def test_a_second_writer_of_a_run_folder_is_refused_naming_the_holder(
        held, prepared_data, teacher_store, photo_tree, tmp_path):
    out = tmp_path / "out"
    args = {"train": _train(prepared_data, teacher_store, out),
            "sweep": _train(prepared_data, teacher_store, out, "--variant", "a:", "--variant", "b:loss.kind=mse"),
            "eval linear": _linear(photo_tree, out)}
    args["sweep learner"] = args["sweep"]
    folder = out / "b" if held == "sweep learner" else out
    lock = lock_folder(folder)                      # the other writer, as a run holds it
    try:
        line = one_error(args[held])
    finally:
        lock.release()
    assert line.startswith(f"Error: {folder}: another process is writing this run folder (pid {os.getpid()} "
                           f"on host {socket.gethostname()} since "), line
    assert f"lock {folder / 'run.lock'}" in line
    assert not (folder / "config.yaml").exists()


def test_open_run_holds_the_lock_until_closed_also_against_a_symlinked_path(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "run")
    with open_run(tmp_path / "run", config=CFG, resume=False) as run:
        run.save({"step": 1})
        for path in (tmp_path / "run", tmp_path / "link"):
            with pytest.raises(Locked, match=f"pid {os.getpid()} on host {socket.gethostname()}"):
                open_run(path, config=CFG, resume=True)
    with open_run(tmp_path / "link", config=CFG, resume=True) as run:      # released by close
        assert run.step == 1


def test_a_full_disk_at_a_save_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    with open_run(tmp_path / "run", config=CFG, resume=False) as run:
        path = run.save({"step": 1, "w": torch.ones(1 << 16)})    # larger than a write buffer
        real_open = builtins.open
        monkeypatch.setattr(core.io, "open", lambda name, mode: real_open("/dev/full", mode), raising=False)
        for save, name in ((lambda: run.save({"step": 2, "w": torch.zeros(1 << 16)}), "last.pt"),
                           (lambda: core.io.write_atomic(run.path / "config.yaml", "a: 2\n"), "config.yaml")):
            with pytest.raises(OSError) as error:
                save()
            message = str(error.value)
            assert "\n" not in message and error.value.errno == 28, message
            assert f"cannot write {run.path / name}: No space left on device" in message
        monkeypatch.undo()
    kept = torch.load(path, weights_only=True)
    assert kept["step"] == 1 and torch.equal(kept["w"], torch.ones(1 << 16))
    assert (tmp_path / "run" / "config.yaml").read_text() == "model:\n  depth: 2\n"


def test_temp_files_of_killed_writers_are_removed_when_a_run_starts_or_resumes(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    keep = ["notes.tmp", "last.pt.tmpl", "data.tmp1x"]
    for name in ["last.pt.tmp4242", "config.yaml.tmp17", *keep]:
        (run / name).write_bytes(b"x")
    with open_run(run, config=CFG, resume=False) as r:
        r.save({"step": 1})
    assert sorted(p.name for p in run.iterdir() if "tmp" in p.name) == sorted(keep)
    (run / "last.pt.tmp99").write_bytes(b"cut short")
    with open_run(run, config=CFG, resume=True):
        assert not (run / "last.pt.tmp99").exists()
