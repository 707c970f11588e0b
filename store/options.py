"""The options of the commands that read a store, ``verify`` and ``inspect`` (cli.py declares
the commands from these fields with core/options.py). Importing this module imports click only."""
from __future__ import annotations

from dataclasses import dataclass

from core.options import option

__all__ = ["VerifyOptions", "InspectOptions"]


@dataclass
class VerifyOptions:
    store_path: str = option("", "The feature store.", argument=True, path="dir", metavar="STORE")
    data: str = option("", "The images the store was extracted from.", required=True, path="dir")
    teachers: tuple[str, ...] = option((), "Check only these teachers (repeatable).", flag="--teacher")
    no_values: bool = option(False, "Skip reading the token payload (its checksums, the non-finite scan).",
                             negatable=False)
    rehash_data: bool = option(False, "Also re-hash every image shard of DATA against its manifest.json (reads all "
                                      "of DATA).", negatable=False)


@dataclass
class InspectOptions:
    store_path: str = option("", "The feature store.", argument=True, path="dir", metavar="STORE")
    data: str = option("", "The images the store was extracted from (a `prepare` output).", required=True,
                       path="dir")
    index: int | None = option(None, "Global image index of the sample.", required=True)
    view: int = option(0, "View number v of that image.")
    epoch: int | None = option(None, "Epoch of the student mask shown  [default: the first epoch that trains on "
                                     "this view]")
    run_dir: str | None = option(None, "A training run folder: adds its student's per-position gate weights.",
                                 flag="--run", path="dir")
    out: str = option("inspect.png", "PNG to write.", path="file", exists=False)
    device: str = option("auto", "With --run: auto, cpu, cuda.")
