"""DALI is an optional extra (``pip install '.[dali]'``): with it made unimportable, every command
of the chain runs on PIL under its default decoder (``auto``), the run records the decoder it
used, and asking for DALI ends in one ``Error:`` line naming the extra. No project module
imports DALI when it is imported.

DALI is made unimportable in this process (``without_dali``: every ``nvidia.dali*`` module
dropped from ``sys.modules`` and ``nvidia.dali`` set to None, so that an import of it, or of
any of its submodules, raises ImportError, and ``importlib.util.find_spec`` finds nothing), as
on a machine where it was never installed. The chain runs on the 13 bundled photos with a
tiny teacher (``extract --random-init`` under ``tiny_random_init``) and a two-block ViT-Tiny student.
"""
from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cli import main
from data.decoders import DALI_EXTRA, DaliMissing, dali_installed, resolve_decoder
from tests.conftest import one_error

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def without_dali(monkeypatch):
    for name in [m for m in sys.modules if m == "nvidia.dali" or m.startswith("nvidia.dali.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    assert not dali_installed()
    with pytest.raises(ImportError):
        from nvidia.dali import fn  # noqa: F401


def _invoke(*args) -> str:
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, (args, r.output, r.exception)
    return r.output


TINY_STUDENT = ["model.depth=2", "decoder.depth=1", "data.teachers=[mae]", "data.num_workers=1",
                "data.shuffle_window=2", "train.log_every=1"]


def test_the_whole_cli_chain_runs_on_pil_without_dali(without_dali, tiny_random_init, photo_tree, tmp_path):
    data, store, run, student = tmp_path / "data", tmp_path / "store", tmp_path / "run", tmp_path / "s.safetensors"
    _invoke("prepare", photo_tree, data, "--shard-size", 5, "--workers", 0, "--no-progress")
    out = _invoke("extract", "--teacher", "mae", "--data", data, "--store", store, "--random-init", "--views", 2,
                  "--batch-size", 13, "--device", "cpu")
    assert "mae: 6 blocks written" in out and "(decoder pil)" in out, out
    assert "OK:" in _invoke("verify", store, "--data", data)
    _invoke("train", "--data", data, "--store", store, "--out", run, "--steps", 2, "--batch-size", 4,
            "--device", "cpu", *TINY_STUDENT)
    recorded = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert recorded["decoder"] == "pil"                    # auto, resolved and recorded
    _invoke("export", run, student)
    _invoke("eval", "knn", "--checkpoint", student, "--model-arg", "depth=2", "--train", data, "--val", photo_tree,
            "--workers", 0, "--batch-size", 13, "--device", "cpu", "--out", tmp_path / "knn")
    assert 0 <= json.loads((tmp_path / "knn" / "result.json").read_text())["metrics"]["top1"] <= 100
    assert sys.modules["nvidia.dali"] is None              # nothing found another way to DALI


def test_asking_for_dali_without_it_ends_in_one_line_naming_the_extra(without_dali, tiny_random_init,
                                                                     prepared_data, teacher_store, tmp_path):
    from data.decode import DaliViewDecoder, make_decoder
    from data.decode.stored import make_view_decoder

    line = one_error(("extract", "--teacher", "mae", "--data", prepared_data, "--store", tmp_path / "store",
                      "--random-init", "--views", 2, "--decoder", "dali", "--device", "cpu"), code=1, alone=True)
    assert DALI_EXTRA in line and "decoder=dali" in line, line
    assert line == one_error(("train", "--data", prepared_data, "--store", teacher_store, "--out", tmp_path / "run",
                              "--steps", 1, "--batch-size", 4, "--device", "cpu", "data.decoder=dali", *TINY_STUDENT),
                              code=1, alone=True)
    for make in (lambda: make_decoder("dali", batch_size=2, device="cpu"),
                 lambda: DaliViewDecoder(batch_size=2, device="cpu"),
                 lambda: make_view_decoder("jpeg", "dali", batch_size=2)):      # the stored-view decoder
        with pytest.raises(DaliMissing) as e:
            make()
        assert f"Error: {e.value}" == line and isinstance(e.value, ImportError)
    assert not (tmp_path / "run").exists()                 # refused before the run folder is made


def test_auto_is_pil_without_dali_and_dali_with_it_in_every_command_and_the_demo(without_dali, monkeypatch):
    from data.decode import make_decoder, pil_views
    from data.decode.stored import make_view_decoder, pil_stored_views

    assert resolve_decoder("auto") == "pil" and resolve_decoder("dali") == "dali"
    assert make_decoder("auto", batch_size=2, device="cpu").func is pil_views      # on its thread pool
    assert resolve_decoder("auto", device="cuda:0") == "torchvision"
    assert make_view_decoder("jpeg", "auto", batch_size=2).func is pil_stored_views
    from demo.stages import DemoSettings                  # the demo too (its OUT/config.yaml records which)
    assert DemoSettings().validate().decoder == "pil"
    monkeypatch.undo()                                     # DALI back
    assert dali_installed() and resolve_decoder("auto") == "dali"
    assert DemoSettings().validate().decoder == "dali" and DemoSettings(decoder="pil").validate().decoder == "pil"
    with pytest.raises(ValueError, match="unknown decoder 'nvjpeg'; choose one of auto, dali, pil"):
        resolve_decoder("nvjpeg")


def test_a_run_records_its_decoder_and_a_resumed_run_keeps_the_recorded_one(prepared_data, teacher_store,
                                                                            monkeypatch):
    from data.shards import ImageSet
    from train.config import load_config
    from train.loader import resolve_data

    data = ImageSet.open(prepared_data)
    auto = load_config(None, [f"data.images={prepared_data}", f"data.store={teacher_store}", "train.batch_size=4"])
    assert auto.data.decoder == "auto"                     # the default
    assert resolve_data(auto, data).data.decoder == "dali"
    assert resolve_data(auto, data, recorded={"decoder": "pil"}).data.decoder == "pil"
    for name in [m for m in sys.modules if m.startswith("nvidia.dali")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    assert resolve_data(auto, data).data.decoder == "pil"
    # a run started on DALI asks for DALI again (and fails in one line), never falls back to PIL
    assert resolve_data(auto, data, recorded={"decoder": "dali"}).data.decoder == "dali"
    explicit = load_config(None, [f"data.images={prepared_data}", f"data.store={teacher_store}",
                                  "train.batch_size=4", "data.decoder=dali"])
    assert resolve_data(explicit, data, recorded={"decoder": "pil"}).data.decoder == "dali"


def _module_level_dali_imports(path: Path) -> list[int]:
    """Lines of ``path`` that import nvidia.dali outside any function (run on import)."""
    found = []

    def visit(node, in_function: bool):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function = True
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if not in_function and any(n == "nvidia.dali" or n.startswith("nvidia.dali.") for n in names):
            found.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child, in_function)
    visit(ast.parse(path.read_text(), filename=str(path)), False)
    return found


def test_no_module_of_the_project_imports_dali_when_it_is_imported(tmp_path):
    probe = tmp_path / "probe.py"         # what the check finds: imports run on import, at any depth
    probe.write_text("import os, nvidia.dali as dali\ntry:\n    from nvidia.dali.fn import readers\n"
                     "except ImportError:\n    pass\nclass A:\n    from nvidia.dali import types\n"
                     "def f():\n    from nvidia.dali import fn\nimport nvidia.dalix\n")
    assert _module_level_dali_imports(probe) == [1, 3, 7]
    files = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "__pycache__")]
        files += [Path(folder) / n for n in names if n.endswith(".py")]
    assert len(files) > 50 and ROOT / "bench" / "gpu_sections.py" in files
    offenders = {str(p.relative_to(ROOT)): lines for p in files if (lines := _module_level_dali_imports(p))}
    assert offenders == {}
