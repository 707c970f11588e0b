"""bench/datapath.py --quick runs and writes its JSON rows; bench/projection.py reads them;
samples/imagenet_like.py writes the size and quality spread it states, deterministically."""
import hashlib
import json

import numpy as np
from PIL import Image

import bench.datapath as dp
from samples.imagenet_like import LONG_SIDE, size_summary, write_imagenet_like

KEYS = {"name", "images_per_s_per_core", "bytes_per_sample", "pixels_per_sample", "images_per_s",
        "cpu_s_per_sample", "decode_cpu_s_per_pixel", "loadavg", "codec"}


def test_imagenet_like_photos_spread_and_determinism(tmp_path):
    a = write_imagenet_like(tmp_path / "a", count=40, seed=3)
    b = write_imagenet_like(tmp_path / "b", count=40, seed=3)
    files = sorted(p.relative_to(a) for p in a.rglob("*.jpg"))
    assert len(files) == 40 and files == sorted(p.relative_to(b) for p in b.rglob("*.jpg"))
    assert all(hashlib.sha256((a / f).read_bytes()).digest() == hashlib.sha256((b / f).read_bytes()).digest()
               for f in files)
    s = size_summary(a)
    assert LONG_SIDE[0] <= s["min_long_side"] and s["max_long_side"] <= LONG_SIDE[1]
    assert 420 <= s["median_long_side"] <= 580
    assert s["mean_bytes"] > 20_000            # photographs, not flat test patterns
    with Image.open(a / files[0]) as im:
        assert im.format == "JPEG" and im.mode == "RGB"
    longs = [max(Image.open(a / f).size) for f in files]
    assert len(set(longs)) > 10                # a spread, not one size


def test_quick_run_writes_the_rows(tmp_path):
    out = tmp_path / "rows.json"
    dp.main(["--quick", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and [r["name"] for r in rows] == ["today", "view_jpeg", "raw"]
    for r in rows:
        assert KEYS <= set(r), KEYS - set(r)
        assert r["images_per_s_per_core"] > 0 and r["bytes_per_sample"] > 0 and r["images"] == 48
    today, view, raw = rows
    assert today["codec"] == "fp16" and view["codec"] == raw["codec"] == "adapter"
    # what was read: fp16 tokens of three teachers alone are 547,603 B per sample
    assert today["bytes_per_sample"] > 547_603 and view["bytes_per_sample"] < raw["bytes_per_sample"]
    assert raw["bytes_per_sample"] > 224 * 224 * 3 and raw["pixels_per_sample"] == 0
    assert view["pixels_per_sample"] == 224 * 224 < today["pixels_per_sample"]
    assert today["decode_cpu_s_per_pixel"] > 0 and raw["decode_cpu_s_per_pixel"] is None
    assert np.isclose(today["x_today_per_core"], 1.0)

    # bench/projection.py reads the rows: every path is cached and bounded by one of its
    # resources; the raw path decodes nothing, the online baseline is the reference
    import bench.projection as pj
    proj = pj.main(["--datapath", str(out)])
    names = [p["name"] for p in proj]
    assert names[-1] == "online (baseline)" and np.isclose(proj[-1]["x_online"], 1.0)
    assert len(names) == 7 and all(p["bound"] in ("compute", "decode", "host CPU", "store read") for p in proj)
    by = {p["name"]: p for p in proj}
    assert by["cached, raw (adapter)"]["decode"] == 0.0
    assert by["cached, view_jpeg (adapter)"]["decode"] < by["cached, today (fp16)"]["decode"]
    assert all(p["hours"] == max(p["compute"], p["decode"], p["host CPU"], p["store read"]) for p in proj)
    # the projected sweep of K learners on the default path's data pass (bench/projection.py sweep_rows)
    sweep = pj.sweep_rows(by[pj.SWEEP_ROW])
    assert [s["k"] for s in sweep] == [1, 2, 4, 8] and np.isclose(sweep[0]["x_separate"], 1.0)
    assert all(s["hours"] == max(s["compute"], s["data"]) and s["x_separate"] <= 1.0 for s in sweep)
