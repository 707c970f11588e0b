"""The ``export`` command's parameters (cli.py declares the command; its parameters live here so
that cli.py stays short). Importing this module imports click only."""
from __future__ import annotations

import click

__all__ = ["EXPORT_PARAMS"]

EXPORT_PARAMS = [
    click.Argument(["run_dir"], metavar="RUN", type=click.Path(exists=True, file_okay=False)),
    click.Argument(["out"], metavar="OUT", type=click.Path()),
    click.Option(["--results"], multiple=True, type=click.Path(file_okay=False),
                 help="Folder searched for evaluation records (result.json) of the student, for the model "
                      "card (repeatable)  [default: runs/eval; RUN always]"),
    click.Option(["--push-to-hub"], metavar="REPO", default=None,
                 help="Also publish the folder to this Hugging Face hub repository (timm's push_to_hf_hub; "
                      "needs the network and a token)."),
]
