"""Command line of the CoMAD feature-cache project: ``python cli.py COMMAND --help``.

Click commands only: each parses its options, builds what it needs and calls into
``store/``, ``extract/``, ``train/`` or ``eval/``. No logic lives here; heavy modules
are imported inside the command so that ``--help`` stays fast.
"""
import click

CONTEXT = dict(show_default=True, help_option_names=["-h", "--help"])


@click.group(context_settings=CONTEXT)
def main():
    """CoMAD: distil MAE, MoCo v3 and iBOT ViT-B teachers into a ViT-Tiny from an
    offline teacher-feature cache."""


# --- commands: store (prepare, inspect) --------------------------------------------


# --- commands: extract (extract, verify) -------------------------------------------


# --- commands: train (train, export) -----------------------------------------------


# --- commands: eval (eval group) ---------------------------------------------------


# --- commands: demo ----------------------------------------------------------------


if __name__ == "__main__":
    main()
