"""Command line of the CoMAD feature-cache project: ``python cli.py COMMAND --help``.

Click commands only (no logic): each parses its options, builds what it needs and calls into its
package, importing heavy modules inside the command (fast ``--help``)."""
import click

from core.errors import ExpectedError
from core.log import command_logs
from core.preempt import Preempted
from core.options import config_from, config_params
from data.config import PrepareConfig, PrepareJob
from demo.options import DemoOptions
from extract.config import ExtractConfig, ExtractJob
from store.options import InspectOptions, VerifyOptions
from train.export_options import ExportOptions
from train.train_options import TrainOptions

CONTEXT = dict(show_default=True, help_option_names=["-h", "--help"])

# What a command reports as ``Error: <message>`` (exit status 1) instead of a traceback:
# the project's own errors (core/errors.py: a bad store, data, checkpoint, config or demo
# setting, a diverged loss), ValueError (Python's type for a bad value given by the caller;
# the config, layout and checkpoint checks raise it), OSError (missing, unreadable or
# unwritable files, a full disk) and FloatingPointError (a diverged evaluation). Anything
# else is a bug and keeps its traceback; --debug (or COMAD_DEBUG=1) keeps it for all. A job stopped
# by SIGTERM/SIGUSR1 after saving its work (core/preempt.py) prints its line and exits with status 75.
EXPECTED = (ExpectedError, ValueError, OSError, FloatingPointError)


class Commands(click.Group):
    """The top-level group: any command's expected error becomes one ``Error:`` line. The run logs
    the command opened (core/log.py) get its last line: that one, the preemption's, or ``finished``."""

    def invoke(self, ctx: click.Context):
        with command_logs() as final:
            try:
                result = super().invoke(ctx)
            except Preempted as stopped:
                from core import dist
                final(str(stopped))
                if dist.rank() == 0:
                    click.echo(str(stopped), err=True)
                ctx.exit(stopped.exit_code)
            except EXPECTED as error:
                final(f"Error: {str(error) or type(error).__name__}")
                if ctx.params.get("debug"):
                    raise
                raise click.ClickException(str(error) or type(error).__name__) from None
            except click.ClickException as error:       # a command's own one-line refusal
                final(f"Error: {error.format_message()}")
                raise
            except (click.exceptions.Exit, click.Abort):
                raise
            except Exception as error:                  # a bug: the traceback goes to stderr
                final(f"crashed: {type(error).__name__}: {error} (traceback on stderr)")
                raise
            final("finished")
            return result


@click.group(cls=Commands, context_settings=CONTEXT)
@click.option("--debug", is_flag=True, envvar="COMAD_DEBUG",
              help="Show the traceback of expected errors too (also COMAD_DEBUG=1).")
def main(debug):
    """CoMAD: distil MAE, MoCo v3 and iBOT ViT-B teachers into a ViT-Tiny from an
    offline teacher-feature cache."""


# --- commands: store (prepare, inspect) --------------------------------------------


@main.command(context_settings=CONTEXT, params=config_params(PrepareConfig) + config_params(PrepareJob))
def prepare(config_file, progress, overrides, **values):
    """Pack SRC (ImageFolder tree, images without classes, or WebDataset .tar shards; --labels) into
    OUT: tar shards with DALI index files and a manifest giving every image a stable global index
    (docs/format.md). Samples are written in a seeded pseudo-random order (class-mixed shards).

    Re-running on a finished OUT does nothing; an unfinished OUT is redone. KEY=VALUE (and
    --config FILE) set any setting, e.g. shard_size=512; OUT/prepare.yaml records them."""
    from data.pack import run_prepare

    run_prepare(config_from(PrepareConfig, values, overrides, path=config_file), progress=progress,
                echo=lambda message: click.echo(message, err=True))


@main.command(context_settings=CONTEXT, params=config_params(InspectOptions))
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


@main.command(context_settings=CONTEXT, params=config_params(ExtractConfig) + config_params(ExtractJob))
def extract(config_file, estimate, ranks, overrides, **values):
    """Stage 1: run one teacher over every (image, view) of DATA into the STORE.

    Always resumes, no flag needed: completed blocks are skipped. Under torchrun each rank owns
    disjoint image shards. KEY=VALUE (and --config FILE) set any setting, e.g. codec=fp16; the job
    writes them, resolved, to STORE.<teacher>.extract.yaml."""
    from core import dist
    from data.decoders import resolve_decoder
    from data.shards import ImageSet
    from extract.runner import run_extraction
    from extract.teacher import build_extraction_teacher

    cfg = config_from(ExtractConfig, values, overrides, path=config_file)
    device = dist.local_device(_device(cfg.device))
    dist.init_from_env(device)
    ds = ImageSet.open(cfg.data)
    model = build_extraction_teacher(cfg, device=device)
    if estimate:
        from extract.estimate import estimate_extraction, format_estimate
        return click.echo(format_estimate(estimate_extraction(cfg, teacher=model, data=ds,
                                                              ranks=ranks or dist.world_size())))
    summary = run_extraction(cfg, teacher=model, data=ds)
    if dist.rank() == 0:
        click.echo(f"{cfg.teacher}: {summary['blocks']} blocks written, {summary['skipped']} already complete, "
                   f"{summary['images_per_second']:.1f} img/s (decoder {resolve_decoder(cfg.decoder)}) -> {cfg.store}")
    dist.shutdown()


@main.command(context_settings=CONTEXT, params=config_params(VerifyOptions))
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


@main.command(context_settings=CONTEXT, params=config_params(TrainOptions))
def train(data, store_path, out_dir, config_file, online, epochs, steps, batch_size, variants, sweep_file, heldout,
          resume, auto_resume, ckpt_steps, device, requeue, overrides):
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
    learners = learners or (recorded_variants(out_dir) if resume or auto_resume else None)
    summary = run(cfg, out_dir=out_dir, online=online, max_steps=steps, resume=resume, device=_device(device),
                  ckpt_steps=ckpt_steps, variants=learners or None, heldout=heldout, auto_resume=auto_resume,
                  requeue=requeue)
    if summary["finished"]:
        return click.echo(f"{out_dir} already finished ({summary['steps']} steps); nothing to train")
    if not learners:
        return click.echo(f"trained {summary['steps']} steps; student -> {out_dir}/student.safetensors")
    for message in summary["stopped"].values():
        click.echo(message, err=True)
    click.echo(f"trained {len(learners) - len(summary['stopped'])} of {len(learners)} learners for "
               f"{summary['steps']} steps; report -> {out_dir}/sweep.md")
    if summary["stopped"]:
        raise click.ClickException(f"{len(summary['stopped'])} learner(s) stopped: {', '.join(summary['stopped'])}")


@main.command(context_settings=CONTEXT, params=config_params(ExportOptions))
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
    docstring is the command's help, and the command's own (eval/eval_options.py)."""
    from eval.config import CONFIGS
    from eval.eval_options import EvalOptions, ResumableEvalOptions
    from eval.evaluate import RESUMABLE

    def run(out, device, overrides, resume=False, auto_resume=False, **values):
        from eval.common import print_table
        from eval.evaluate import evaluate

        record, path = evaluate(config_from(CONFIGS[task], values, overrides), out=out, device=device, resume=resume,
                                auto_resume=auto_resume)
        if record is not None and record.get("finished"):
            return click.echo(f"{path.parent} already finished ({path.name}); nothing to evaluate")
        if record is not None:      # None under torchrun on ranks other than 0 (rank 0 reports)
            print_table([{"task": task, **record["metrics"]}])
            click.echo(f"result written to {path}")

    resumable = task in RESUMABLE
    params = config_params(CONFIGS[task]) + config_params(
        ResumableEvalOptions if resumable else EvalOptions, task=task,
        files=", checkpoint, metrics.jsonl, config.yaml" if resumable else "")
    eval_group.add_command(click.Command(task, callback=run, params=params, help=CONFIGS[task].__doc__,
                                         context_settings=CONTEXT))


for _task in ("knn", "linear", "finetune", "detection", "segmentation"):
    _eval_command(_task)


# --- commands: demo ----------------------------------------------------------------


@main.command(context_settings=CONTEXT, params=config_params(DemoOptions))
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
