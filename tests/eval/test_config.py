"""eval/config.py and core/options.py: one typed config per protocol, its defaults written once and
shown by the command, strict keys, checked values, derived values checked on load."""
import dataclasses

import click
import pytest
import yaml

from cli import main
from eval.config import CONFIGS, DetectionConfig, FinetuneConfig, LinearConfig


@pytest.mark.parametrize("task", sorted(CONFIGS))
def test_every_config_field_is_a_command_parameter_with_the_fields_default(task):
    command = main.commands["eval"].commands[task]
    params = {p.name: p for p in command.params}
    for f in dataclasses.fields(CONFIGS[task]):
        param = params[f.name]
        assert param.help if isinstance(param, click.Option) else param.metavar == "DATA", f.name
        if isinstance(param, click.Option) and not param.required:
            default = param.default if not isinstance(f.default, tuple) else tuple(param.default)
            assert default == f.default, (task, f.name, param.default, f.default)


def test_the_command_builds_the_config_the_dataclass_defaults_give(tmp_path):
    ck = tmp_path / "ck.pth"
    ck.write_bytes(b"x")
    command = main.commands["eval"].commands["detection"]
    ctx = command.make_context("detection", [str(tmp_path), "--checkpoint", str(ck), "--heads", "light",
                                             "--scale-range", "0.5", "1.5", "epochs=3"])
    from core.options import config_from

    values = {k: v for k, v in ctx.params.items() if k not in ("out", "device", "overrides", "resume")}
    cfg = config_from(DetectionConfig, values, ctx.params["overrides"])
    assert cfg == dataclasses.replace(DetectionConfig(), checkpoint=str(ck), data=str(tmp_path), heads="light",
                                      scale_range=(0.5, 1.5), epochs=3)


def test_bad_values_and_unknown_keys_are_refused_naming_the_key():
    base = dict(checkpoint="ck.pth", train="t", val="v")
    with pytest.raises(ValueError, match=r"unknown config key epoch; valid keys: \[.*'epochs'"):
        LinearConfig.from_dict({**base, "epoch": 3})
    with pytest.raises(ValueError, match=r"config optimizer=adam is not one of \['lars', 'sgd'\]"):
        LinearConfig.from_dict(base).override(["optimizer=adam"])
    with pytest.raises(ValueError, match="--batch-size 10 is not a multiple of --accum-iter 4"):
        FinetuneConfig.from_dict({**base, "batch_size": 10, "accum_iter": 4})
    with pytest.raises(ValueError, match="detection image size must be a multiple of 32, got 100"):
        DetectionConfig.from_dict(dict(checkpoint="ck.pth", data="d", image_size=100))
    with pytest.raises(ValueError, match="config checkpoint is required"):
        LinearConfig.from_dict(dict(train="t", val="v"))


def test_the_resolved_config_loads_back_and_an_edited_derived_lr_is_refused(tmp_path):
    cfg = LinearConfig.from_dict(dict(checkpoint="ck.pth", train="t", val="v", batch_size=512))
    assert cfg.derived() == {"lr": 0.1 * 512 / 256}
    cfg.save(tmp_path / "config.yaml")
    assert LinearConfig.load(tmp_path / "config.yaml") == cfg
    doc = yaml.safe_load((tmp_path / "config.yaml").read_text())
    doc["derived"]["lr"] = 1.0
    (tmp_path / "edited.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match=r"derived values are computed \(change blr or lr or batch_size"):
        LinearConfig.load(tmp_path / "edited.yaml")
