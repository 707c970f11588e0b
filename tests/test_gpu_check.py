"""bench/gpu_check.py's report: both files written after every section, a failed check (or a
section that raises) makes the exit status non-zero, and the next sections still run. The
whole script runs in CI (.ci/run: --device cpu --quick)."""
import json

import bench.gpu_check as gc


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
