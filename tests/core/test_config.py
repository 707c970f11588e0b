"""core/config.py: a generic typed config (flat keys, nested sections, Literal, Optional)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

import pytest
import yaml

from core.config import TypedConfig, flatten


@dataclass
class Inner:
    depth: int = 2
    names: tuple[str, ...] = ("a", "b")


@dataclass
class Optim:
    lr: float = 1e-3
    kind: Literal["sgd", "adamw"] = "sgd"
    inner: Inner = field(default_factory=Inner)


@dataclass
class Job(TypedConfig):
    batch: int = 8
    checkpoint: Optional[str] = None
    optim: Optim = field(default_factory=Optim)

    derived_inputs: ClassVar = ("optim.lr", "batch")

    def derived(self):
        return {"scaled_lr": self.optim.lr * self.batch}

    def validate(self):
        if self.batch <= 0:
            raise ValueError(f"config batch={self.batch} must be > 0")
        return self


def test_overrides_reach_any_depth_and_are_typed():
    cfg = Job.load(overrides=["batch=16", "optim.kind=adamw", "optim.inner.depth=3",
                              "optim.inner.names=x,y,z", "checkpoint=/tmp/c.pt", "optim.lr=1e-4"])
    assert (cfg.batch, cfg.optim.kind, cfg.optim.inner.depth) == (16, "adamw", 3)
    assert cfg.optim.inner.names == ("x", "y", "z") and cfg.checkpoint == "/tmp/c.pt"
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert Job.load(overrides=["checkpoint=null"]).checkpoint is None
    assert Job().derived() == {"scaled_lr": pytest.approx(8e-3)}


@pytest.mark.parametrize("override, pattern", [
    ("batsh=3", r"unknown config key batsh; valid keys: \['batch', 'checkpoint', 'optim'\]"),
    ("optim.momentum=0.9", r"unknown config key optim.momentum; valid keys in 'optim': \['lr', 'kind', 'inner'\]"),
    ("optim.inner.width=3", r"unknown config key optim.inner.width; valid keys in 'optim.inner': \['depth', 'names'\]"),
    ("optim.kind=adam", r"optim.kind=adam is not one of \['sgd', 'adamw'\]"),
    ("optim=3", r"must look like key or section.key=value"),
    ("batch.x=3", r"must look like"),
    ("batch=0", r"batch=0 must be > 0"),
    ("optim.inner.depth=two", r"optim.inner.depth=two is not a valid int"),
])
def test_bad_keys_and_values_are_refused_naming_the_key(override, pattern):
    with pytest.raises(ValueError, match=pattern):
        Job.load(overrides=[override])


def test_yaml_round_trip_records_and_checks_the_derived_values(tmp_path):
    cfg = Job.load(overrides=["optim.inner.names=q", "batch=4"])
    path = tmp_path / "resolved.yaml"
    cfg.save(path)
    doc = yaml.safe_load(path.read_text())
    assert doc["derived"] == {"scaled_lr": pytest.approx(4e-3)} and doc["optim"]["inner"]["names"] == ["q"]
    assert Job.load(path) == cfg and Job.from_dict(cfg.to_dict()) == cfg
    assert flatten(cfg.to_dict())["optim.inner.depth"] == 2
    doc["derived"]["scaled_lr"] = 1.0
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match=r"derived.*change optim.lr or batch instead"):
        Job.load(path)
    path.write_text("optim:\n  inner:\n    colour: red\n")
    with pytest.raises(ValueError, match=rf"{path}: unknown config key optim.inner.colour"):
        Job.load(path)
