"""The ``train`` command's options (cli.py declares the command from these fields with
core/options.py, so that cli.py stays short). The training config itself is train/config.py:
these are the job's inputs, a few shortcuts into that config and ``KEY=VALUE`` overrides of it.
Importing this module imports click only."""
from __future__ import annotations

from dataclasses import dataclass

from core.options import option

__all__ = ["TrainOptions"]


@dataclass
class TrainOptions:
    data: str = option("", "Images packed by `prepare` (data.images).", required=True, path="dir")
    store_path: str | None = option(
        None, "Feature store made by `extract` (data.store). The online sources use it for the teachers' identity "
              "and statistics only; online-fresh can go without one (data.teachers_from).", flag="--store", path="dir")
    out_dir: str = option("", "Run folder (of a sweep: one sub-folder per learner).", flag="--out", required=True,
                          path="dir", exists=False)
    config_file: str | None = option(None, "YAML overrides of the default config (train/config.py).", flag="--config",
                                     path="file")
    online: bool = option(False, "Same as data.source=online-replay: run the teachers every step on the store's views "
                                 "(data.source=online-fresh: on a new view every epoch).", negatable=False)
    epochs: int | None = option(None, "Sets schedule.epochs.")
    steps: int | None = option(None, "Stop after this many steps (schedule shortened to match).")
    batch_size: int | None = option(None, "Sets train.batch_size (global, all ranks).")
    variants: tuple[str, ...] = option(
        (), "A learner of a sweep trained on the same data pass: the config plus these overrides (space-separated), "
            "in OUT/NAME (repeatable; train/sweep.py).", flag="--variant", metavar="[NAME:]KEY=VALUE ...")
    sweep_file: str | None = option(
        None, "A YAML file of the sweep's learners: 'learners: {NAME: {KEY: VALUE, ...}, ...}'.", flag="--sweep",
        path="file")
    heldout: tuple[str, str] | None = option(
        None, "A sweep's report adds every learner's losses on this held-out store of the images DATA (fp16 and int8 "
              "tokens serve as they are; a coefficient codec must be on the training store's basis).",
        path="dir", metavar="STORE DATA")
    resume: bool = option(False, "Continue the run (or every learner of the sweep) in --out exactly where its "
                                 "checkpoint left it.", negatable=False)
    auto_resume: bool = option(False, "Resume when --out holds a run (its last.pt) or a sweep (its sweep.yaml), start "
                                      "otherwise; a run already at its last step is left as it is (exit status 0).",
                               negatable=False)
    ckpt_steps: int = option(0, "Also checkpoint every N steps (0: epoch ends only).")
    device: str = option("auto", "auto, cpu, cuda (cuda:LOCAL_RANK under torchrun).")
    requeue: bool = option(False, "On SIGTERM/SIGUSR1 (checkpoint written, exit status 75) also run `scontrol requeue "
                                  "$SLURM_JOB_ID` (also COMAD_REQUEUE=1).", negatable=False)
    overrides: tuple[str, ...] = option((), "Config values: KEY=VALUE.", argument=True, metavar="[KEY=VALUE]...")
