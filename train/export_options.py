"""The ``export`` command's options (cli.py declares the command from these fields with
core/options.py, so that cli.py stays short). Importing this module imports click only."""
from __future__ import annotations

from dataclasses import dataclass

from core.options import option

__all__ = ["ExportOptions"]


@dataclass
class ExportOptions:
    run_dir: str = option("", "A training run folder.", argument=True, path="dir", metavar="RUN")
    out: str = option("", "The timm model folder, or a *.safetensors file.", argument=True, path="any", exists=False,
                      metavar="OUT")
    results: tuple[str, ...] = option(
        (), "Folder searched for evaluation records (result.json) of the student, for the model card (repeatable)  "
            "[default: runs/eval; RUN always]", path="dir", exists=False)
    push_to_hub: str | None = option(None, "Also publish the folder to this Hugging Face hub repository (timm's "
                                           "push_to_hf_hub; needs the network and a token).", metavar="REPO")
