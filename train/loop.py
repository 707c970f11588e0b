"""Stage 2: the training loop (cached or online), with exact resume, for one run or a sweep.

A run trains one :class:`Learner` (an objective with its optimiser, schedule, run folder, noise
and metrics); a sweep (``variants``, train/sweep.py) trains K of them against one data pass:
each batch is read, decoded and moved to the device once, the teachers' adapted tokens are
computed once per group of learners with equal frozen adapters, and student masks once per mask
ratio. Each learner keeps its own generator states (swapped in around its step), so it draws,
and logs, what its own single run would.

Schedules are precomputed by step. The only host syncs are at logging intervals (loss parts
and the non-finite check are accumulated on the device until then), at checkpoints and at the
end. A non-finite loss stops a run naming the first bad step, on every rank alike (the ranks
agree on it first); in a sweep it stops that learner alone (named, RUN/NAME/stopped.txt) and
the others go on. MFU counts what a step runs (train/flops.py). Metrics go to RUN/metrics.jsonl
(one JSON object per logged step), checkpoints to RUN/last.pt (atomic), the resolved config to
RUN/config.yaml, and at the end the student to RUN/student.safetensors and the loss curves to
RUN/loss.png. ``train.wandb=true`` sends a single run's rows to Weights & Biases as well
(train/tracking.py). Noise: train/noise.py.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from core.io import git_commit, write_atomic
from core.optim import lr_schedule, param_groups
from core.run import StepMetrics, first_non_finite, load_checkpoint, lock_folder, open_run, saved_config  # noqa: F401
from core.state import load_strict
from core import dist
from data import views as V
from core.errors import ExpectedError
from core.progress import progress_bar
from train.config import Config, apply_overrides, teacher_names
from train.flops import step_flops_per_image
from train.loader import Plan, resolve_data
from train.noise import restore_rng, resume_noise, rng_state, seed_noise
from train.objective import build_objective
from train.sources import build_source, check_learner_codec
from train.sweep import (STOPPED, check_heldout, check_sweep_folder, check_variants, heldout_columns, write_report,
                         write_sweep)


class NonFiniteLoss(ExpectedError, RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


# Paths may move between a run and its resume; what they hold is checked by digests.
_MOVABLE = {"data.images", "data.store", "train.out_dir", "train.wandb", "train.wandb_project"}


def train_step(objective, opt, batch: dict, *, lr: float, clip_grad: float, amp: bool, grid=None) -> dict:
    """One optimiser step on a materialised batch; returns the objective's loss dict. ``grid``:
    the batch's adapted teacher grid already computed (``objective.adapted_grid``, frozen adapters)."""
    for g in opt.param_groups:
        g["lr"] = lr
    dev = batch["images"].device
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
        parts = objective(batch) if grid is None else objective(batch, grid=grid)
    opt.zero_grad(set_to_none=True)
    parts["loss"].backward()
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(objective.trainable.parameters(), clip_grad)
    opt.step()
    return parts


def make_optimizer(cfg: Config, objective) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; the fused CUDA kernel when they are on a GPU."""
    groups = param_groups(objective.trainable, weight_decay=cfg.optim.weight_decay,
                          decay_1d=cfg.optim.decay_1d)
    fused = all(p.device.type == "cuda" for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.derived()["lr"], betas=tuple(cfg.optim.betas),
                             eps=cfg.optim.eps, fused=fused or None)


def wrap_student_side(objective, *, world: int, device: str, use_compile: bool) -> None:
    """DDP (more than one rank) and then ``torch.compile`` around the student side.

    No buffer broadcast: the student side's only buffer is the decoder's fixed sin-cos
    table, the same on every rank. Gradients are views into DDP's buckets (no copy)."""
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        dev = torch.device(device)
        objective.wrap_trainable(lambda m: DDP(m, device_ids=[dev.index] if dev.type == "cuda" else None,
                                               broadcast_buffers=False, gradient_as_bucket_view=True))
    if use_compile:
        objective.wrap_trainable(lambda m: torch.compile(m, backend=COMPILE_BACKEND))


# torch.compile's backend for ``train.compile=true``; the tests use "aot_eager" (inductor's
# first C++ compile of the student takes ~90 s on two CPU cores).
COMPILE_BACKEND = "inductor"


def all_finite(params) -> bool:
    """Whether every tensor of ``params`` is finite (one host sync)."""
    flags = [torch.isfinite(p.detach()).all() for p in params]
    return bool(torch.stack(flags).all()) if flags else True


def non_finite_message(first_bad: torch.Tensor, *, world: int, ckpt_path: Path) -> str | None:
    """"non-finite loss at step N; stopping (last good checkpoint: ...)" for the first bad step of
    any rank, or None. first_bad: () int64, this rank's first step with a non-finite loss, -1 if
    none. With several ranks, all agree (all-reduce MIN over the bad steps) before anyone acts,
    so no rank is left waiting in a collective. A host sync: called at logging intervals and
    before every checkpoint write."""
    step = first_non_finite(first_bad, world=world)
    if step is None:
        return None
    return f"non-finite loss at step {step}; stopping (last good checkpoint: {_good(ckpt_path)})"


def _good(ckpt_path: Path):
    return ckpt_path if Path(ckpt_path).exists() else "none written yet"


class Learner:
    """One objective trained on the data pass: its optimiser, learning-rate schedule, run folder
    (opened or resumed), generator states and device-side metrics. ``alone``: a single run,
    whose non-finite loss raises NonFiniteLoss; a sweep's learner stops alone instead
    (``stopped`` holds the message)."""

    def __init__(self, name: str | None, cfg: Config, out: Path, *, stats: dict, total: int, spe: int,
                 device: str, rank: int, world: int, resume: bool, alone: bool):
        self.name, self.cfg, self.out, self.alone = name, cfg, Path(out), alone
        self.device, self.rank, self.world = device, rank, world
        warmup = int(round(total * cfg.schedule.warmup_epochs / cfg.schedule.epochs))  # same fraction if capped
        self.lrs = lr_schedule(total_steps=total, warmup_steps=warmup, peak=cfg.derived()["lr"],
                               kind=cfg.schedule.kind, min_lr=cfg.schedule.min_lr)
        self.objective = build_objective(cfg, stats).to(device)
        wrap_student_side(self.objective, world=world, device=device, use_compile=cfg.train.compile)
        self.opt = make_optimizer(cfg, self.objective)
        info = dict(source=cfg.data.source, world_size=world, steps_per_epoch=spe)
        self.run = open_run(self.out, config=cfg, resume=resume, movable=_MOVABLE, compare=dict(total_steps=total),
                            info=info, rank=rank)
        self.meta = dict(config=cfg.to_dict(), git_commit=git_commit(), total_steps=total, **info)
        self.step, self.spe = self.run.step, spe
        self.tracker = None
        try:
            if cfg.train.wandb and rank == 0:
                from train.tracking import Tracker
                self.tracker = Tracker(self.out, project=cfg.train.wandb_project, config=cfg.to_dict(),
                                       resumed=self.run.resumed)
            seed_noise(cfg.train.seed, rank)
            if self.run.resumed:
                load_strict(self.objective.student_side(), self.run.state["model"],
                            what=f"checkpoint {self.run.checkpoint_path}")
                self.opt.load_state_dict(self.run.state["optimizer"])
                resume_noise(self.run.state.get("rng"), seed=cfg.train.seed, rank=rank, world=world, step=self.step,
                             device=device)
        except BaseException:                           # a learner that cannot start gives its folder back
            self.close()
            raise
        self.rng = rng_state(device)                    # this learner's generators between its steps
        self.acc = StepMetrics(device)
        self.amp = torch.device(device).type == "cuda" and cfg.train.amp == "bf16"
        self.stopped: str | None = None
        self.last: dict = {}
        self.flops = None                               # per image, from the first batch's shapes
        self.grid_key = None                            # set by share_frozen_adapters

    @property
    def label(self) -> str:
        return f"learner {self.name!r}: " if self.name else ""

    def train_on(self, batch: dict, grid=None) -> None:
        """One optimiser step on ``batch`` with this learner's generators."""
        restore_rng(self.rng, self.device)
        if self.flops is None:
            self.flops = step_flops_per_image(
                self.cfg, n_visible=batch["student_visible"].shape[1],
                teacher_tokens={n: 1 + t["index"].shape[1] for n, t in batch["teachers"].items()},
                widths={n: a.in_dim for n, a in self.objective.adapters.items()})["total"]
        parts = train_step(self.objective, self.opt, batch, lr=float(self.lrs[self.step]),
                           clip_grad=self.cfg.train.clip_grad, amp=self.amp, grid=grid)
        self.rng = rng_state(self.device)
        self.acc.add(self.step, parts)
        self.step += 1

    def stop(self, message: str) -> None:
        """Stop on a non-finite loss or state: raise (a single run), or stop this learner alone."""
        if self.alone:
            raise NonFiniteLoss(message)
        self.stopped = f"{self.label}{message}"
        if self.rank == 0:
            write_atomic(self.out / STOPPED, self.stopped + "\n")
        self.close()
        self.objective = self.opt = None                # its memory goes back to the others

    def log(self, *, epoch: int, ips: float, peak: float | None) -> None:
        """Log the means since the last row (a host sync and, with several ranks, an all-reduce);
        a non-finite loss stops the learner instead."""
        message = non_finite_message(self.acc.first_bad, world=self.world, ckpt_path=self.run.checkpoint_path)
        if message is not None:
            return self.stop(message)
        self.last = {"step": self.step, "epoch": epoch, "lr": float(self.lrs[self.step - 1]),
                     **self.acc.reduce(self.world), "images_per_second": ips}
        if peak:
            self.last["mfu"] = ips / self.world * self.flops / peak
        self.run.log(self.last)
        if self.tracker is not None:
            self.tracker.log(self.last)

    def checkpoint(self) -> None:
        """Save the learner; a non-finite loss or state never replaces its last good checkpoint."""
        ckpt_path = self.run.checkpoint_path
        message = non_finite_message(self.acc.first_bad, world=self.world, ckpt_path=ckpt_path)
        if message is None and not all_finite(self.objective.student_side().parameters()):
            message = f"non-finite weights after step {self.step - 1}; stopping (last good checkpoint: " \
                      f"{_good(ckpt_path)})"
        if message is not None:
            return self.stop(message)
        rngs = dist.all_gather(self.rng)                # every rank's generators, by rank
        self.run.save(dict(model=self.objective.student_side().state_dict(), optimizer=self.opt.state_dict(),
                           step=self.step, epoch=self.step // self.spe, step_in_epoch=self.step % self.spe,
                           meta=self.meta, rng=rngs))
        dist.barrier()

    def finish(self) -> None:
        """Rank 0: the student as RUN/student.safetensors and the loss curves as RUN/loss.png."""
        if self.rank == 0 and self.stopped is None:
            from train.export import export_student
            from train.plots import plot_losses
            export_student(self.objective.student, self.out / "student.safetensors")
            plot_losses(self.out / "metrics.jsonl", self.out / "loss.png")

    def close(self) -> None:
        self.run.close()
        if self.tracker is not None:
            self.tracker.close()


def share_frozen_adapters(learners: list[Learner]) -> None:
    """Learners whose frozen adapters are equal (same weights, same autocast) share one module and
    one adapted grid per batch (``grid_key``: the first such learner's position); trainable
    adapters are the learner's own."""
    if len(learners) < 2:
        return                          # a single run computes its grid in the forward
    firsts: list[Learner] = []
    for i, learner in enumerate(learners):
        mine = learner.objective.frozen_adapters
        if mine is None:
            continue
        for first in firsts:
            theirs = first.objective.frozen_adapters
            if first.amp == learner.amp and _equal_states(theirs.state_dict(), mine.state_dict()):
                learner.objective.frozen_adapters, learner.grid_key = theirs, first.grid_key
                break
        else:
            learner.grid_key = i
            firsts.append(learner)


def _equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


class SharedBatch:
    """One batch of the pass, as each learner takes it: the student masks of its mask ratio (the
    batch's own, or drawn once per other ratio from the same keyed draw) and the adapted grid of
    its frozen adapters (computed once per ``grid_key``)."""

    def __init__(self, batch: dict, *, index: torch.Tensor, epoch: int, seed: int, device: str):
        """batch: materialised on ``device``; index: its image indices on the CPU (no device sync)."""
        self.batch, self.index, self.epoch, self.seed, self.device = batch, index, epoch, seed, device
        self.masks = {batch["student_visible"].shape[1]: batch["student_visible"]}
        self.grids: dict = {}

    def for_learner(self, learner: Learner) -> tuple[dict, object]:
        """(the learner's batch, its adapted grid or None)."""
        n = learner.cfg.data.student_visible
        if n not in self.masks:
            masks = V.student_visible(self.seed, self.index.numpy(), self.epoch, n_visible=n)
            self.masks[n] = torch.from_numpy(masks).to(self.device)
        batch = self.batch if self.masks[n] is self.batch["student_visible"] else {
            **self.batch, "student_visible": self.masks[n]}
        if learner.grid_key is None:
            return batch, None
        if learner.grid_key not in self.grids:
            dev = torch.device(self.device)
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=learner.amp):
                self.grids[learner.grid_key] = learner.objective.adapted_grid(batch)
        return batch, self.grids[learner.grid_key]


def train(cfg: Config, *, out_dir, online: bool = False, max_steps: int | None = None, resume: bool = False,
          device: str = "cpu", ckpt_steps: int = 0, progress: bool = True, variants=None,
          heldout: tuple | None = None) -> dict:
    """Train the student; returns {steps, out_dir, last (metrics), seconds, learners: {name:
    {status, steps, last}}}.

    ``variants`` (train/sweep.py Variant list): a sweep, one learner per variant in OUT/NAME;
    ``--resume`` of a sweep continues each learner from its own checkpoint (one that has none
    starts again, one that stopped stays stopped). ``max_steps`` caps the total number of
    optimiser steps (the schedule is still the one of ``schedule.epochs`` unless max_steps is
    smaller, in which case it spans max_steps). ``ckpt_steps`` > 0 also checkpoints every that
    many steps (besides every ``train.ckpt_every`` epochs). ``online=True`` is the old switch
    for ``data.source=online-replay``. ``heldout`` (a sweep): (store, images) of held-out data,
    whose losses under each learner join the sweep's report (train/sweep.py heldout_columns).
    """
    if online:
        if cfg.data.source == "online-fresh":
            raise ValueError("--online (online-replay) contradicts data.source=online-fresh; give one of them")
        cfg = apply_overrides(cfg, ["data.source=online-replay"])
    out = Path(out_dir)
    sweep = variants is not None
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
    cfg = resolve_data(cfg, data, recorded=(recorded or {}).get("data"))
    configs = {None: cfg} if not sweep else {v.name: _learner_config(cfg, v, folders[v.name]) for v in variants}
    plan = Plan.of(cfg, data, rank=rank, world=world)
    source, stats = build_source(cfg, plan, device=device, run_dir=out)
    for c in configs.values():
        check_learner_codec(c, source)                  # every learner, before any is built
    if heldout is not None:
        if not sweep:
            raise ValueError("held-out losses are reported for the learners of a sweep; give --variant or --sweep")
        check_heldout(heldout[0], heldout[1], train_store=cfg.data.store, teachers=teacher_names(cfg))
    spe = plan.steps_per_epoch
    total = cfg.schedule.epochs * spe if max_steps is None else min(max_steps, cfg.schedule.epochs * spe)
    root = lock_folder(out, rank=rank) if sweep else None   # the sweep's own files; a learner locks its folder
    status, learners, bar = {}, [], None
    try:
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
                bar.update(1)
                if step % cfg.train.log_every == 0 or step == total:
                    now = time.perf_counter()
                    ips = img_log / (now - t_log)
                    for learner in now_training:
                        learner.log(epoch=epoch, ips=ips, peak=peak)
                    shown = next((x.last for x in now_training if x.stopped is None and x.last), {})
                    if shown:
                        bar.set_postfix(loss=f"{shown['loss']:.4f}", img_s=f"{ips:.1f}")
                    t_log, img_log = now, 0
                if (ckpt_steps and step % ckpt_steps == 0) or step % (spe * cfg.train.ckpt_every) == 0 \
                        or step == total:
                    for learner in now_training:
                        if learner.stopped is None:
                            learner.checkpoint()
                if step >= total or all(x.stopped is not None for x in learners):
                    break
        elapsed = time.perf_counter() - t0
        for learner in learners:
            learner.finish()
            status[learner.name] = learner.stopped or "done"
        if sweep and rank == 0:
            extra = None if heldout is None else heldout_columns(out, variants, status, store=heldout[0],
                                                                 data=heldout[1], train_store=cfg.data.store,
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
    summary = {learner.name: dict(status=status[learner.name], steps=learner.step, last=learner.last)
               for learner in learners}
    summary.update({n: dict(status=s, steps=None, last={}) for n, s in status.items() if n not in summary})
    return dict(steps=step, out_dir=str(out), last=learners[0].last if learners else {}, seconds=elapsed,
                learners=summary, stopped={n: s for n, s in status.items() if s != "done"})


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
