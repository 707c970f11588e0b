"""Command line of the CoMAD feature-cache project: ``python cli.py COMMAND --help``.

Click commands only (no logic): each parses its options, builds what it needs and calls into
``store/``, ``extract/``, ``train/`` or ``eval/``, importing heavy modules inside the command (fast ``--help``).
"""
import click

from data.decoders import AUTO, DECODER_HELP, DECODERS, resolve_decoder
from core.errors import ExpectedError
from teachers.descriptors import DESCRIPTORS
from train.export_options import EXPORT_PARAMS
from train.train_options import TRAIN_PARAMS

CONTEXT = dict(show_default=True, help_option_names=["-h", "--help"])

# What a command reports as ``Error: <message>`` (exit status 1) instead of a traceback:
# the project's own errors (core/errors.py: a bad store, data, checkpoint, config or demo
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
    from data.shards import prepare as prepare_images

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
    from data.shards import ImageSet
    from train.plots import render_panel

    try:
        sample = load_sample(store_path, ImageSet.open(data), index=index, view=view, epoch=epoch,
                             with_tokens=run_dir is not None)
        weights = None
        if run_dir is not None:
            from train.diagnostics import gate_maps, load_run, sample_batch
            dev = _device(device)
            _, objective = load_run(run_dir, device=dev)
            weights = gate_maps(objective, sample_batch([sample], objective.teacher_names, device=dev))[0]
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
@click.option("--teacher", required=True, type=click.Choice(list(DESCRIPTORS)),
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
@click.option("--codec", type=click.Choice(["fp16", "int8", "pca", "adapter"]), default="adapter",
              help="How tokens are stored (docs/format.md); fp16 keeps the full tokens (trainable adapters).")
@click.option("--pca-dim", type=int, default=256, help="Principal components kept by --codec pca.")
@click.option("--batch-size", type=int, default=64, help="Images per teacher forward.")
@click.option("--device", default="auto", help="auto, cpu, cuda (cuda:LOCAL_RANK under torchrun).")
@click.option("--decoder", type=click.Choice(DECODERS), default=AUTO, help=DECODER_HELP)
@click.option("--threads", type=int, default=2, help="Decoder threads.")
@click.option("--hw-decoder-load", type=click.FloatRange(0, 1), default=0.65,
              help="DALI on a GPU: share of the JPEGs for the hardware decoder (A100/H100); DALI's "
                   "default until bench/gpu_check.py has measured a better one.")
@click.option("--preallocate-hint", type=(click.IntRange(min=0), click.IntRange(min=0)), default=(0, 0),
              metavar="W H", help="DALI on a GPU: preallocate the hardware decoder's buffers for W x H "
                                  "images (0 0: no hint).")
@click.option("--stats-images", type=int, default=1024,
              help="Images whose tokens give the adapter statistics (mean, principal components).")
@click.option("--stats-from", type=click.Path(exists=True, file_okay=False), default=None,
              help="Take the statistics (the coefficient codecs' basis) from this store's teacher: a held-out store "
                   "read with a training store's adapters.")
@click.option("--max-blocks", type=int, default=None,
              help="Stop after this many (shard, view-slot) blocks (a partial run; resume later).")
@click.option("--estimate", is_flag=True,
              help="Measure a short run, print bytes on disk and hours for the whole run, and exit.")
@click.option("--ranks", type=int, default=None,
              help="With --estimate: ranks to project for (default: this run's world size).")
@click.option("--view-pixels", type=click.Choice(["none", "jpeg", "raw"]), default="jpeg",
              help="Also store each view's 224 px pixels (JPEG q95 or raw uint8), once per store, so that "
                   "training never opens the image shards (docs/format.md).")
def extract(teacher, data, store_path, checkpoint, random_init, views, seed, codec, pca_dim,
            batch_size, device, decoder, threads, hw_decoder_load, preallocate_hint, stats_images, stats_from,
            max_blocks, estimate, ranks, view_pixels):
    """Stage 1: run one teacher over every (image, view) of DATA into the STORE.

    Resumes by skipping completed blocks. Under torchrun each rank owns disjoint image shards."""
    from core import dist
    from extract.runner import Extractor, run_extraction, teacher_input
    from teachers.vit import build_teacher
    from data.shards import ImageSet

    device, decoder = dist.local_device(_device(device)), resolve_decoder(decoder)
    dist.init_from_env(device)
    ds = ImageSet.open(data)
    model = build_teacher(teacher, checkpoint=checkpoint, random_init=random_init, seed=seed,
                          device=device)
    settings = dict(hw_decoder_load=hw_decoder_load, preallocate_width_hint=preallocate_hint[0],
                    preallocate_height_hint=preallocate_hint[1])
    if estimate:
        from extract.estimate import estimate_run, format_estimate
        ex = Extractor(model, ds, seed=seed, views=views, batch_size=batch_size, device=device, decoder=decoder,
                       num_threads=threads, decoder_settings=settings, teacher_input=teacher_input(view_pixels))
        e = estimate_run(ex, codec=codec, pca_dim=pca_dim, num_images=len(ds), views=views,
                         ranks=ranks or dist.world_size(), stats_images=stats_images, view_pixels=view_pixels)
        click.echo(format_estimate(e))
        return
    summary = run_extraction(teacher=model, data=ds, store_path=store_path, views=views, seed=seed,
                             codec=codec, pca_dim=pca_dim, batch_size=batch_size, device=device,
                             decoder=decoder, num_threads=threads, stats_images=stats_images,
                             max_blocks=max_blocks, decoder_settings=settings, view_pixels=view_pixels,
                             stats_from=stats_from)
    if dist.rank() == 0:
        click.echo(f"{teacher}: {summary['blocks']} blocks written, {summary['skipped']} already complete, "
                   f"{summary['images_per_second']:.1f} img/s (decoder {decoder}) -> {store_path}")
    dist.shutdown()


@main.command(context_settings=CONTEXT)
@click.argument("store_path", metavar="STORE", type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
              help="The images the store was extracted from.")
@click.option("--teacher", "teachers", multiple=True, help="Check only these teachers (repeatable).")
@click.option("--no-values", is_flag=True, help="Skip reading the token payload (its checksums, the non-finite scan).")
@click.option("--rehash-data", is_flag=True,
              help="Also re-hash every image shard of DATA against its manifest.json (reads all of DATA).")
def verify(store_path, data, teachers, no_values, rehash_data):
    """Check a store: completeness, ids and views against DATA, teacher configs, finite values;
    with --rehash-data, DATA's image shards too (its sample table is hashed on every open).

    Exits non-zero on any problem."""
    from store.verify import verify_report

    lines, problems = verify_report(store_path, data, teachers=list(teachers) or None, scan_values=not no_values,
                                    rehash_data=rehash_data)
    for line in lines:
        click.echo(line)
    for p in problems:
        click.echo(f"PROBLEM: {p}", err=True)
    if problems:
        raise SystemExit(1)
    click.echo(f"OK: {store_path} is complete and consistent with {data}")


# --- commands: train (train, export) -----------------------------------------------


@main.command(context_settings=CONTEXT, params=TRAIN_PARAMS)
def train(data, store_path, out_dir, config_file, online, epochs, steps, batch_size, variants, sweep_file, heldout,
          resume, ckpt_steps, device, overrides):
    """Stage 2: train the ViT-Tiny student against the store (or online teachers); with --variant or
    --sweep, several learners against one pass of the data.

    KEY=VALUE overrides any config value, e.g. gate.mode=uniform optim.base_lr=1e-4."""
    from train.config import load_config
    from train.loop import train as run
    from train.sweep import load_sweep, parse_variant, recorded_variants

    extra = [f"data.images={data}", f"train.out_dir={out_dir}"] + ([f"data.store={store_path}"] if store_path else [])
    if epochs is not None:
        extra.append(f"schedule.epochs={epochs}")
    if batch_size is not None:
        extra.append(f"train.batch_size={batch_size}")
    cfg = load_config(config_file, list(overrides) + extra)
    learners = [parse_variant(v) for v in variants] + (load_sweep(sweep_file) if sweep_file else [])
    learners = learners or (recorded_variants(out_dir) if resume else None)
    summary = run(cfg, out_dir=out_dir, online=online, max_steps=steps, resume=resume, device=_device(device),
                  ckpt_steps=ckpt_steps, variants=learners or None, heldout=heldout)
    if not learners:
        return click.echo(f"trained {summary['steps']} steps; student -> {out_dir}/student.safetensors")
    for message in summary["stopped"].values():
        click.echo(message, err=True)
    click.echo(f"trained {len(learners) - len(summary['stopped'])} of {len(learners)} learners for "
               f"{summary['steps']} steps; report -> {out_dir}/sweep.md")
    if summary["stopped"]:
        raise click.ClickException(f"{len(summary['stopped'])} learner(s) stopped: {', '.join(summary['stopped'])}")


@main.command(context_settings=CONTEXT, params=EXPORT_PARAMS)
def export(run_dir, out, results, push_to_hub):
    """Write RUN's student to OUT as a timm model folder (config.json, model.safetensors, a model card
    README.md: timm.create_model('local-dir:OUT', pretrained=True)), or as one file if OUT is *.safetensors."""
    from train.export import export_run
    click.echo(f"student -> {export_run(run_dir, out, results=results or None, push_to_hub=push_to_hub)}")


# --- commands: eval (eval group) ---------------------------------------------------


@main.group("eval", context_settings=CONTEXT)
def eval_group():
    """Evaluate a backbone checkpoint (timm ViT state dict): k-NN, linear probe,
    fine-tuning, detection, segmentation. Each command prints a table and writes
    OUT/result.json (metrics, resolved config, protocol settings, checkpoint sha256, git commit).
    Options and KEY=VALUE overrides set the protocol's config (eval/config.py)."""


def _eval_command(task: str) -> None:
    """Declare ``eval TASK``: one option per field of the protocol's config (eval/config.py), whose
    docstring is the command's help."""
    from eval.config import CONFIGS
    from eval.evaluate import RESUMABLE
    from eval.options import config_params

    def run(out, device, overrides, resume=False, **values):
        from eval.common import print_table
        from eval.evaluate import evaluate
        from eval.options import config_from

        record, path = evaluate(config_from(CONFIGS[task], values, overrides), out=out, device=device, resume=resume)
        if record is not None:      # None under torchrun on ranks other than 0 (rank 0 reports)
            print_table([{"task": task, **record["metrics"]}])
            click.echo(f"result written to {path}")

    params = config_params(CONFIGS[task]) + [
        click.Option(["--out"], type=click.Path(file_okay=False), default=None,
                     show_default=f"runs/eval/<checkpoint stem>-<sha256[:8]>/{task}",
                     help="Run folder: result.json" + (", checkpoint, metrics.jsonl, config.yaml"
                                                       if task in RESUMABLE else "") + "."),
        click.Option(["--device"], default="auto", show_default=True,
                     help="Torch device: auto, cpu, cuda, cuda:1, ... (cuda: cuda:LOCAL_RANK under torchrun)"),
        click.Argument(["overrides"], nargs=-1, metavar="[KEY=VALUE]...")]
    if task in RESUMABLE:
        params.append(click.Option(["--resume"], is_flag=True,
                                   help="Continue the run in --out where its checkpoint left it."))
    eval_group.add_command(click.Command(task, callback=run, params=params, help=CONFIGS[task].__doc__,
                                         context_settings=CONTEXT))


for _task in ("knn", "linear", "finetune", "detection", "segmentation"):
    _eval_command(_task)


# --- commands: demo ----------------------------------------------------------------


@main.command(context_settings=CONTEXT)
@click.option("--out", type=click.Path(file_okay=False), default="demo_out",
              help="Folder for everything the demo makes; a rerun reuses what is there.")
@click.option("--checkpoints", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder holding the teachers' official files (teachers/checkpoints.py names); "
                   "teachers without one are untrained (random init).")
@click.option("--copies", type=int, default=None, help="Training images = 13 photos x COPIES crops.")
@click.option("--heldout-copies", type=int, default=None,
              help="Held-out images = 9 other photos x this many crops (never trained on).")
@click.option("--steps", type=int, default=None, help="Student training steps.")
@click.option("--batch-size", type=int, default=None, help="Student batch size.")
@click.option("--bench-steps", type=int, default=None, help="Timed steps per throughput row (0: skip the measurement).")
@click.option("--decoder", type=click.Choice(DECODERS), default=None, help=DECODER_HELP)
@click.option("--device", default="auto", help="auto, cpu, cuda.")
@click.option("--progress/--no-progress", default=True, help="Progress bars inside stages.")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
def demo(out, checkpoints, device, progress, overrides, **values):
    """Run the whole product on scikit-image photos: prepare, extract (mae, mocov3, ibot), verify,
    train, evaluate, measure, and write OUT/report/README.md and report.html. A second run reuses
    the first's work. Options and KEY=VALUE set the demo's settings (demo/stages.py: DemoSettings,
    where the defaults are), e.g. views=2."""
    from demo.pipeline import run_demo
    from demo.stages import DemoSettings

    settings = DemoSettings.load(None, [f"{k}={v}" for k, v in values.items() if v is not None] + list(overrides))
    result = run_demo(out=out, checkpoints=checkpoints, settings=settings, device=_device(device),
                      progress=progress, echo=click.echo)
    total = sum(s["seconds"] for s in result["stages"])
    if result["reused"]:
        click.echo("reused: " + "; ".join(result["reused"]))
    click.echo(f"demo finished in {total:.0f} s; report: {result['report']}")


if __name__ == "__main__":
    main()
