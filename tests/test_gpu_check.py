"""bench/gpu_check.py's report: both files written after every section, a failed check (or a
section that raises) makes the exit status non-zero, and the next sections still run. The
whole script runs in CI (.ci/run: --device cpu --quick), with its teachers cut to one block;
the command line of that cut is checked here."""
import json
import sys

import pytest

import bench.gpu_check as gc
import bench.gpu_sections as gs


def _ok(rep, sec, ctx):
    rep.figure(sec, "answer", 42.0, "images/s", "a figure and what it measures")
    rep.check(sec, "holds", True, "fine")


def _raises(rep, sec, ctx):
    raise RuntimeError("no decoder here")


def test_reports_are_written_and_a_failure_sets_the_exit_status(tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "SECTIONS", [("1. environment", _ok), ("2. fine", _ok)])
    assert gc.main(["--device", "cpu", "--quick", "--out", str(tmp_path / "a")]) == 0
    doc = json.loads((tmp_path / "a" / "gpu_check.json").read_text())
    assert doc["passed"] and [s["title"] for s in doc["sections"]] == ["1. environment", "2. fine", "budget"]
    md = (tmp_path / "a" / "gpu_check.md").read_text()
    assert "| answer | 42 images/s | a figure and what it measures |" in md and "PASSED" in md
    # the report says which teachers ran: --quick cuts them, the full form has the real ones
    assert "teachers: random-init ViT-B/16 cut to 1 of 12 blocks." in md
    assert gs.teacher_label(gc.FULL) == "ViT-B/16" and gs.teacher_kwargs(gc.FULL) is None

    monkeypatch.setattr(gc, "SECTIONS", [("1. environment", _ok), ("2. decode", _raises), ("3. after", _ok)])
    assert gc.main(["--device", "cpu", "--quick", "--out", str(tmp_path / "b")]) == 1
    doc = json.loads((tmp_path / "b" / "gpu_check.json").read_text())
    assert doc["failed"] == ["2. decode: ran"] and doc["sections"][2]["checks"][0]["ok"]
    assert "RuntimeError: no decoder here" in (tmp_path / "b" / "gpu_check.md").read_text()


def test_the_time_budget_fails_a_gpu_run_and_is_a_figure_on_the_cpu(tmp_path, monkeypatch):
    """The budget guards the GPU lease; a CPU smoke run's wall time depends on the machine's speed
    (up to 4x between CPUs of one kind), so there it is reported, not failed."""
    monkeypatch.setattr(gc, "SECTIONS", [("1. environment", _ok)])
    monkeypatch.setitem(gc.QUICK, "budget_s", -1)
    assert gc.main(["--device", "cpu", "--quick", "--out", str(tmp_path / "cpu")]) == 0
    budget = json.loads((tmp_path / "cpu" / "gpu_check.json").read_text())["sections"][-1]
    assert budget["checks"] == [] and budget["figures"][0]["name"] == "wall time"

    assert gc.main(["--device", "cuda", "--quick", "--out", str(tmp_path / "gpu")]) == 1
    assert json.loads((tmp_path / "gpu" / "gpu_check.json").read_text())["failed"] == [
        "budget: within the time budget"]


def test_the_quick_command_line_extracts_with_teachers_cut_to_one_block(prepared_data, tmp_path, monkeypatch):
    """``_cli`` under QUICK runs ``cli.py`` through ``_CUT_CLI`` (here in this interpreter, as
    ``python -c`` runs it): ``extract --random-init`` builds the teacher with one block, and the
    store records that build for the commands that read it later; FULL runs cli.py itself."""
    import teachers.vit
    from store.features import FeatureStore

    assert gs._cli("verify", "x", size=gc.FULL)[1:] == [str(gs.ROOT / "cli.py"), "verify", "x"]
    cmd = gs._cli("extract", "--teacher", "mae", "--random-init", "--data", prepared_data, "--store",
                  tmp_path / "store", "--views", 1, "--batch-size", 4, "--stats-images", 4, "--decoder", "pil",
                  "--codec", "fp16", "--view-pixels", "none", "--device", "cpu", size=gc.QUICK)
    assert cmd[:4] == [sys.executable, "-c", gs._CUT_CLI, "1"]
    monkeypatch.setattr(teachers.vit, "build_teacher", teachers.vit.build_teacher)   # restored afterwards
    monkeypatch.setattr(sys, "argv", ["-c", *cmd[3:]])
    with pytest.raises(SystemExit) as done:
        exec(cmd[2], {"__name__": "__main__"})
    assert done.value.code in (0, None)
    build = FeatureStore.open(tmp_path / "store").teacher("mae").build
    assert build["model_kwargs"]["depth"] == 1 and build["seed"] == 0


def test_subprocesses_share_one_bytecode_cache_where_python_writes_none(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    env = gs._subprocess_env(tmp_path)
    assert "PYTHONDONTWRITEBYTECODE" not in env and env["PYTHONPYCACHEPREFIX"] == str(tmp_path / "pycache")
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE")
    monkeypatch.delenv("PYTHONPYCACHEPREFIX", raising=False)
    assert "PYTHONPYCACHEPREFIX" not in gs._subprocess_env(tmp_path)      # its own caches serve
