"""The ``train`` command's parameters (cli.py declares the command; its parameters live here so
that cli.py stays short). Importing this module imports click only."""
from __future__ import annotations

import click

__all__ = ["TRAIN_PARAMS"]

_DIR = click.Path(exists=True, file_okay=False)

TRAIN_PARAMS = [
    click.Option(["--data"], required=True, type=_DIR, help="Images packed by `prepare` (data.images)."),
    click.Option(["--store", "store_path"], default=None, type=_DIR,
                 help="Feature store made by `extract` (data.store). The online sources use it for the "
                      "teachers' identity and statistics only; online-fresh can go without one "
                      "(data.teachers_from)."),
    click.Option(["--out", "out_dir"], required=True, type=click.Path(file_okay=False),
                 help="Run folder (of a sweep: one sub-folder per learner)."),
    click.Option(["--config", "config_file"], type=click.Path(exists=True, dir_okay=False), default=None,
                 help="YAML overrides of the default config (train/config.py)."),
    click.Option(["--online"], is_flag=True,
                 help="Same as data.source=online-replay: run the teachers every step on the store's views "
                      "(data.source=online-fresh: on a new view every epoch)."),
    click.Option(["--epochs"], type=int, default=None, help="Sets schedule.epochs."),
    click.Option(["--steps"], type=int, default=None, help="Stop after this many steps (schedule shortened to match)."),
    click.Option(["--batch-size"], type=int, default=None, help="Sets train.batch_size (global, all ranks)."),
    click.Option(["--variant", "variants"], multiple=True, metavar="[NAME:]KEY=VALUE ...",
                 help="A learner of a sweep trained on the same data pass: the config plus these overrides "
                      "(space-separated), in OUT/NAME (repeatable; train/sweep.py)."),
    click.Option(["--sweep", "sweep_file"], type=click.Path(exists=True, dir_okay=False), default=None,
                 help="A YAML file of the sweep's learners: 'learners: {NAME: {KEY: VALUE, ...}, ...}'."),
    click.Option(["--heldout", "heldout"], type=(_DIR, _DIR), default=None, metavar="STORE DATA",
                 help="A sweep's report adds every learner's losses on this held-out store of the images DATA "
                      "(fp16 and int8 tokens serve as they are; a coefficient codec must be on the training store's "
                      "basis)."),
    click.Option(["--resume"], is_flag=True,
                 help="Continue the run (or every learner of the sweep) in --out exactly where its "
                      "checkpoint left it."),
    click.Option(["--ckpt-steps"], type=int, default=0, help="Also checkpoint every N steps (0: epoch ends only)."),
    click.Option(["--device"], default="auto", help="auto, cpu, cuda (cuda:LOCAL_RANK under torchrun)."),
    click.Argument(["overrides"], nargs=-1, metavar="[KEY=VALUE]..."),
]
