"""Stage 2: the training loop (cached or online), with exact resume, for one run or a sweep.

A run trains one learner (train/learner.py); a sweep (train/sweep.py) trains K of them against
one data pass (docs/CONTRACTS.md, "Learners and sweeps"). What a run folder holds:
docs/running.md, section 4."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from core import dist
from core.preempt import PreemptSignals, requeue_wanted
from core.progress import progress_bar
from core.run import CHECKPOINT, load_checkpoint, lock_folder, saved_config
from train.config import Config, apply_overrides, teacher_names
from train.learner import Learner, SharedBatch, share_frozen_adapters
from train.loader import Plan
from train.runstore import open_run_store
from train.sources import build_source
from train.sweep import (STOPPED, SWEEP, check_heldout, check_sweep_folder, check_variants, heldout_columns,
                         write_report, write_sweep)


def train(cfg: Config, *, out_dir, online: bool = False, max_steps: int | None = None, resume: bool = False,
          device: str = "cpu", ckpt_steps: int = 0, progress: bool = True, variants=None,
          heldout: tuple | None = None, auto_resume: bool = False, requeue: bool = False) -> dict:
    """Train the student; returns {steps, out_dir, last (metrics), seconds, learners: {name:
    {status, steps, last}}, finished}.

    ``variants`` (train/sweep.py Variant list): a sweep, one learner per variant in OUT/NAME;
    ``--resume`` of a sweep continues each learner from its own checkpoint (one that has none
    starts again, one that stopped stays stopped). ``max_steps`` caps the total number of
    optimiser steps (the schedule is still the one of ``schedule.epochs`` unless max_steps is
    smaller, in which case it spans max_steps). ``ckpt_steps`` > 0 also checkpoints every that
    many steps (besides every ``train.ckpt_every`` epochs). ``online=True`` is the old switch
    for ``data.source=online-replay``. ``heldout`` (a sweep): (store, images) of held-out data,
    whose losses under each learner join the sweep's report (train/sweep.py heldout_columns).
    ``auto_resume``: resume when OUT holds what ``resume`` continues (a run's last.pt, a sweep's
    sweep.yaml), start otherwise; a run whose every learner is at its last step (or stopped) is
    left untouched and the summary says ``finished``. SIGTERM or SIGUSR1 stops the run after the
    current step with every learner's checkpoint written: ``core.preempt.Preempted`` (``requeue``,
    or COMAD_REQUEUE=1: then requeue the SLURM job; docs/running.md section 4, "Preemption").
    """
    if online:
        if cfg.data.source == "online-fresh":
            raise ValueError("--online (online-replay) contradicts data.source=online-fresh; give one of them")
        cfg = apply_overrides(cfg, ["data.source=online-replay"])
    out = Path(out_dir)
    sweep = variants is not None
    if auto_resume:
        if resume:
            raise ValueError("--resume and --auto-resume exclude each other; give one of them")
        resume = (out / (SWEEP if sweep else CHECKPOINT)).is_file()
    if sweep:
        check_variants(variants)
        if cfg.train.wandb:
            raise ValueError("train.wandb=true logs one run; a sweep's learners log to TensorBoard in OUT/NAME")
    if cfg.train.wandb:
        from train.tracking import require_wandb
        require_wandb()                                 # before any work
    dist.init_from_env(device)
    rank, world = dist.rank(), dist.world_size()
    device = dist.local_device(device)
    if cfg.train.batch_size % world:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is not divisible by {world} ranks")
    from data.shards import ImageSet
    data = ImageSet.open(cfg.data.images)
    folders = {None: out} if not sweep else {v.name: out / v.name for v in variants}
    recorded = next(filter(None, map(saved_config, folders.values())), None) if resume else None
    cfg, store = open_run_store(cfg, data, recorded=(recorded or {}).get("data"), device=device)  # the store's one open
    configs = {None: cfg} if not sweep else {v.name: _learner_config(cfg, v, folders[v.name]) for v in variants}
    if store is not None:
        store.check_learners(configs.values())          # every learner, before any is built
    plan = Plan.of(cfg, data, store, rank=rank, world=world)
    source, stats = build_source(cfg, plan, device=device, store=store, run_dir=out)
    if heldout is not None:
        if not sweep:
            raise ValueError("held-out losses are reported for the learners of a sweep; give --variant or --sweep")
        heldout = check_heldout(heldout[0], heldout[1], train=store, teachers=teacher_names(cfg))
    spe = plan.steps_per_epoch
    total = cfg.schedule.epochs * spe if max_steps is None else min(max_steps, cfg.schedule.epochs * spe)
    if auto_resume and resume:
        if sweep:
            check_sweep_folder(out, variants, resume=True)
        if all(_finished(folder, total, sweep=sweep) for folder in folders.values()):
            return dict(steps=total, out_dir=str(out), last={}, seconds=0.0, learners={}, stopped={}, finished=True)
    root = lock_folder(out, rank=rank) if sweep else None   # the sweep's own files; a learner locks its folder
    signals = PreemptSignals(world=world, rank=rank, requeue=requeue_wanted(requeue))
    status, learners, bar = {}, [], None
    try:
        signals.install()
        if sweep:
            check_sweep_folder(out, variants, resume=resume)
            dist.barrier()                              # every rank has checked before rank 0 writes
            if rank == 0:
                write_sweep(out, variants)
        for name, folder in folders.items():
            if sweep and resume and (folder / STOPPED).is_file():
                status[name] = (folder / STOPPED).read_text().strip()
                continue
            learners.append(Learner(name, configs[name], folder, stats=stats, total=total, spe=spe, device=device,
                                    rank=rank, world=world, alone=not sweep,
                                    resume=resume and (not sweep or (folder / "last.pt").is_file())))
        share_frozen_adapters(learners)
        peak = _peak_flops(torch.device(device))
        step = min((learner.step for learner in learners), default=total)
        desc = f"train ({cfg.data.source})" if not sweep else f"sweep of {len(folders)} ({cfg.data.source})"
        bar = progress_bar(total=total, initial=step, unit="step", desc=desc, progress=progress and rank == 0,
                           dynamic_ncols=True)
        t_log, img_log, t0 = time.perf_counter(), 0, time.perf_counter()
        while step < total and any(learner.stopped is None for learner in learners):
            epoch, start = divmod(step, spe)
            for _, cpu_batch in source.epoch(epoch, start_step=start):
                shared = SharedBatch(source.materialize(cpu_batch, device), index=cpu_batch["index"], epoch=epoch,
                                     seed=cfg.data.seed, device=device)
                now_training = [x for x in learners if x.stopped is None and x.step == step]
                for learner in now_training:
                    learner.train_on(*shared.for_learner(learner))
                step += 1
                img_log += plan.batch_size
                if step % cfg.train.log_every == 0 or step == total:
                    now = time.perf_counter()
                    ips = img_log / (now - t_log)
                    for learner in now_training:
                        learner.log(epoch=epoch, ips=ips, peak=peak)
                    shown = next((x.last for x in now_training if x.stopped is None and x.last), {})
                    if shown:
                        bar.set_postfix(_postfix(shown, ips))
                    t_log, img_log = now, 0
                bar.update(1)                           # after the postfix: a progress line shows this step's
                snapshot = bool(cfg.train.snapshot_every) and step % (spe * cfg.train.snapshot_every) == 0
                if (ckpt_steps and step % ckpt_steps == 0) or step % (spe * cfg.train.ckpt_every) == 0 \
                        or step == total or snapshot:
                    for learner in now_training:
                        if learner.stopped is None:
                            learner.checkpoint(snapshot=snapshot)
                if step >= total or all(x.stopped is not None for x in learners):
                    break
                received = signals.agreed()             # every step: a host integer, no device sync
                if received is not None:
                    raise _preempted(signals, received, learners, step=step, total=total, out=out, sweep=sweep)
        elapsed = time.perf_counter() - t0
        for learner in learners:
            learner.finish()
            status[learner.name] = learner.stopped or "done"
        if sweep and rank == 0:
            extra = None if heldout is None else heldout_columns(out, variants, status, store=heldout[0],
                                                                 data=heldout[1], train_store=store.fs,
                                                                 device=device)
            write_report(out, variants, status=status, extra=extra)
        dist.barrier()
    finally:                                            # the folders' locks are held until here
        if bar is not None:
            bar.close()
        for learner in learners:
            learner.close()
        if root is not None:
            root.release()
        signals.close()                                 # the handlers back; a requeue once all is closed
    summary = {learner.name: dict(status=status[learner.name], steps=learner.step, last=learner.last)
               for learner in learners}
    summary.update({n: dict(status=s, steps=None, last={}) for n, s in status.items() if n not in summary})
    return dict(steps=step, out_dir=str(out), last=learners[0].last if learners else {}, seconds=elapsed,
                learners=summary, stopped={n: s for n, s in status.items() if s != "done"}, finished=False)


def _preempted(signals: PreemptSignals, received: str, learners: list[Learner], *, step: int, total: int, out: Path,
               sweep: bool) -> Exception:
    """Checkpoint every live learner not saved at its step (on every rank, together: a learner
    resumed ahead of the pass is saved at its own); the Preempted error naming the step."""
    for learner in learners:
        if learner.stopped is None and learner.saved != learner.step:
            learner.checkpoint()
    live = [x for x in learners if x.stopped is None]
    where = f"checkpoint written to {out / CHECKPOINT}" if not sweep else \
        f"checkpoints of {len(live)} learner(s) written to {out}/NAME/{CHECKPOINT}"
    return signals.stop(f"preempted by {received} at step {step} of {total}: {where}; resume with --resume or "
                        "--auto-resume")


def _postfix(last: dict, ips: float) -> dict:
    """What the progress bar and its lines show of a learner's last metrics row: the loss, its
    parts, the learning rate and images per second."""
    parts = {k[len("loss_"):]: f"{v:.4f}" for k, v in last.items() if k.startswith("loss_")}
    return {"loss": f"{last['loss']:.4f}", **parts, "lr": f"{last['lr']:.3g}", "img_s": f"{ips:.1f}"}


def _finished(folder: Path, total: int, *, sweep: bool) -> bool:
    """Whether a resume of ``folder`` has nothing to do: a learner of a sweep that stopped, or a
    checkpoint at step ``total``."""
    if sweep and (folder / STOPPED).is_file():
        return True
    return (folder / CHECKPOINT).is_file() and int(load_checkpoint(folder / CHECKPOINT).get("step", 0)) >= total


def _learner_config(cfg: Config, variant, folder: Path) -> Config:
    """The base config plus a variant's overrides, validated; ValueError naming the learner."""
    try:
        return apply_overrides(cfg, [*variant.overrides, f"train.out_dir={folder}"]).validate()
    except ValueError as error:
        raise ValueError(f"learner {variant.name!r}: {error}") from None


def _peak_flops(dev: torch.device) -> float | None:
    """The card's bf16 matrix rate, measured once with a large matmul (None on the CPU)."""
    if dev.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(dev)
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize(dev)
    return 20 * 2 * n ** 3 / (time.perf_counter() - t)
