"""train/config.py: defaults from docs/method.md, strict keys, typed overrides, round trips."""
from __future__ import annotations

import pytest
import yaml

from train.config import Config, apply_overrides, load_config


def test_defaults_are_methods_values_and_lr_is_derived_from_batch():
    cfg = Config()
    assert (cfg.gate.mode, cfg.gate.tau) == ("consensus", 0.1)
    assert (cfg.loss.kind, cfg.loss.tau, cfg.loss.tau_spatial, cfg.loss.spatial_weight) == ("kl", 1.0, 4.0, 1.0)
    assert (cfg.decoder.depth, cfg.decoder.width, cfg.decoder.num_heads) == (2, 192, 3)
    assert (cfg.model.arch, cfg.model.embed_dim, cfg.model.depth) == ("vit_tiny_patch16_224", 192, 12)
    assert (cfg.adapters.mode, cfg.adapters.in_dim) == ("frozen", None)      # each teacher's own width
    from train.objective import teacher_widths
    assert teacher_widths(cfg) == {"mae": 768, "mocov3": 768, "ibot": 768}
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0.05
    assert (cfg.schedule.epochs, cfg.train.batch_size) == (300, 4096)
    from train.config import teacher_names
    assert cfg.data.teachers == "auto" and teacher_names(cfg) == ("mae", "mocov3", "ibot")   # without a store
    assert (cfg.data.views, cfg.data.streams, cfg.data.student_visible) == ("auto", "auto", 49)
    assert cfg.train.clip_grad == 0.0
    assert cfg.derived()["lr"] == pytest.approx(1.5e-4 * 4096 / 256)
    assert apply_overrides(cfg, ["train.batch_size=256"]).derived()["lr"] == pytest.approx(1.5e-4)


def test_unknown_key_error_names_the_key_and_lists_the_valid_ones():
    with pytest.raises(ValueError) as e:
        load_config(overrides=["gate.temperature=0.2"])
    msg = str(e.value)
    assert "gate.temperature" in msg and "'mode'" in msg and "'tau'" in msg
    with pytest.raises(ValueError, match=r"unknown config section 'gates'.*'gate'"):
        load_config(overrides=["gates.mode=uniform"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(overrides=["gate_mode=uniform"])


def test_unknown_key_in_yaml_file_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("loss:\n  lamda: 2.0\n")
    with pytest.raises(ValueError) as e:
        load_config(path)
    assert str(path) in str(e.value) and "loss.lamda" in str(e.value) and "spatial_weight" in str(e.value)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_are_converted_to_the_field_types():
    cfg = load_config(overrides=[
        "optim.base_lr=1e-4",          # YAML 1.1 reads this as a string: must become a float
        "loss.spatial_weight=2",       # int accepted for a float
        "train.batch_size=512",
        "train.compile=true",
        "data.teachers=mae,ibot",
        "optim.betas=[0.9, 0.99]",
        "gate.mode=uniform",
        "data.store=/data/feat-123",
        "model.checkpoint=",
    ])
    assert cfg.optim.base_lr == 1e-4 and isinstance(cfg.optim.base_lr, float)
    assert cfg.loss.spatial_weight == 2.0 and isinstance(cfg.loss.spatial_weight, float)
    assert cfg.train.batch_size == 512 and cfg.train.compile is True
    assert cfg.data.teachers == ("mae", "ibot") and cfg.optim.betas == (0.9, 0.99)
    assert cfg.gate.mode == "uniform" and cfg.data.store == "/data/feat-123"
    assert cfg.model.checkpoint == ""
    assert load_config(overrides=["data.store=123"]).data.store == "123"


@pytest.mark.parametrize("override, pattern", [
    ("train.batch_size=1.5", r"train.batch_size=1.5 is not a valid int"),
    ("train.batch_size=true", r"train.batch_size=true is not a valid int"),
    ("train.compile=3", r"train.compile=3 is not a valid bool"),
    ("optim.base_lr=fast", r"optim.base_lr=fast is not a valid float"),
    ("optim.betas=[0.9]", r"optim.betas"),
    ("gate.mode=softmax", r"gate.mode='softmax' is not one of \['uniform', 'affinity', 'agreement', 'consensus'\]"),
    ("data.teachers=mae,clip", r"unknown teacher 'clip'"),
    ("gate.tau=0", r"gate.tau=0.0 must be > 0"),
    ("model.num_heads=5", r"not divisible"),
])
def test_bad_override_values_are_refused_with_the_key(override, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_config(overrides=[override])


def test_yaml_file_applies_before_command_line_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("gate:\n  mode: affinity\n  tau: 0.05\nloss:\n  kind: mse\n")
    cfg = load_config(path, overrides=["gate.mode=uniform"])
    assert (cfg.gate.mode, cfg.gate.tau, cfg.loss.kind) == ("uniform", 0.05, "mse")
    assert cfg.loss.tau_spatial == 4.0  # untouched keys keep their defaults


def test_to_dict_from_dict_and_yaml_dump_round_trip(tmp_path):
    cfg = load_config(overrides=["gate.mode=agreement", "data.teachers=ibot,dino",
                                 "optim.betas=0.8,0.9", "train.batch_size=1024"])
    again = Config.from_dict(cfg.to_dict())
    assert again == cfg
    assert yaml.safe_load(yaml.safe_dump(cfg.to_dict())) == cfg.to_dict()  # YAML-safe values
    cfg.save(tmp_path / "resolved.yaml")
    loaded = load_config(tmp_path / "resolved.yaml")
    assert loaded == cfg and loaded.derived() == cfg.derived()
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["derived"]["lr"] == pytest.approx(6e-4)


def test_editing_a_derived_value_in_a_dump_is_refused(tmp_path):
    doc = yaml.safe_load(Config().to_yaml())
    doc["derived"]["lr"] = 1.0
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match="derived"):
        load_config(path)
