"""A sweep: K learners trained against one data pass (train/loop.py runs them).

A learner is the base config plus a variant's overrides, e.g. ``gate.mode=uniform``. Everything a
learner owns may vary: the student (``model.*``), decoder, adapters, gate, loss, optimiser,
schedule shape, seed, and the student's mask ratio (``data.student_visible``: its masks are
drawn from the same keyed draw a single run with that ratio makes). What the learners share may
not: the data pass (every other ``data.*`` key, the global batch, the epochs) and the loop's own
cadence (logging and checkpoint intervals); a variant that sets one is refused naming the key.

On the command line a variant is ``[NAME:]KEY=VALUE[ KEY=VALUE ...]`` (``--variant
uniform:gate.mode=uniform``; without a name, one is made of its overrides); in a sweep file it is
one entry of::

    learners:
      uniform: {gate.mode: uniform}
      mse: {loss.kind: mse}
      mask80: {data.student_visible: 39}
      base: {}

The run folder R of a sweep holds ``sweep.yaml`` (the learners, in order; a resume must give the
same, and ``--resume`` alone reads them from it), one ordinary run folder per learner (R/NAME:
config.yaml, metrics.jsonl, TensorBoard events, last.pt, student.safetensors: ``export`` and
``eval`` take it as any run), and the sweep's report: ``sweep.md`` and ``sweep.json`` (one row per
learner) and ``losses.png`` (every learner's curves in one figure).
"""
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
                "train.wandb", "train.wandb_project")
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
    """The variants of a sweep file (see the module docstring); ValueError naming the file."""
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
    that sets a shared key (the module docstring)."""
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


def check_heldout(store, data, *, train_store, teachers) -> None:
    """Before any training: the held-out ``store`` must be extracted from the images ``data``, hold
    ``teachers`` and, for a coefficient codec, be on the training store's basis; else StoreError."""
    from store.features import DataInfo, FeatureStore, StoreError
    from data.shards import ImageSet
    from train.requirements import check_same_basis

    try:
        held = FeatureStore.open(store, data=DataInfo.of(ImageSet.open(data)))
    except StoreError as error:
        raise StoreError(f"--heldout: {error}\n  (DATA must be the images the held-out store was extracted "
                         "from)") from None
    ref = FeatureStore.open(train_store)
    for name in teachers:
        check_same_basis(held.teacher(name), ref.teacher(name))


def heldout_columns(out, variants: Sequence[Variant], status: Mapping[str, str], *, store, data, train_store,
                    device: str = "cpu", images: int | None = None, batch: int = 32) -> dict[str, dict]:
    """{learner: {"heldout_images", "heldout_token", "heldout_spatial", "heldout_total",
    "heldout_untrained"}} of every finished learner: its objective's losses (train/diagnostics.py
    heldout_losses: student-free fused targets) on every sample of the held-out ``store`` (the
    first ``images`` if given; view 0, epoch 0 masks, the same for every learner) of the images
    ``data``, and those of its untrained student. The mean over batches of ``batch`` samples,
    weighted by their sizes; ``heldout_images`` is how many were scored."""
    import numpy as np
    import torch

    from data.shards import ImageSet
    from train import diagnostics as diag
    from train.config import teacher_names

    held = ImageSet.open(data)
    index = np.arange(len(held) if images is None else min(images, len(held)))
    samples, cols = None, {}
    for v in variants:
        if status.get(v.name) != "done":
            continue
        cfg, trained = diag.load_run(Path(out) / v.name, device=device, store_path=train_store)
        _, untrained = diag.load_run(Path(out) / v.name, device=device, store_path=train_store, trained=False)
        names = list(teacher_names(cfg))
        if samples is None:             # the learners share the data, so their teachers
            samples = diag.load_samples(store, held, indices=index, epoch=0, teachers=names,
                                        adapters_from=train_store)
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
