"""A sweep: K learners, each the base config plus a variant's overrides, trained against one data
pass (train/loop.py runs them): parsing and checking the variants (``--variant`` or a sweep file),
the sweep folder's records and its report (sweep.md, sweep.json, losses.png). What a learner may
vary and what the folder holds: docs/running.md, "Ablations as one sweep"."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import yaml

from core.io import write_atomic
from core.run import read_metrics

__all__ = ["Variant", "parse_variant", "load_sweep", "check_variants", "check_sweep_folder", "write_sweep",
           "recorded_variants", "write_report", "check_heldout", "heldout_columns", "SWEEP", "STOPPED"]

SWEEP, STOPPED = "sweep.yaml", "stopped.txt"

# A variant may set ``data.student_visible`` (its own masks); any other key under these prefixes,
# or one of these keys, is the shared data pass or the loop's cadence.
_SHARED_PREFIXES = ("data.",)
_OWN_DATA_KEYS = ("data.student_visible",)
_SHARED_KEYS = ("train.batch_size", "schedule.epochs", "train.log_every", "train.ckpt_every", "train.out_dir",
                "train.wandb", "train.wandb_project", "train.snapshot_every", "train.snapshot_full")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")


@dataclass(frozen=True)
class Variant:
    """One learner of a sweep: its name (its sub-folder) and its ``key=value`` overrides."""
    name: str
    overrides: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {"name": self.name, "overrides": list(self.overrides)}


def parse_variant(text: str) -> Variant:
    """``[NAME:]KEY=VALUE[ KEY=VALUE ...]`` -> Variant; without NAME the name is the overrides
    joined by '_', '=' and what a folder name should not hold shown as '-' (``gate.mode=uniform``
    -> ``gate.mode-uniform``)."""
    name, sep, rest = text.partition(":")
    if not sep or "=" in name:
        name, rest = "", text
    overrides = tuple(rest.split())
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"--variant {text!r}: {bad[0]!r} is not KEY=VALUE")
    if not name:
        if not overrides:
            raise ValueError(f"--variant {text!r} has neither a name nor an override")
        name = re.sub(r"[^A-Za-z0-9._+-]+", "-", "_".join(o.replace("=", "-") for o in overrides)).strip("-")
    return Variant(name, overrides)


def _override(key: str, value) -> str:
    """``key=value`` with the value written as YAML flow (a list stays a list)."""
    return f"{key}={json.dumps(value) if not isinstance(value, str) else value}"


def load_sweep(path) -> list[Variant]:
    """The variants of a sweep file, in order; ValueError naming the file. The file is::

        learners:
          uniform: {gate.mode: uniform}
          mask80: {data.student_visible: 39}
          base: {}
    """
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not YAML ({str(error).splitlines()[0]})") from None
    learners = doc.get("learners") if isinstance(doc, Mapping) else None
    if not isinstance(learners, Mapping) or not learners:
        raise ValueError(f"{path}: needs a 'learners:' mapping of NAME: {{KEY: VALUE, ...}}")
    out = []
    for name, overrides in learners.items():
        if not isinstance(overrides, Mapping):
            raise ValueError(f"{path}: learner {name!r} must map dotted keys to values, e.g. {{gate.mode: uniform}}")
        out.append(Variant(str(name), tuple(_override(str(k), v) for k, v in overrides.items())))
    return out


def check_variants(variants: Sequence[Variant]) -> None:
    """Refuse, in one line, a sweep without learners, a repeated or unusable name, or a variant
    that sets a shared key: every ``data.*`` key but ``data.student_visible`` (the data pass) and
    the global batch, epochs and the loop's logging and checkpoint cadence."""
    if not variants:
        raise ValueError("a sweep needs at least one learner (--variant or --sweep)")
    seen = set()
    for v in variants:
        for o in v.overrides:
            key = o.split("=", 1)[0].strip()
            shared = key in _SHARED_KEYS or (key.startswith(_SHARED_PREFIXES) and key not in _OWN_DATA_KEYS)
            if shared:
                raise ValueError(f"learner {v.name!r} sets {key}: the learners of a sweep share the data pass "
                                 "(data, batch, epochs) and its logging and checkpoint intervals; set it for "
                                 "the whole sweep or train it as its own run")
        if not _NAME.match(v.name):
            raise ValueError(f"learner name {v.name!r}: use letters, digits and . _ = + - (it names a folder)")
        if v.name in seen:
            raise ValueError(f"two learners are named {v.name!r}; name them (--variant NAME:KEY=VALUE)")
        seen.add(v.name)


def recorded_variants(out) -> list[Variant] | None:
    """The learners a sweep folder records (its sweep.yaml), or None when ``out`` is no sweep."""
    path = Path(out) / SWEEP
    if not path.is_file():
        return None
    doc = yaml.safe_load(path.read_text()) or {}
    return [Variant(d["name"], tuple(d.get("overrides") or ())) for d in doc.get("learners", [])]


def check_sweep_folder(out, variants: Sequence[Variant], *, resume: bool) -> None:
    """A new sweep needs a folder without a sweep.yaml (FileExistsError), a resume the same
    learners as it records (ValueError). Every rank checks before rank 0 writes."""
    out = Path(out)
    saved = recorded_variants(out)
    if not resume and saved is not None:
        raise FileExistsError(f"{out} already holds a sweep ({SWEEP}); pass --resume to continue it or "
                              "choose another --out")
    if resume and saved is not None and saved != list(variants):
        raise ValueError(f"cannot resume the sweep in {out}: it has learners "
                         f"{[v.as_dict() for v in saved]}, now {[v.as_dict() for v in variants]}")


def write_sweep(out, variants: Sequence[Variant]) -> None:
    """Record the learners, in order, in OUT/sweep.yaml."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / SWEEP, yaml.safe_dump({"learners": [v.as_dict() for v in variants]}, sort_keys=False))


_COLUMNS = ("loss", "loss_token", "loss_spatial", "loss_recon")


def write_report(out, variants: Sequence[Variant], *, status: Mapping[str, str], extra: Mapping | None = None) -> Path:
    """OUT/sweep.json and OUT/sweep.md: one row per learner (its overrides, status, steps and last
    logged losses, plus ``extra[name]``'s columns: ``heldout_columns``) and OUT/losses.png,
    every learner's loss curves in one figure. Returns the path of sweep.md."""
    from train.plots import plot_losses

    out = Path(out)
    rows, curves = [], {}
    for v in variants:
        metrics = read_metrics(out / v.name / "metrics.jsonl")
        curves[v.name] = metrics
        last = metrics[-1] if metrics else {}
        row = {"learner": v.name, "overrides": " ".join(v.overrides) or "(base)", "status": status.get(v.name, "?"),
               "steps": last.get("step", 0), **{k: last[k] for k in _COLUMNS if k in last}}
        row.update((extra or {}).get(v.name, {}))
        rows.append(row)
    write_atomic(out / "sweep.json", json.dumps(rows, indent=2) + "\n")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(k, "")) for k in keys) + " |")
    write_atomic(out / "sweep.md", "\n".join(lines) + "\n")
    plot_losses(curves, out / "losses.png")
    return out / "sweep.md"


def check_heldout(store, data, *, train, teachers) -> tuple:
    """Before any training: the held-out ``store`` (a path) must be extracted from the images
    ``data`` (a path), hold ``teachers`` and, for a coefficient codec, be on the basis of the
    training store ``train`` (a FeatureStore, or the run's RunStore; None: the run has none);
    else StoreError. Returns (the held-out FeatureStore, its ImageSet), each opened once, for
    ``heldout_columns``."""
    from data.shards import ImageSet
    from store.features import DataInfo, FeatureStore, StoreError
    from train.requirements import check_same_basis
    from train.runstore import RunStore

    if train is None:
        raise ValueError("--heldout reads the held-out store with the adapters of the training store: set data.store")
    ref = train.fs if isinstance(train, RunStore) else train
    try:
        images = ImageSet.open(data)
        held = FeatureStore.open(store, data=DataInfo.of(images))
    except StoreError as error:
        raise StoreError(f"--heldout: {error}\n  (DATA must be the images the held-out store was extracted "
                         "from)") from None
    for name in teachers:
        check_same_basis(held.teacher(name), ref.teacher(name))
    return held, images


def heldout_columns(out, variants: Sequence[Variant], status: Mapping[str, str], *, store, data, train_store,
                    device: str = "cpu", images: int | None = None, batch: int = 32) -> dict[str, dict]:
    """{learner: {"heldout_images", "heldout_token", "heldout_spatial", "heldout_total",
    "heldout_untrained"}} of every finished learner: its objective's losses (train/diagnostics.py
    heldout_losses: student-free fused targets) on every sample of the held-out ``store`` (the
    first ``images`` if given; view 0, epoch 0 masks, the same for every learner) of the images
    ``data``, and those of its untrained student. The mean over batches of ``batch`` samples,
    weighted by their sizes; ``heldout_images`` is how many were scored. ``store``, ``data``:
    what ``check_heldout`` opened and checked against ``train_store``, the training FeatureStore,
    whose statistics build the learners' adapters."""
    import numpy as np
    import torch

    from train import diagnostics as diag
    from train.config import teacher_names

    index = np.arange(len(data) if images is None else min(images, len(data)))
    samples, cols = None, {}
    for v in variants:
        if status.get(v.name) != "done":
            continue
        cfg, trained = diag.load_run(Path(out) / v.name, device=device, store=train_store)
        _, untrained = diag.load_run(Path(out) / v.name, device=device, store=train_store, trained=False)
        names = list(teacher_names(cfg))
        if samples is None:             # the learners share the data, so their teachers (basis: check_heldout)
            samples = diag.load_samples(store, data, indices=index, epoch=0, teachers=names)
        sums = dict.fromkeys(("heldout_token", "heldout_spatial", "heldout_total", "heldout_untrained"), 0.0)
        with torch.no_grad():
            for i in range(0, len(samples), batch):
                part = samples[i:i + batch]
                losses = diag.heldout_losses(trained, untrained, diag.sample_batch(part, names, device=device))
                for key, value in (("heldout_token", losses["trained"]["token"]),
                                   ("heldout_spatial", losses["trained"]["spatial"]),
                                   ("heldout_total", losses["trained"]["total"]),
                                   ("heldout_untrained", losses["untrained"]["total"])):
                    sums[key] += value * len(part)
        cols[v.name] = {"heldout_images": len(samples), **{k: total / len(samples) for k, total in sums.items()}}
    return cols


def _cell(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
