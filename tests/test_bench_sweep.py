"""bench/sweep.py's rows on the tests' store (K = 1 and 2, one round of 2 steps), and
bench/projection.py's sweep rows on the data path measured in docs/datapath_cpu.json (the
numbers docs/running.md quotes)."""
import json
from pathlib import Path

import numpy as np

import bench.projection as pj
import bench.sweep as sw

KEYS = {"k", "learners", "names", "seconds", "rounds_seconds", "s_per_step", "images_per_s",
        "images_per_s_per_learner", "vs_separate", "datapath_seconds", "datapath_share", "steps", "batch_size"}


def test_sweep_rows_on_the_test_store(prepared_data, teacher_store, tmp_path):
    rows = sw.measure(prepared_data, teacher_store, ks=(1, 2), steps=2, rounds=1, batch_size=4, threads=1,
                      overrides=("model.depth=1", "decoder.depth=1"), root=tmp_path, warmup=False)
    assert [r["k"] for r in rows] == [1, 2]
    for r in rows:
        assert KEYS <= set(r), KEYS - set(r)
        assert r["seconds"] > 0 and r["datapath_seconds"] > 0 and r["steps"] == 2
        assert np.isclose(r["images_per_s"], r["k"] * 4 * 2 / r["seconds"])
    one, two = rows
    assert one["learners"] == 1 and np.isclose(one["vs_separate"], 1.0)
    assert two["learners"] == 2 and two["names"] == ["base", "uniform"]
    assert np.isclose(two["vs_separate"], two["seconds"] / (2 * one["seconds"]))
    # each learner of the sweep is a full run folder
    assert all((tmp_path / "round0_k2" / n / "student.safetensors").is_file() for n in two["names"])
    assert sw.format_rows(rows).count("\n") == 4          # header, rule, data path, K = 1, K = 2


def test_projected_sweep_on_the_measured_data_path():
    measured = json.loads((Path(__file__).resolve().parents[1] / "docs" / "datapath_cpu.json").read_text())
    rows = pj.main(["--datapath", str(Path(__file__).resolve().parents[1] / "docs" / "datapath_cpu.json")])
    assert measured and rows
    base = next(r for r in rows if r["name"] == pj.SWEEP_ROW)
    sweep = pj.sweep_rows(base, (1, 2, 3, 4, 8))
    assert pj.free_learners(base) == 3 and [s["free"] for s in sweep] == [True, True, True, False, False]
    assert np.isclose(sweep[0]["hours"], base["hours"]) and np.isclose(sweep[0]["x_separate"], 1.0)
    assert all(np.isclose(s["hours"], max(s["compute"], s["data"])) for s in sweep)
    assert all(np.isclose(s["separate"], s["k"] * base["hours"]) for s in sweep)
    assert round(sweep[-2]["x_separate"], 2) == 0.30 and round(sweep[-1]["hours"], 2) == 3.17
