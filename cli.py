"""Command line of the CoMAD feature-cache project: ``python cli.py COMMAND --help``.

Click commands only: each parses its options, builds what it needs and calls into
``store/``, ``extract/``, ``train/`` or ``eval/``. No logic lives here; heavy modules
are imported inside the command so that ``--help`` stays fast.
"""
import click

from store.errors import ExpectedError

CONTEXT = dict(show_default=True, help_option_names=["-h", "--help"])

# What a command reports as ``Error: <message>`` (exit status 1) instead of a traceback:
# the project's own errors (store/errors.py: a bad store, data, checkpoint, config or demo
# setting, a diverged loss), ValueError (Python's type for a bad value given by the caller;
# the config, layout and checkpoint checks raise it), OSError (missing, unreadable or
# unwritable files, a full disk) and FloatingPointError (a diverged evaluation). Anything
# else is a bug and keeps its traceback; --debug (or COMAD_DEBUG=1) keeps it for all.
EXPECTED = (ExpectedError, ValueError, OSError, FloatingPointError)


class Commands(click.Group):
    """The top-level group: any command's expected error becomes one ``Error:`` line."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EXPECTED as error:
            if ctx.params.get("debug"):
                raise
            raise click.ClickException(str(error) or type(error).__name__) from None


@click.group(cls=Commands, context_settings=CONTEXT)
@click.option("--debug", is_flag=True, envvar="COMAD_DEBUG",
              help="Show the traceback of expected errors too (also COMAD_DEBUG=1).")
def main(debug):
    """CoMAD: distil MAE, MoCo v3 and iBOT ViT-B teachers into a ViT-Tiny from an
    offline teacher-feature cache."""


# --- commands: store (prepare, inspect) --------------------------------------------


@main.command(context_settings=CONTEXT)
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--shard-size", type=click.IntRange(min=1), default=256,
              help="Samples per tar shard (the last shard may hold fewer).")
@click.option("--seed", type=click.IntRange(min=0, max=2 ** 63 - 1), default=0,
              help="Key of the pseudo-random order the samples are written in (class-mixed shards).")
@click.option("--pattern", default=None, metavar="GLOB", show_default="every *.tar",
              help="WebDataset source: take only the top-level tars matching this glob, with brace "
                   "expansion (e.g. 'imagenet1k-train-*.tar', 'train-{0000..0146}.tar').")
@click.option("--skip-bad", is_flag=True,
              help="Leave unreadable or non-image files out (listed in the manifest's 'rejects') "
                   "instead of stopping at the first one.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Threads reading and verifying images (0: none; default: min(8, CPU count)).")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def prepare(src, out, shard_size, seed, pattern, skip_bad, workers, progress):
    """Pack SRC (ImageFolder tree or folder of WebDataset .tar shards) into OUT: tar shards with
    DALI index files and a manifest giving every image a stable global index (docs/format.md).
    Samples are written in a seeded pseudo-random order, so every shard mixes the classes.

    Re-running on a finished OUT does nothing; an unfinished OUT is redone."""
    from store.shards import prepare as prepare_images

    prepare_images(src, out, shard_size=shard_size, seed=seed, pattern=pattern, skip_bad=skip_bad,
                   progress=progress, workers=workers, echo=lambda message: click.echo(message, err=True))


@main.command(context_settings=CONTEXT)
@click.argument("store_path", metavar="STORE", type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
              help="The images the store was extracted from (a `prepare` output).")
@click.option("--index", required=True, type=int, help="Global image index of the sample.")
@click.option("--view", type=int, default=0, help="View number v of that image.")
@click.option("--epoch", type=int, default=None,
              help="Epoch of the student mask shown  [default: the first epoch that trains on this view]")
@click.option("--run", "run_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="A training run folder: adds its student's per-position gate weights.")
@click.option("--out", type=click.Path(dir_okay=False), default="inspect.png", help="PNG to write.")
@click.option("--device", default="auto", help="With --run: auto, cpu, cuda.")
def inspect(store_path, data, index, view, epoch, run_dir, out, device):
    """Draw one sample of STORE: the view (decoded crop), each teacher's mask, the student's mask
    and, with --run, the gate weights w_k(p) of each teacher at every position."""
    from store.inspect import load_sample
    from store.shards import ImageSet
    from train.plots import render_panel

    try:
        sample = load_sample(store_path, ImageSet.open(data), index=index, view=view, epoch=epoch,
                             with_tokens=run_dir is not None)
        weights = None
        if run_dir is not None:
            from train.diagnostics import gate_maps, load_run, sample_batch
            dev = _device(device)
            cfg, objective = load_run(run_dir, device=dev)
            weights = gate_maps(objective, sample_batch([sample], cfg.data.teachers, device=dev))[0]
        click.echo(f"panel -> {render_panel(sample, out, weights=weights)}")
    except IndexError as error:         # an --index or --view out of range
        raise click.ClickException(str(error)) from None


# --- commands: extract (extract, verify) -------------------------------------------


def _device(device: str) -> str:
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@main.command(context_settings=CONTEXT)
@click.option("--teacher", required=True, type=click.Choice(["mae", "mocov3", "ibot", "dino"]),
              help="Which frozen ViT-B/16 teacher to run.")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
              help="Images packed by `prepare`.")
@click.option("--store", "store_path", required=True, type=click.Path(file_okay=False),
              help="Feature store (zarr v3) to create or resume.")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The teacher's official checkpoint file; fetched if omitted and the network allows.")
@click.option("--random-init", is_flag=True,
              help="Untrained teacher (tests, demos); the store records that it is untrained.")
@click.option("--views", type=int, default=4, help="Cached views per image (V).")
@click.option("--seed", type=int, default=0, help="Root seed of crops and masks.")
@click.option("--codec", type=click.Choice(["fp16", "int8", "pca", "adapter"]), default="fp16",
              help="How tokens are stored (docs/format.md).")
@click.option("--pca-dim", type=int, default=256, help="Principal components kept by --codec pca.")
@click.option("--batch-size", type=int, default=64, help="Images per teacher forward.")
@click.option("--device", default="auto", help="auto, cpu, cuda (cuda:LOCAL_RANK under torchrun).")
@click.option("--decoder", type=click.Choice(["dali", "pil"]), default="dali",
              help="JPEG decoder: DALI (GPU decoder on CUDA) or the PIL reference.")
@click.option("--threads", type=int, default=2, help="Decoder threads.")
@click.option("--hw-decoder-load", type=click.FloatRange(0, 1), default=0.65,
              help="DALI on a GPU: share of the JPEGs for the hardware decoder (A100/H100); DALI's "
                   "default until bench/gpu_check.py has measured a better one.")
@click.option("--preallocate-hint", type=(click.IntRange(min=0), click.IntRange(min=0)), default=(0, 0),
              metavar="W H", help="DALI on a GPU: preallocate the hardware decoder's buffers for W x H "
                                  "images (0 0: no hint).")
@click.option("--stats-images", type=int, default=1024,
              help="Images whose tokens give the adapter statistics (mean, principal components).")
@click.option("--max-blocks", type=int, default=None,
              help="Stop after this many (shard, view-slot) blocks (a partial run; resume later).")
@click.option("--estimate", is_flag=True,
              help="Measure a short run, print bytes on disk and hours for the whole run, and exit.")
@click.option("--ranks", type=int, default=None,
              help="With --estimate: ranks to project for (default: this run's world size).")
def extract(teacher, data, store_path, checkpoint, random_init, views, seed, codec, pca_dim,
            batch_size, device, decoder, threads, hw_decoder_load, preallocate_hint, stats_images, max_blocks,
            estimate, ranks):
    """Stage 1: run one teacher over every (image, view) of DATA into the STORE.

    Resumes by skipping completed blocks. Under torchrun each rank owns disjoint image shards."""
    from extract import dist
    from extract.runner import Extractor, run_extraction
    from extract.teachers import build_teacher
    from store.shards import ImageSet

    device = dist.local_device(_device(device))
    dist.init_from_env(device)
    ds = ImageSet.open(data)
    model = build_teacher(teacher, checkpoint=checkpoint, random_init=random_init, seed=seed,
                          device=device)
    settings = dict(hw_decoder_load=hw_decoder_load, preallocate_width_hint=preallocate_hint[0],
                    preallocate_height_hint=preallocate_hint[1])
    if estimate:
        from extract.estimate import estimate_run, format_estimate
        ex = Extractor(model, ds, seed=seed, views=views, batch_size=batch_size, device=device,
                       decoder=decoder, num_threads=threads, decoder_settings=settings)
        e = estimate_run(ex, codec=codec, pca_dim=pca_dim, num_images=len(ds), views=views,
                         ranks=ranks or dist.world_size(), stats_images=stats_images)
        click.echo(format_estimate(e))
        return
    summary = run_extraction(teacher=model, data=ds, store_path=store_path, views=views, seed=seed,
                             codec=codec, pca_dim=pca_dim, batch_size=batch_size, device=device,
                             decoder=decoder, num_threads=threads, stats_images=stats_images,
                             max_blocks=max_blocks, decoder_settings=settings)
    if dist.rank() == 0:
        click.echo(f"{teacher}: {summary['blocks']} blocks written, {summary['skipped']} already complete, "
                   f"{summary['images_per_second']:.1f} img/s -> {store_path}")
    dist.shutdown()


@main.command(context_settings=CONTEXT)
@click.argument("store_path", metavar="STORE", type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
              help="The images the store was extracted from.")
@click.option("--teacher", "teachers", multiple=True, help="Check only these teachers (repeatable).")
@click.option("--no-values", is_flag=True, help="Skip the scan of token values for non-finite numbers.")
def verify(store_path, data, teachers, no_values):
    """Check a store: completeness, ids and views against DATA, teacher configs, finite values.

    Exits non-zero on any problem."""
    from extract.verify import verify_store
    from store.shards import ImageSet

    problems, summary = verify_store(store_path, ImageSet.open(data), teachers=list(teachers) or None,
                                     scan_values=not no_values)
    for name, t in summary.get("teachers", {}).items():
        click.echo(f"{name}: {t['complete']}/{t['blocks']} blocks complete, codec {t['codec']}, "
                   f"{'untrained' if t['untrained'] else 'trained'} teacher")
    if problems:
        for p in problems:
            click.echo(f"PROBLEM: {p}", err=True)
        raise SystemExit(1)
    click.echo(f"OK: {store_path} is complete and consistent with {data}")


# --- commands: train (train, export) -----------------------------------------------


@main.command(context_settings=CONTEXT)
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
              help="Images packed by `prepare` (data.images).")
@click.option("--store", "store_path", default=None, type=click.Path(exists=True, file_okay=False),
              help="Feature store made by `extract` (data.store). The online sources use it for the "
                   "teachers' identity and statistics only; online-fresh can go without one "
                   "(data.teachers_from).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Run folder.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML overrides of the default config (train/config.py).")
@click.option("--online", is_flag=True, help="Same as data.source=online-replay: run the teachers every "
                                             "step on the store's views (data.source=online-fresh: on a "
                                             "new view every epoch).")
@click.option("--epochs", type=int, default=None, help="Sets schedule.epochs.")
@click.option("--steps", type=int, default=None, help="Stop after this many steps (schedule shortened to match).")
@click.option("--batch-size", type=int, default=None, help="Sets train.batch_size (global, all ranks).")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where its checkpoint left it.")
@click.option("--ckpt-steps", type=int, default=0, help="Also checkpoint every N steps (0: epoch ends only).")
@click.option("--device", default="auto", help="auto, cpu, cuda (cuda:LOCAL_RANK under torchrun).")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
def train(data, store_path, out_dir, config_file, online, epochs, steps, batch_size, resume, ckpt_steps,
          device, overrides):
    """Stage 2: train the ViT-Tiny student against the store (or online teachers).

    KEY=VALUE overrides any config value, e.g. gate.mode=uniform optim.base_lr=1e-4."""
    from train.config import load_config
    from train.loop import train as run

    extra = [f"data.images={data}", f"train.out_dir={out_dir}"] + ([f"data.store={store_path}"] if store_path else [])
    if epochs is not None:
        extra.append(f"schedule.epochs={epochs}")
    if batch_size is not None:
        extra.append(f"train.batch_size={batch_size}")
    cfg = load_config(config_file, list(overrides) + extra)
    summary = run(cfg, out_dir=out_dir, online=online, max_steps=steps, resume=resume, device=_device(device),
                  ckpt_steps=ckpt_steps)
    click.echo(f"trained {summary['steps']} steps; student -> {out_dir}/student.safetensors")


@main.command(context_settings=CONTEXT)
@click.argument("run_dir", metavar="RUN", type=click.Path(exists=True, file_okay=False))
@click.argument("out", metavar="OUT", type=click.Path(dir_okay=False))
def export(run_dir, out):
    """Write RUN's student as a plain timm vit_tiny_patch16_224 state dict (safetensors) to OUT."""
    from train.export import export_run
    click.echo(f"student -> {export_run(run_dir, out)}")


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
@click.option("--batch-size", type=int, default=256, help="Images per forward batch.")
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


@eval_group.command("linear", context_settings=CONTEXT)
@eval_options("runs/eval/linear.json")
@_eval_data_options
@click.option("--epochs", type=int, default=90, help="Training epochs (MAE: 90).")
@click.option("--warmup-epochs", type=float, default=10, help="Linear warm-up epochs (MAE: 10).")
@click.option("--batch-size", type=int, default=16384,
              help="Images per optimiser step (MAE: 16384); gathered from micro-batches.")
@click.option("--micro-batch", type=int, default=256,
              help="Images per backbone forward (memory only; the step sees --batch-size).")
@click.option("--blr", type=float, default=0.1, help="Base lr; lr = blr * batch-size / 256.")
@click.option("--lr", type=float, default=None, help="Absolute lr, overrides --blr.")
@click.option("--weight-decay", type=float, default=0.0, help="Weight decay (MAE: 0).")
@click.option("--optimizer", type=click.Choice(["lars", "sgd"]), default="lars",
              help="LARS as in MAE, or SGD with momentum 0.9.")
@click.option("--cache-features/--no-cache-features", default=False,
              help="Train on center-crop features extracted once: fast, but without the "
                   "protocol's RandomResizedCrop+flip (recorded in the result).")
@click.option("--seed", type=int, default=0, help="Seed of head init, order and augmentation.")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="Per-epoch checkpoints and log  [default: OUT without .json + .run]")
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir.")
def eval_linear(checkpoint, model, model_args, out, device, train_dir, val_dir, workers,
                epochs, warmup_epochs, batch_size, micro_batch, blr, lr, weight_decay,
                optimizer, cache_features, seed, run_dir, resume):
    """Linear probe (MAE protocol): frozen backbone, BatchNorm(affine=False) + Linear on
    the CLS token; top-1."""
    from pathlib import Path

    from eval.common import parse_model_args
    from eval.linear import run_linear

    metrics, settings = run_linear(
        checkpoint=checkpoint, model=model, timm_kwargs=parse_model_args(model_args),
        train=train_dir, val=val_dir, run_dir=Path(run_dir or Path(out).with_suffix(".run")),
        device=device, epochs=epochs, warmup_epochs=warmup_epochs, batch_size=batch_size,
        micro_batch=micro_batch, blr=blr, lr=lr, weight_decay=weight_decay,
        optimizer=optimizer, cache_features=cache_features, seed=seed, num_workers=workers,
        resume=resume)
    _eval_report(out=out, task="linear", metrics=metrics, settings=settings,
                 checkpoint=checkpoint)


@eval_group.command("finetune", context_settings=CONTEXT)
@eval_options("runs/eval/finetune.json")
@_eval_data_options
@click.option("--epochs", type=int, default=100, help="Epochs (ViT-Tiny choice; MAE ViT-B: 100).")
@click.option("--warmup-epochs", type=float, default=5, help="Linear warm-up epochs.")
@click.option("--batch-size", type=int, default=1024, help="Images per optimiser step.")
@click.option("--accum-iter", type=int, default=1,
              help="Gradient accumulation: micro-batch = batch-size / accum-iter.")
@click.option("--blr", type=float, default=5e-4, help="Base lr; lr = blr * batch-size / 256.")
@click.option("--lr", type=float, default=None, help="Absolute lr, overrides --blr.")
@click.option("--min-lr", type=float, default=1e-6, help="Floor of the cosine schedule.")
@click.option("--weight-decay", type=float, default=0.05, help="AdamW weight decay.")
@click.option("--layer-decay", type=float, default=0.75,
              help="Layer-wise lr decay (MAE: 0.65 ViT-B, 0.75 ViT-L/H).")
@click.option("--drop-path", type=float, default=0.1, help="Stochastic depth rate.")
@click.option("--smoothing", type=float, default=0.1, help="Label smoothing.")
@click.option("--mixup", type=float, default=0.8, help="Mixup alpha (0 disables).")
@click.option("--cutmix", type=float, default=1.0, help="CutMix alpha (0 disables).")
@click.option("--auto-augment", default="rand-m9-mstd0.5-inc1", help="timm RandAugment spec.")
@click.option("--reprob", type=float, default=0.25, help="Random erasing probability.")
@click.option("--eval-every", type=int, default=1, help="Evaluate on val every N epochs.")
@click.option("--seed", type=int, default=0, help="Seed of head init, order, augmentation.")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="Per-epoch checkpoints and log  [default: OUT without .json + .run]")
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir.")
def eval_finetune(checkpoint, model, model_args, out, device, train_dir, val_dir, workers,
                  epochs, warmup_epochs, batch_size, accum_iter, blr, lr, min_lr,
                  weight_decay, layer_decay, drop_path, smoothing, mixup, cutmix,
                  auto_augment, reprob, eval_every, seed, run_dir, resume):
    """End-to-end fine-tuning (MAE/DeiT recipe: layer decay, RandAugment, mixup/cutmix,
    label smoothing, drop path, AdamW, cosine); top-1/top-5."""
    from pathlib import Path

    from eval.common import parse_model_args
    from eval.finetune import run_finetune

    metrics, settings = run_finetune(
        checkpoint=checkpoint, model=model, timm_kwargs=parse_model_args(model_args),
        train=train_dir, val=val_dir, run_dir=Path(run_dir or Path(out).with_suffix(".run")),
        device=device, epochs=epochs, warmup_epochs=warmup_epochs, batch_size=batch_size,
        accum_iter=accum_iter, blr=blr, lr=lr, min_lr=min_lr, weight_decay=weight_decay,
        layer_decay=layer_decay, drop_path=drop_path, smoothing=smoothing, mixup=mixup,
        cutmix=cutmix, auto_augment=auto_augment, reprob=reprob, eval_every=eval_every,
        seed=seed, num_workers=workers, resume=resume)
    _eval_report(out=out, task="finetune", metrics=metrics, settings=settings,
                 checkpoint=checkpoint)


@eval_group.command("detection", context_settings=CONTEXT)
@click.argument("data", type=click.Path(exists=True, file_okay=False))
@eval_options("runs/eval/detection.json")
@click.option("--epochs", type=int, default=100, help="Training epochs (ViTDet: 100).")
@click.option("--image-size", type=int, default=1024,
              help="LSJ crop and test size, a multiple of 32 (ViTDet: 1024).")
@click.option("--batch-size", type=int, default=64, help="Images per optimiser step (ViTDet: 64).")
@click.option("--lr", type=float, default=1e-4, help="AdamW lr for the whole batch (ViTDet: 1e-4 at 64).")
@click.option("--weight-decay", type=float, default=0.1, help="AdamW weight decay.")
@click.option("--layer-decay", type=float, default=0.7, help="Layer-wise lr decay of the ViT.")
@click.option("--drop-path", type=float, default=0.1, help="Stochastic depth rate of the ViT.")
@click.option("--warmup", type=int, default=250, help="Linear warm-up steps.")
@click.option("--heads", type=click.Choice(["vitdet", "light"]), default="vitdet",
              help="vitdet: conv heads with LayerNorm; light: torchvision Mask R-CNN v1 heads (CPU runs).")
@click.option("--roi-batch", type=int, default=512, help="Sampled RoIs per training image.")
@click.option("--scale-range", type=(float, float), default=(0.1, 2.0),
              help="Large-scale jitter: resize to r * image-size, r ~ U(MIN, MAX).")
@click.option("--max-images", type=int, default=None,
              help="Use only the first N images (by id) of each split (short runs).")
@click.option("--workers", type=int, default=8, help="DataLoader worker processes.")
@click.option("--seed", type=int, default=0, help="Seed of sample order and augmentation.")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="Per-epoch checkpoint, log, COCO result files  [default: OUT without .json + .run]")
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir.")
def eval_detection(data, checkpoint, model, model_args, out, device, epochs, image_size, batch_size,
                   lr, weight_decay, layer_decay, drop_path, warmup, heads, roi_batch, scale_range,
                   max_images, workers, seed, run_dir, resume):
    """COCO detection + instance segmentation: Mask R-CNN on a ViTDet simple feature pyramid,
    trained on DATA's train split, box AP and mask AP on its val split (COCOeval).

    DATA: annotations/instances_{train,val}2017.json + {train,val}2017/ (official COCO
    2017), or annotations/instances_{train,val}.json + {train,val}/."""
    from pathlib import Path

    from eval.common import parse_model_args
    from eval.detection import run_detection

    metrics, settings = run_detection(
        checkpoint=checkpoint, model=model, timm_kwargs=parse_model_args(model_args), data=data,
        run_dir=Path(run_dir or Path(out).with_suffix(".run")), device=device, epochs=epochs,
        image_size=image_size, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        layer_decay=layer_decay, drop_path=drop_path, warmup=warmup, heads=heads,
        roi_batch=roi_batch, scale_range=scale_range, max_images=max_images, seed=seed,
        num_workers=workers, resume=resume)
    _eval_report(out=out, task="detection", metrics=metrics, settings=settings,
                 checkpoint=checkpoint)


@eval_group.command("segmentation", context_settings=CONTEXT)
@click.argument("data", type=click.Path(exists=True, file_okay=False))
@eval_options("runs/eval/segmentation.json")
@click.option("--iters", type=int, default=160_000, help="Training iterations (BEiT/MAE: 160k).")
@click.option("--image-size", type=int, default=512, help="Crop and slide-window size, a multiple of 32.")
@click.option("--batch-size", type=int, default=16, help="Crops per optimiser step.")
@click.option("--lr", type=float, default=1e-4, help="AdamW lr.")
@click.option("--weight-decay", type=float, default=0.05, help="AdamW weight decay.")
@click.option("--layer-decay", type=float, default=0.65, help="Layer-wise lr decay of the ViT.")
@click.option("--drop-path", type=float, default=0.1, help="Stochastic depth rate of the ViT.")
@click.option("--warmup", type=int, default=1500, help="Linear warm-up iterations (then poly decay).")
@click.option("--channels", type=int, default=512, help="UperNet channels (FCN aux head: half).")
@click.option("--aux-weight", type=float, default=0.4, help="FCN auxiliary loss weight (0: no aux head).")
@click.option("--num-classes", type=int, default=150, help="Classes after reduce_zero_label (ADE20K: 150).")
@click.option("--max-images", type=int, default=None,
              help="Use only the first N images (by name) of each split (short runs).")
@click.option("--checkpoint-every", type=int, default=2000, help="Checkpoint every N iterations.")
@click.option("--workers", type=int, default=8, help="DataLoader worker processes.")
@click.option("--seed", type=int, default=0, help="Seed of head init, order, augmentation, drop path.")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="Checkpoint and log  [default: OUT without .json + .run]")
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir.")
def eval_segmentation(data, checkpoint, model, model_args, out, device, iters, image_size,
                      batch_size, lr, weight_decay, layer_decay, drop_path, warmup, channels,
                      aux_weight, num_classes, max_images, checkpoint_every, workers, seed, run_dir,
                      resume):
    """ADE20K semantic segmentation: UperNet on a ViTDet simple feature pyramid, trained on
    DATA's training split; mIoU and pixel accuracy on its validation split (slide inference).

    DATA: images/{training,validation}/*.jpg + annotations/{training,validation}/*.png
    (ADEChallengeData2016); label 0 is ignored, k -> k-1."""
    from pathlib import Path

    from eval.common import parse_model_args
    from eval.segmentation import run_segmentation

    metrics, settings = run_segmentation(
        checkpoint=checkpoint, model=model, timm_kwargs=parse_model_args(model_args), data=data,
        run_dir=Path(run_dir or Path(out).with_suffix(".run")), device=device, iters=iters,
        image_size=image_size, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        layer_decay=layer_decay, drop_path=drop_path, warmup=warmup, channels=channels,
        aux_weight=aux_weight, num_classes=num_classes, max_images=max_images, seed=seed,
        checkpoint_every=checkpoint_every, num_workers=workers, resume=resume)
    _eval_report(out=out, task="segmentation", metrics=metrics, settings=settings,
                 checkpoint=checkpoint)


# --- commands: demo ----------------------------------------------------------------


@main.command(context_settings=CONTEXT)
@click.option("--out", type=click.Path(file_okay=False), default="demo_out",
              help="Folder for everything the demo makes; a rerun reuses what is there.")
@click.option("--checkpoints", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder holding the teachers' official files (extract/checkpoints.py names); "
                   "teachers without one are untrained (random init).")
@click.option("--copies", type=click.IntRange(min=1), default=4,
              help="Training images = 13 photos x COPIES crops.")
@click.option("--heldout-copies", type=click.IntRange(min=1), default=1,
              help="Held-out images = 13 x this many further crops (never trained on).")
@click.option("--steps", type=click.IntRange(min=1), default=150, help="Student training steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, help="Student batch size.")
@click.option("--bench-steps", type=click.IntRange(min=0), default=2,
              help="Timed steps per throughput row (0: skip the measurement).")
@click.option("--decoder", type=click.Choice(["dali", "pil"]), default="dali", help="Image decoder.")
@click.option("--device", default="auto", help="auto, cpu, cuda.")
@click.option("--progress/--no-progress", default=True, help="Progress bars inside stages.")
def demo(out, checkpoints, copies, heldout_copies, steps, batch_size, bench_steps, decoder, device, progress):
    """Run the whole product on scikit-image photos: prepare, extract (mae, mocov3, ibot), verify,
    train, evaluate, measure, and write OUT/report/README.md. A second run reuses the first's work."""
    from demo.pipeline import run_demo
    from demo.stages import DemoSettings

    settings = DemoSettings(copies=copies, heldout_copies=heldout_copies, steps=steps, batch_size=batch_size,
                            bench_steps=bench_steps, decoder=decoder)
    result = run_demo(out=out, checkpoints=checkpoints, settings=settings, device=_device(device),
                      progress=progress, echo=click.echo)
    total = sum(s["seconds"] for s in result["stages"])
    if result["reused"]:
        click.echo("reused: " + "; ".join(result["reused"]))
    click.echo(f"demo finished in {total:.0f} s; report: {result['report']}")


if __name__ == "__main__":
    main()
