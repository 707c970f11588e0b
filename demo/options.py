"""The ``demo`` command's options (cli.py declares the command from these fields with
core/options.py). The options from ``--copies`` to ``--decoder`` set the demo's settings
(demo/stages.py: DemoSettings, where their defaults are), as ``KEY=VALUE`` does."""
from __future__ import annotations

from dataclasses import dataclass

from core.options import option
from data.decoders import DECODER_HELP, DECODERS

__all__ = ["DemoOptions"]


@dataclass
class DemoOptions:
    out: str = option("demo_out", "Folder for everything the demo makes; a rerun reuses what is there.", path="dir",
                      exists=False)
    checkpoints: str | None = option(
        None, "Folder holding the teachers' official files (teachers/checkpoints.py names); teachers without one are "
              "untrained (random init).", path="dir")
    copies: int | None = option(None, "Training images = 13 photos x COPIES crops.")
    heldout_copies: int | None = option(None, "Held-out images = 9 other photos x this many crops (never trained on).")
    steps: int | None = option(None, "Student training steps.")
    batch_size: int | None = option(None, "Student batch size.")
    bench_steps: int | None = option(None, "Timed steps per throughput row (0: skip the measurement).")
    decoder: str | None = option(None, DECODER_HELP, choices=DECODERS)
    device: str = option("auto", "auto, cpu, cuda.")
    progress: bool = option(True, "Progress bars inside stages.")
    overrides: tuple[str, ...] = option((), "Demo settings: KEY=VALUE.", argument=True, metavar="[KEY=VALUE]...")
