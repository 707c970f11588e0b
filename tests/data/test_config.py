"""data/config.py: one default per prepare setting, shared by the library and the CLI; ``prepare
--config FILE`` and ``KEY=VALUE`` set the job, which records it resolved as OUT/prepare.yaml."""
import dataclasses
import inspect

import pytest
import yaml
from click.testing import CliRunner

from cli import main
from data.config import RESOLVED, PrepareConfig
from tests.conftest import one_error


def test_the_library_and_the_command_share_one_default_per_setting():
    from data.pack import prepare, run_prepare

    params = {p.name: p for p in main.commands["prepare"].params}
    for f in dataclasses.fields(PrepareConfig):
        if not params[f.name].required:
            assert params[f.name].default == f.default, (f.name, params[f.name].default, f.default)
    names = {f.name for f in dataclasses.fields(PrepareConfig)}
    for fn in (prepare, run_prepare):
        assert not names & {n for n, p in inspect.signature(fn).parameters.items()
                            if p.default is not inspect.Parameter.empty}, fn.__name__


def test_config_file_options_and_overrides_set_the_job_and_out_records_it(photo_tree, tmp_path):
    from data.shards import ImageSet

    (tmp_path / "prepare.yaml").write_text("seed: 3\nshard_size: 7\nworkers: 2\n")
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["prepare", str(photo_tree), str(out), "--config", str(tmp_path / "prepare.yaml"),
                                  "--workers", "0", "--no-progress", "shard_size=4"])
    assert r.exit_code == 0, (r.output, r.exception)
    recorded = yaml.safe_load((out / RESOLVED).read_text())
    assert recorded == dict(src=str(photo_tree), out=str(out), shard_size=4, seed=3, pattern=None, labels="auto",
                            skip_bad=False, workers=0)
    ds = ImageSet.open(out)
    assert ds.meta["shard_size"] == 4 and ds.meta["order"]["seed"] == 3            # what the job did
    assert PrepareConfig.load(out / RESOLVED).to_dict() == recorded                   # it loads back


def test_unknown_or_mistyped_keys_are_refused_in_one_line_naming_them(photo_tree, tmp_path):
    from data.pack import prepare

    base = ["prepare", str(photo_tree), str(tmp_path / "out"), "--no-progress"]
    for extra, named in ((["shard_sise=4"], ["unknown config key shard_sise", "shard_size"]),
                         (["seed=-1"], ["seed=-1", ">= 0"]),
                         (["workers=many"], ["workers=many"])):
        one_error(base + extra, *named, code=1)
    (tmp_path / "bad.yaml").write_text("shards: 4\n")
    r = CliRunner().invoke(main, base + ["--config", str(tmp_path / "bad.yaml")])
    assert r.exit_code == 1 and "unknown config key shards" in r.output and "bad.yaml" in r.output, r.output
    with pytest.raises(ValueError, match="unknown config key shard_sise"):       # the keyword form alike
        prepare(photo_tree, tmp_path / "out", shard_sise=4)
    with pytest.raises(ValueError, match="config shard_size=0 must be >= 1"):
        prepare(photo_tree, tmp_path / "out", shard_size=0)
    assert not (tmp_path / "out").exists()
