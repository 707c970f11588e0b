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


@main.group("eval", context_settings=CONTEXT)
def eval_group():
    """Evaluate a backbone checkpoint (timm ViT state dict): k-NN, linear probe,
    fine-tuning, detection, segmentation. Each command prints a table and writes a
    result JSON (metrics, protocol settings, checkpoint sha256, git commit)."""


def eval_options(default_out):
    """Options every ``eval`` command takes: --checkpoint, --model, --model-arg,
    --out, --device."""
    def decorate(fn):
        for opt in reversed([
            click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False),
                         required=True,
                         help="Backbone weights (.safetensors or .pth/.pt), a timm state dict."),
            click.option("--model", default="vit_tiny_patch16_224",
                         help="timm model name the checkpoint belongs to."),
            click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
                         help="Extra timm.create_model argument, repeatable "
                              "(e.g. img_size=32)."),
            click.option("--out", type=click.Path(dir_okay=False), default=default_out,
                         help="Result JSON path."),
            click.option("--device", default="auto",
                         help="Torch device: auto, cpu, cuda, cuda:1, ..."),
        ]):
            fn = opt(fn)
        return fn
    return decorate


# --- commands: demo ----------------------------------------------------------------


if __name__ == "__main__":
    main()
