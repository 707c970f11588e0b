"""One learner of a run or a sweep (``Learner``: an objective with its optimiser, schedule, run
folder, noise and metrics), its step, and what learners share (one batch materialised once, the
adapted grid of equal frozen adapters). The loop that drives them is train/loop.py."""
from __future__ import annotations

from pathlib import Path

import torch

from core import dist
from core.errors import ExpectedError
from core.io import git_commit, remove_temp_files, save_atomic, write_atomic
from core.optim import lr_schedule, param_groups
from core.precision import autocast, autocast_dtype, grad_scaler
from core.run import StepMetrics, first_non_finite, open_run
from core.state import load_strict
from data import views as V
from train.config import Config
from train.flops import step_flops_per_image
from train.noise import restore_rng, resume_noise, rng_state, seed_noise
from train.objective import build_objective
from train.sweep import STOPPED


class NonFiniteLoss(ExpectedError, RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


SNAPSHOTS = "snapshots"          # RUN/snapshots/epoch_NNNN.safetensors (and .pt): train.snapshot_every

# Paths may move between a run and its resume (what they hold is checked by digests); logging to
# W&B and keeping snapshots may change too.
_MOVABLE = {"data.images", "data.store", "train.out_dir", "train.wandb", "train.wandb_project",
            "train.snapshot_every", "train.snapshot_full"}


def train_step(objective, opt, batch: dict, *, lr: float, clip_grad: float, amp: torch.dtype | None,
               scaler: torch.amp.GradScaler | None = None, grid=None) -> dict:
    """One optimiser step on a materialised batch; returns the objective's loss dict (its parts
    float32 under any autocast). ``amp``: the autocast dtype (None: float32; core/precision.py);
    ``scaler``: float16's gradient scaler (``grad_scaler``): the loss is scaled for the backward,
    the gradients unscaled before clipping, and a step whose gradients overflowed is skipped by
    the scaler, which then lowers its scale. ``grid``: the batch's adapted teacher grid already
    computed (``objective.adapted_grid``, frozen adapters)."""
    for g in opt.param_groups:
        g["lr"] = lr
    with autocast(batch["images"].device, amp):
        parts = objective(batch) if grid is None else objective(batch, grid=grid)
    opt.zero_grad(set_to_none=True)
    (parts["loss"] if scaler is None else scaler.scale(parts["loss"])).backward()
    if clip_grad > 0:
        if scaler is not None:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(objective.trainable.parameters(), clip_grad)
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()
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
# first C++ compile of the student is slow on a CPU).
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
        self.amp = autocast_dtype(cfg.train.amp, device)   # None: float32
        self.scaler = grad_scaler(self.amp, device)     # float16's; its state is in the checkpoint
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
                if self.scaler is not None and self.run.state.get("scaler"):
                    self.scaler.load_state_dict(self.run.state["scaler"])
                resume_noise(self.run.state.get("rng"), seed=cfg.train.seed, rank=rank, world=world, step=self.step,
                             device=device)
        except BaseException:                           # a learner that cannot start gives its folder back
            self.close()
            raise
        self.rng = rng_state(device)                    # this learner's generators between its steps
        self.acc = StepMetrics(device)
        self.stopped: str | None = None
        self.last: dict = {}
        self.flops = None                               # per image, from the first batch's shapes
        self.grid_key = None                            # set by share_frozen_adapters
        self.saved = self.step                          # the step of its last checkpoint (or start)

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
                           clip_grad=self.cfg.train.clip_grad, amp=self.amp, scaler=self.scaler, grid=grid)
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
        self.run.note(self.stopped)                     # the learner's log.txt ends with why
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

    def checkpoint(self, *, snapshot: bool = False) -> None:
        """Save the learner; a non-finite loss or state never replaces its last good checkpoint.
        ``snapshot``: also keep the student (and with ``train.snapshot_full`` the checkpoint) in
        RUN/snapshots/epoch_NNNN.* (NNNN: epochs done)."""
        ckpt_path = self.run.checkpoint_path
        message = non_finite_message(self.acc.first_bad, world=self.world, ckpt_path=ckpt_path)
        if message is None and not all_finite(self.objective.student_side().parameters()):
            message = f"non-finite weights after step {self.step - 1}; stopping (last good checkpoint: " \
                      f"{_good(ckpt_path)})"
        if message is not None:
            return self.stop(message)
        rngs = dist.all_gather(self.rng)                # every rank's generators, by rank
        state = dict(model=self.objective.student_side().state_dict(), optimizer=self.opt.state_dict(),
                     step=self.step, epoch=self.step // self.spe, step_in_epoch=self.step % self.spe,
                     meta=self.meta, rng=rngs)
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        self.run.save(state)
        if snapshot and self.rank == 0:
            self._snapshot(state)
        self.saved = self.step
        dist.barrier()

    def _snapshot(self, state: dict) -> None:
        """RUN/snapshots/epoch_NNNN.safetensors, the student as RUN/student.safetensors holds it
        (what ``eval`` and ``model.checkpoint`` load), and with ``train.snapshot_full`` the
        checkpoint ``state`` as epoch_NNNN.pt (last.pt's form); each written atomically."""
        from train.export import student_file
        folder = self.out / SNAPSHOTS
        remove_temp_files(folder)                       # of a save cut short by a kill (this run holds the lock)
        name = f"epoch_{self.step // self.spe:04d}"
        write_atomic(folder / f"{name}.safetensors", student_file(self.objective.student))
        if self.cfg.train.snapshot_full:
            save_atomic(state, folder / f"{name}.pt")

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
            with torch.no_grad(), autocast(self.device, learner.amp):
                self.grids[learner.grid_key] = learner.objective.adapted_grid(batch)
        return batch, self.grids[learner.grid_key]
