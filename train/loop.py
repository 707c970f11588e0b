"""Stage 2: the training loop (cached or online), with exact resume.

Schedules are precomputed by step. The only host syncs are at logging intervals (loss
parts and the non-finite check are accumulated on the device until then), at checkpoints
and at the end. A non-finite loss stops the run naming the first bad step, on every rank
alike (the ranks agree on it first). MFU counts what a step runs (train/flops.py). Metrics go to
RUN/metrics.jsonl (one JSON object per logged step), checkpoints to RUN/last.pt (atomic),
the resolved config to RUN/config.yaml, and at the end the student to
RUN/student.safetensors and the loss curves to RUN/loss.png. ``train.wandb=true`` sends the
logged rows to Weights & Biases as well (train/tracking.py).

The run's noise (stochastic depth, anything else drawn from torch's global generators) is seeded
per rank from (train.seed, rank), so two runs of one config draw the same and the ranks draw
differently; every checkpoint holds each rank's generator states and a resume on the same number
of ranks restores its own (resumed == uninterrupted).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from core.io import git_commit
from core.optim import lr_schedule, param_groups
from core.run import StepMetrics, first_non_finite, load_checkpoint, open_run, saved_config  # noqa: F401
from core.state import load_strict
from extract import dist
from store.errors import ExpectedError
from store.progress import progress_bar
from store.roles import Role
from store.views import hash_keys
from train.config import Config, teacher_names
from train.flops import step_flops_per_image
from train.loader import CachedSource, Plan, resolve_data, store_views
from train.objective import build_objective
from train.requirements import check_codec


class NonFiniteLoss(ExpectedError, RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


# Paths may move between a run and its resume; what they hold is checked by digests.
_MOVABLE = {"data.images", "data.store", "train.out_dir", "train.wandb", "train.wandb_project"}


def train_step(objective, opt, batch: dict, *, lr: float, clip_grad: float, amp: bool) -> dict:
    """One optimiser step on a materialised batch; returns the objective's loss dict."""
    for g in opt.param_groups:
        g["lr"] = lr
    dev = batch["images"].device
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
        parts = objective(batch)
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


def rng_state(device: str) -> dict:
    """The generators a step may draw from: the CPU one and, on CUDA, the device's own."""
    dev = torch.device(device)
    return dict(torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None)


def restore_rng(state: dict, device: str) -> None:
    """Restore ``rng_state``'s generators; the states are CPU byte tensors (load with
    ``map_location="cpu"``), each set by its own setter on ``device``."""
    torch.set_rng_state(state["torch"].cpu())
    dev, cuda = torch.device(device), state.get("cuda")
    if isinstance(cuda, (list, tuple)):         # older checkpoints: every visible GPU's state
        cuda = cuda[dev.index or 0] if cuda else None
    if dev.type == "cuda" and cuda is not None:
        torch.cuda.set_rng_state(cuda.cpu(), dev)


def seed_noise(seed: int, rank: int, *extra: int) -> None:
    """Seed torch's global generators (CPU and every GPU) from the keyed hash of (seed, rank,
    *extra) (store/roles.py, Role.NOISE)."""
    torch.manual_seed(int(hash_keys(Role.NOISE, seed, rank, *extra)) >> 1)   # 63 bits


def resume_noise(saved, *, seed: int, rank: int, world: int, step: int, device: str) -> None:
    """Continue the noise of a checkpoint: each rank's own saved state when the checkpoint
    holds one per rank of this world size; a single-process state in one process; otherwise
    (another world size, or a checkpoint with rank 0's state only) fresh per-rank noise keyed
    by (seed, rank, step), so that no two ranks draw the same masks."""
    if isinstance(saved, list) and len(saved) == world:
        restore_rng(saved[rank], device)
    elif isinstance(saved, dict) and world == 1:
        restore_rng(saved, device)
    else:
        seed_noise(seed, rank, step)


def all_finite(params) -> bool:
    """Whether every tensor of ``params`` is finite (one host sync)."""
    flags = [torch.isfinite(p.detach()).all() for p in params]
    return bool(torch.stack(flags).all()) if flags else True


def stop_if_non_finite(first_bad: torch.Tensor, *, world: int, ckpt_path: Path) -> None:
    """Raise NonFiniteLoss naming the first bad step of any rank, on every rank alike.

    first_bad: () int64, this rank's first step with a non-finite loss, -1 if none. With
    several ranks, all agree (all-reduce MIN over the bad steps) before anyone raises, so
    no rank is left waiting in a collective. A host sync: called at logging intervals and
    before every checkpoint write."""
    step = first_non_finite(first_bad, world=world)
    if step is not None:
        good = ckpt_path if Path(ckpt_path).exists() else "none written yet"
        raise NonFiniteLoss(f"non-finite loss at step {step}; stopping (last good checkpoint: {good})")


def _teacher_stats(stores: dict) -> dict:
    return {name: (ts.stats["mean"], ts.stats["components"]) for name, ts in stores.items()}


def build_source(cfg: Config, plan: Plan, *, device: str, online: bool | None = None, run_dir=None,
                 teachers: dict | None = None):
    """The batch source of ``cfg.data.source`` and the teachers' statistics (adapter
    initialisation). ``online`` (the old switch) overrides it: True is online-replay, False
    cached. ``run_dir`` keeps the statistics of an online-fresh run without a store.
    ``teachers`` (online only): {name: Teacher} already built, used instead of building them
    (the demo reuses its extraction's), checked against the store all the same."""
    source = cfg.data.source if online is None else ("online-replay" if online else "cached")
    kw = dict(decoder=cfg.data.decoder, device=device, num_threads=max(1, cfg.data.num_workers),
              decoder_settings=decoder_settings(cfg))
    if source == "cached":
        if not cfg.data.store:
            raise ValueError("data.source=cached reads the teacher tokens from a store: give --store "
                             "(data.store), or train online (data.source=online-fresh)")
        cached = CachedSource(plan, store_path=cfg.data.store, teachers=teacher_names(cfg),
                              pixels=cfg.data.pixels, **kw)
        for ts in cached.stores.values():
            check_codec(ts, trainable=cfg.adapters.mode == "trainable", width=cfg.model.embed_dim,
                        init=cfg.adapters.init)
        return cached, _teacher_stats(cached.stores)
    from train.online import build_online_source
    return build_online_source(cfg, plan, fresh=(source == "online-fresh"), run_dir=run_dir, prebuilt=teachers,
                               **kw)


def decoder_settings(cfg: Config) -> dict:
    """The GPU decoder's settings of the config, as ``make_decoder`` takes them."""
    return dict(hw_decoder_load=cfg.data.hw_decoder_load, preallocate_width_hint=cfg.data.preallocate_width_hint,
                preallocate_height_hint=cfg.data.preallocate_height_hint)


def train(cfg: Config, *, out_dir, online: bool = False, max_steps: int | None = None, resume: bool = False,
          device: str = "cpu", ckpt_steps: int = 0, progress: bool = True) -> dict:
    """Train the student; returns {steps, images_per_second, last metrics, out_dir}.

    ``max_steps`` caps the total number of optimiser steps (the schedule is still the one
    of ``schedule.epochs`` unless max_steps is smaller, in which case it spans max_steps).
    ``ckpt_steps`` > 0 also checkpoints every that many steps (besides every
    ``train.ckpt_every`` epochs). ``online=True`` is the old switch for
    ``data.source=online-replay``.
    """
    if online:
        if cfg.data.source == "online-fresh":
            raise ValueError("--online (online-replay) contradicts data.source=online-fresh; give one of them")
        from train.config import apply_overrides
        cfg = apply_overrides(cfg, ["data.source=online-replay"])
    out = Path(out_dir)
    if cfg.train.wandb:
        from train.tracking import require_wandb
        require_wandb()                                 # before any work
    dist.init_from_env(device)
    rank, world = dist.rank(), dist.world_size()
    device = dist.local_device(device)
    if cfg.train.batch_size % world:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is not divisible by {world} ranks")
    from store.shards import ImageSet
    data = ImageSet.open(cfg.data.images)
    cfg = resolve_data(cfg, data, recorded=(saved_config(out) or {}).get("data") if resume else None)
    plan = Plan(data, seed=cfg.data.seed, views=cfg.data.views, store_views=store_views(cfg),
                batch_size=cfg.train.batch_size, rank=rank, world=world, window=cfg.data.shuffle_window,
                streams=cfg.data.streams, n_student=cfg.data.student_visible)
    source, stats = build_source(cfg, plan, device=device, run_dir=out)
    spe = plan.steps_per_epoch
    total = cfg.schedule.epochs * spe if max_steps is None else min(max_steps, cfg.schedule.epochs * spe)
    warmup = int(round(total * cfg.schedule.warmup_epochs / cfg.schedule.epochs))  # same fraction if capped
    lrs = lr_schedule(total_steps=total, warmup_steps=warmup, peak=cfg.derived()["lr"],
                      kind=cfg.schedule.kind, min_lr=cfg.schedule.min_lr)

    objective = build_objective(cfg, stats).to(device)
    wrap_student_side(objective, world=world, device=device, use_compile=cfg.train.compile)
    opt = make_optimizer(cfg, objective)
    info = dict(source=cfg.data.source, world_size=world, steps_per_epoch=spe)
    run = open_run(out, config=cfg, resume=resume, movable=_MOVABLE, compare=dict(total_steps=total), info=info,
                   rank=rank)
    meta = dict(config=cfg.to_dict(), git_commit=git_commit(), total_steps=total, **info)
    step = run.step
    tracker = None
    if cfg.train.wandb and rank == 0:
        from train.tracking import Tracker
        tracker = Tracker(out, project=cfg.train.wandb_project, config=cfg.to_dict(), resumed=run.resumed)
    seed_noise(cfg.train.seed, rank)
    if run.resumed:
        load_strict(objective.student_side(), run.state["model"], what=f"checkpoint {run.checkpoint_path}")
        opt.load_state_dict(run.state["optimizer"])
        resume_noise(run.state.get("rng"), seed=cfg.train.seed, rank=rank, world=world, step=step, device=device)
    ckpt_path = run.checkpoint_path

    def checkpoint():
        # a non-finite state never replaces the last good checkpoint (one host sync per write)
        stop_if_non_finite(acc.first_bad, world=world, ckpt_path=ckpt_path)
        if not all_finite(objective.student_side().parameters()):
            good = ckpt_path if ckpt_path.exists() else "none written yet"
            raise NonFiniteLoss(f"non-finite weights after step {step - 1}; stopping (last good checkpoint: {good})")
        rngs = dist.all_gather(rng_state(device))       # every rank's generators, by rank
        run.save(dict(model=objective.student_side().state_dict(), optimizer=opt.state_dict(), step=step,
                      epoch=step // spe, step_in_epoch=step % spe, meta=meta, rng=rngs))
        dist.barrier()

    dev = torch.device(device)
    use_amp = dev.type == "cuda" and cfg.train.amp == "bf16"
    flops = None                                        # per image, from the first batch's shapes
    peak = _peak_flops(dev)
    bar = progress_bar(total=total, initial=step, unit="step", desc=f"train ({cfg.data.source})",
                       progress=progress and rank == 0, dynamic_ncols=True)
    acc = StepMetrics(device)
    t_log, img_log, t0 = time.perf_counter(), 0, time.perf_counter()
    last = {}
    try:
        while step < total:
            epoch, start = divmod(step, spe)
            for s_in_epoch, cpu_batch in source.epoch(epoch, start_step=start):
                batch = source.materialize(cpu_batch, device)
                if flops is None:
                    flops = step_flops_per_image(cfg, n_visible=batch["student_visible"].shape[1], teacher_tokens={
                        n: 1 + t["index"].shape[1] for n, t in batch["teachers"].items()},
                        widths={n: a.in_dim for n, a in objective.adapters.items()})["total"]
                parts = train_step(objective, opt, batch, lr=float(lrs[step]), clip_grad=cfg.train.clip_grad,
                                   amp=use_amp)
                acc.add(step, parts)
                step += 1
                img_log += plan.batch_size
                bar.update(1)
                if step % cfg.train.log_every == 0 or step == total:
                    stop_if_non_finite(acc.first_bad, world=world, ckpt_path=ckpt_path)   # host sync
                    means = acc.reduce(world)                   # the global batch's mean
                    now = time.perf_counter()
                    ips = img_log / (now - t_log)
                    last = {"step": step, "epoch": epoch, "lr": float(lrs[step - 1]), **means,
                            "images_per_second": ips}
                    if peak:
                        last["mfu"] = ips / world * flops / peak
                    run.log(last)
                    if tracker is not None:
                        tracker.log(last)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{ips:.1f}")
                    t_log, img_log = now, 0
                if (ckpt_steps and step % ckpt_steps == 0) or step % (spe * cfg.train.ckpt_every) == 0 \
                        or step == total:
                    checkpoint()
                if step >= total:
                    break
    finally:
        bar.close()
        run.close()
        if tracker is not None:
            tracker.close()
    elapsed = time.perf_counter() - t0
    if rank == 0:
        from train.export import export_student
        from train.plots import plot_losses
        export_student(objective.student, out / "student.safetensors")
        plot_losses(out / "metrics.jsonl", out / "loss.png")
    dist.barrier()
    return dict(steps=step, out_dir=str(out), last=last, seconds=elapsed)


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
