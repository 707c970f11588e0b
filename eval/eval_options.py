"""The ``eval TASK`` commands' own options, beside the protocol's config (eval/config.py):
where the run goes, the device, ``KEY=VALUE`` overrides and, for a resumable protocol,
``--resume`` and ``--auto-resume``. ``{task}`` and ``{files}`` in the texts are filled per
command (cli.py)."""
from __future__ import annotations

from dataclasses import dataclass

from core.options import option

__all__ = ["EvalOptions", "ResumableEvalOptions"]


@dataclass
class EvalOptions:
    out: str | None = option(None, "Run folder: result.json{files}.", path="dir", exists=False,
                             show_default="runs/eval/<checkpoint stem>-<sha256[:8]>/{task}")
    device: str = option("auto", "Torch device: auto, cpu, cuda, cuda:1, ... (cuda: cuda:LOCAL_RANK under torchrun)")
    overrides: tuple[str, ...] = option((), "Config values: KEY=VALUE.", argument=True, metavar="[KEY=VALUE]...")


@dataclass
class ResumableEvalOptions(EvalOptions):
    resume: bool = option(False, "Continue the run in --out where its checkpoint left it.", negatable=False)
    auto_resume: bool = option(False, "Resume when --out holds a checkpoint, start otherwise; a finished run "
                                      "(its result.json written) is left as it is (exit status 0).",
                               negatable=False)
