"""extract/config.py: one default per extraction setting, shared by the library and the CLI;
``extract --config FILE`` and ``KEY=VALUE`` set the job, which records it resolved beside the store."""
import dataclasses
import inspect
import typing

import re

import pytest
import yaml
from click.testing import CliRunner

from cli import main
from extract.config import ExtractConfig, config_path
from tests.conftest import one_error


def test_the_library_and_the_command_share_one_default_per_setting():
    from extract import estimate, runner
    from store import codecs, viewpixels

    params = {p.name: p for p in main.commands["extract"].params}
    for f in dataclasses.fields(ExtractConfig):
        p = params[f.name]
        if not p.required:
            default = tuple(p.default) if isinstance(f.default, tuple) else p.default
            assert default == f.default, (f.name, p.default, f.default)
    cfg = ExtractConfig()                     # the fast path (docs/running.md)
    assert (cfg.codec, cfg.view_pixels, cfg.views, cfg.decoder, cfg.device) == ("adapter", "jpeg", 4, "auto", "auto")
    hints = typing.get_type_hints(ExtractConfig)
    assert typing.get_args(hints["codec"]) == codecs.CODECS and cfg.pca_dim == codecs.PCA_DIM
    assert typing.get_args(hints["view_pixels"]) == ("none", *viewpixels.FORMS)
    # no competing defaults: the functions that run a job take the config, or every setting
    names = {f.name for f in dataclasses.fields(ExtractConfig)} | {"store_path", "num_threads", "decoder_settings"}
    for fn in (runner.run_extraction, runner._extract, estimate.estimate_run):
        defaulted = [n for n, p in inspect.signature(fn).parameters.items()
                     if p.default is not inspect.Parameter.empty and n in names]
        assert not defaulted, (fn.__name__, defaulted)
    assert list(inspect.signature(runner.run_extraction).parameters) == ["cfg", "teacher", "data", "progress"]


def test_config_file_options_and_overrides_set_the_job_and_the_store_records_it(
        prepared_data, tiny_random_init, tmp_path):
    from store.features import FeatureStore

    store = tmp_path / "store"
    (tmp_path / "extract.yaml").write_text("codec: fp16\nview_pixels: none\nviews: 3\nbatch_size: 8\n"
                                           "stats_images: 13\ndecoder: pil\n")
    r = CliRunner().invoke(main, ["extract", "--teacher", "mae", "--data", str(prepared_data), "--store", str(store),
                                  "--random-init", "--device", "cpu", "--max-blocks", "1", "--batch-size", "4",
                                  "--config", str(tmp_path / "extract.yaml"), "views=2", "stats_images=5"])
    assert r.exit_code == 0, (r.output, r.exception)
    recorded = yaml.safe_load(config_path(store, "mae").read_text())
    # the file, then the options given (an option at its default changes nothing), then KEY=VALUE
    assert {k: recorded[k] for k in ("codec", "view_pixels", "views", "batch_size", "stats_images", "max_blocks")} \
        == dict(codec="fp16", view_pixels="none", views=2, batch_size=4, stats_images=5, max_blocks=1)
    assert recorded == dataclasses.replace(
        ExtractConfig(), teacher="mae", data=str(prepared_data), store=str(store), random_init=True,
        device="cpu", decoder="pil", codec="fp16", view_pixels="none", views=2, batch_size=4, stats_images=5,
        max_blocks=1).to_dict()
    assert ExtractConfig.load(config_path(store, "mae")).to_dict() == recorded       # it loads back
    fs = FeatureStore.open(store)
    ts = fs.teacher("mae")
    assert fs.views == 2 and ts.config["codec"] == "fp16" and int(ts.stats["count"]) // (1 + ts.n_visible) == 5
    assert int((ts.complete_matrix() > 0).sum()) == 1                                # --max-blocks 1
    assert sorted(p.name for p in store.iterdir()) == ["mae", "zarr.json"]          # nothing else inside


def test_unknown_or_mistyped_keys_are_refused_in_one_line_naming_them(prepared_data, tmp_path):
    base = ["extract", "--teacher", "mae", "--data", str(prepared_data), "--store", str(tmp_path / "store"),
            "--random-init", "--device", "cpu"]
    for extra, named in ((["no_such_key=1"], ["unknown config key no_such_key", "view_pixels"]),
                         (["views=two"], ["views=two"]),
                         (["codec=png"], ["codec=png", "adapter"])):
        one_error(base + extra, *named, code=1)
    (tmp_path / "bad.yaml").write_text("codecs: fp16\n")
    r = CliRunner().invoke(main, base + ["--config", str(tmp_path / "bad.yaml")])
    assert r.exit_code == 1 and "unknown config key codecs" in r.output and "bad.yaml" in r.output, r.output
    assert not (tmp_path / "store").exists() and not config_path(tmp_path / "store", "mae").exists()


def test_a_job_refuses_a_config_of_another_teacher_or_data_and_records_the_teacher_it_ran(prepared_data, tmp_path):
    from data.shards import ImageSet

    data = ImageSet.open(prepared_data)
    teacher = type("Teacher", (), {"name": "mae", "untrained": False, "source": "/ckpt/mae.pth"})()
    with pytest.raises(ValueError, match="config teacher=ibot but the teacher given is mae"):
        ExtractConfig(teacher="ibot", store="s").resolved(teacher=teacher, data=data)
    with pytest.raises(ValueError, match=re.escape(f"config data={tmp_path} but the images given are")):
        ExtractConfig(data=str(tmp_path), store="s").resolved(teacher=teacher, data=data)
    with pytest.raises(ValueError, match="config store is required"):
        ExtractConfig().resolved(teacher=teacher, data=data)
    cfg = ExtractConfig(store=tmp_path / "s", random_init=True, decoder="pil", device="cpu").resolved(
        teacher=teacher, data=data)
    assert (cfg.teacher, cfg.checkpoint, cfg.random_init) == ("mae", "/ckpt/mae.pth", False)   # as built
    assert (cfg.store, cfg.data) == (str(tmp_path / "s"), str(data.root))
