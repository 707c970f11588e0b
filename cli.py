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


def _eval_data_options(fn):
    for opt in reversed([
        click.option("--train", "train_dir", type=click.Path(exists=True, file_okay=False),
                     required=True,
                     help="Train split: a folder packed by `prepare` or an ImageFolder tree."),
        click.option("--val", "val_dir", type=click.Path(exists=True, file_okay=False),
                     required=True,
                     help="Val split, same layouts; its classes must be among the train classes."),
        click.option("--batch-size", type=int, default=256, help="Images per forward batch."),
        click.option("--workers", type=int, default=8, help="DataLoader worker processes."),
    ]):
        fn = opt(fn)
    return fn


def _eval_report(*, out, task, metrics, settings, checkpoint):
    from pathlib import Path

    from eval.common import print_table, write_result

    write_result(Path(out), task=task, metrics=metrics, settings=settings,
                 checkpoint=Path(checkpoint))
    print_table([{"task": task, **metrics}])
    click.echo(f"result written to {out}")


@eval_group.command("knn", context_settings=CONTEXT)
@eval_options("runs/eval/knn.json")
@_eval_data_options
@click.option("--k", type=int, default=20, help="Neighbours that vote.")
@click.option("--temperature", type=float, default=0.07, help="Vote weight exp(sim / T).")
@click.option("--max-elements", type=int, default=1 << 26,
              help="Bound on the query-block x memory similarity matrix (entries).")
def eval_knn(checkpoint, model, model_args, out, device, train_dir, val_dir, batch_size,
             workers, k, temperature, max_elements):
    """Weighted k-NN (DINO protocol) on L2-normalised CLS features; top-1/top-5."""
    from eval.common import parse_model_args
    from eval.knn import run_knn

    metrics, settings = run_knn(
        checkpoint=checkpoint, model=model, timm_kwargs=parse_model_args(model_args),
        train=train_dir, val=val_dir, device=device, k=k, temperature=temperature,
        batch_size=batch_size, num_workers=workers, max_elements=max_elements)
    _eval_report(out=out, task="knn", metrics=metrics, settings=settings,
                 checkpoint=checkpoint)


# --- commands: demo ----------------------------------------------------------------


if __name__ == "__main__":
    main()
