"""The ``prepare`` job's config: every setting of ``prepare`` (command and library) with its
one default, written here once.

``PrepareConfig`` is a typed config (core/config.py: strict keys, ``key=value`` overrides,
YAML); the ``prepare`` command's parameters are generated from its fields (core/options.py),
and ``--config FILE`` and ``KEY=VALUE`` set it as for ``train``. ``run_prepare`` (data/pack.py)
takes it and writes it resolved as ``OUT/prepare.yaml`` (docs/format.md). ``PrepareJob``: the
command's own options. Importing this module imports click and yaml only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from core.config import TypedConfig
from core.options import check_bounds, option

__all__ = ["PrepareConfig", "PrepareJob", "RESOLVED"]

RESOLVED = "prepare.yaml"       # OUT/prepare.yaml: the config of the prepare that made OUT


@dataclass
class PrepareConfig(TypedConfig):
    """What one prepare does: the source, the output folder, the shard size, the key of the
    packing order, which WebDataset tars, where labels come from, what to do with a bad file, and
    the reader threads."""

    src: str = option("", "The source folder.", argument=True, path="dir")
    out: str = option("", "The output folder.", argument=True, path="dir", exists=False)
    shard_size: int = option(256, "Samples per tar shard (the last shard may hold fewer).", min=1)
    seed: int = option(0, "Key of the pseudo-random order the samples are written in (class-mixed shards).",
                       min=0, max=2 ** 63 - 1)
    pattern: str | None = option(
        None, "WebDataset source: take only the top-level tars matching this glob, with brace expansion "
              "(e.g. 'imagenet1k-train-*.tar', 'train-{0000..0146}.tar').", metavar="GLOB", show_default="every *.tar")
    labels: Literal["auto", "classes", "none"] = option(
        "auto", "Where labels come from. auto: class folders, or none when images lie directly in SRC; "
                "'cls' members of tars, or none when no sample has one. classes: require them. "
                "none: pack unlabeled (every image below SRC; 'cls' ignored).")
    skip_bad: bool = option(False, "Leave unreadable or non-image files out (listed in the manifest's 'rejects') "
                                   "instead of stopping at the first one.", negatable=False)
    workers: int | None = option(None, "Threads reading and verifying images (0: none; default: min(8, CPU count)).",
                                 min=0)

    def validate(self):
        for key in ("src", "out"):
            if not getattr(self, key):
                raise ValueError(f"config {key} is required ({key.upper()})")
        check_bounds(self)
        return self


@dataclass
class PrepareJob:
    """The ``prepare`` command's options that are not settings of the packed images."""

    config_file: str | None = option(None, "YAML of prepare settings (keys of data/config.py); the options given "
                                           "and KEY=VALUE override it.", flag="--config", path="file")
    progress: bool = option(True, "Show a progress bar.")
    overrides: tuple[str, ...] = option((), "Prepare settings: KEY=VALUE.", argument=True, metavar="[KEY=VALUE]...")
