"""Stage 2: the training loop (cached or online), with exact resume.

Schedules are precomputed by step. The only host syncs are at logging intervals (loss
parts and the non-finite check are accumulated on the device until then), at checkpoints
and at the end. A non-finite loss stops the run naming the first bad step, on every rank
alike (the ranks agree on it first). MFU counts what a step runs (train/flops.py). Metrics go to
RUN/metrics.jsonl (one JSON object per logged step), checkpoints to RUN/last.pt (atomic),
the resolved config to RUN/config.yaml, and at the end the student to
RUN/student.safetensors and the loss curves to RUN/loss.png.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from extract import dist
from store.errors import ExpectedError
from store.progress import progress_bar
from train.config import Config
from train.flops import step_flops_per_image
from train.loader import CachedSource, Plan, check_codec, resolve_data
from train.objective import build_objective


class NonFiniteLoss(ExpectedError, RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


# Paths may move between a run and its resume; what they hold is checked by digests.
_MOVABLE = {"data.images", "data.store", "train.out_dir"}


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def lr_schedule(*, total_steps: int, warmup_steps: int, peak: float, kind: str = "cosine",
                min_lr: float = 0.0) -> np.ndarray:
    """(total_steps,) float64 learning rate per step: linear warm-up, then cosine (or flat)."""
    s = np.arange(total_steps, dtype=np.float64)
    warm = peak * (s + 1) / max(1, warmup_steps)
    if kind == "cosine":
        t = (s - warmup_steps) / max(1, total_steps - warmup_steps)
        after = min_lr + (peak - min_lr) * 0.5 * (1 + np.cos(math.pi * np.clip(t, 0, 1)))
    else:
        after = np.full_like(s, peak)
    return np.where(s < warmup_steps, warm, after)


def param_groups(module: torch.nn.Module, *, weight_decay: float, decay_1d: bool) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms and embeddings unless ``decay_1d``."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if not decay_1d and (p.ndim <= 1 or name.endswith(("cls_token", "pos_embed", "mask_token"))):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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


def load_checkpoint(path: Path) -> dict:
    """RUN/last.pt onto the CPU: load_state_dict then copies weights and optimizer state
    to where the parameters live, and the RNG states must stay CPU byte tensors."""
    return torch.load(path, map_location="cpu", weights_only=False)


def stop_if_non_finite(first_bad: torch.Tensor, *, world: int, ckpt_path: Path) -> None:
    """Raise NonFiniteLoss naming the first bad step of any rank, on every rank alike.

    first_bad: () int64, this rank's first step with a non-finite loss, -1 if none. With
    several ranks, all agree (all-reduce MIN over the bad steps) before anyone raises, so
    no rank is left waiting in a collective. A host sync: call at logging intervals."""
    bad = torch.where(first_bad >= 0, first_bad, torch.full_like(first_bad, torch.iinfo(torch.int64).max))
    if world > 1:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MIN)
    step = int(bad)
    if step != torch.iinfo(torch.int64).max:
        raise NonFiniteLoss(f"non-finite loss at step {step}; stopping (last good checkpoint: {ckpt_path})")


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
        cached = CachedSource(plan, store_path=cfg.data.store, teachers=cfg.data.teachers, **kw)
        for ts in cached.stores.values():
            check_codec(ts, trainable=cfg.adapters.mode == "trainable", width=cfg.model.embed_dim)
        return cached, _teacher_stats(cached.stores)
    from train.online import build_online_source
    return build_online_source(cfg, plan, fresh=(source == "online-fresh"), run_dir=run_dir, prebuilt=teachers,
                               **kw)


def decoder_settings(cfg: Config) -> dict:
    """The GPU decoder's settings of the config, as ``make_decoder`` takes them."""
    return dict(hw_decoder_load=cfg.data.hw_decoder_load, preallocate_width_hint=cfg.data.preallocate_width_hint,
                preallocate_height_hint=cfg.data.preallocate_height_hint)


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    dist.init_from_env(device)
    rank, world = dist.rank(), dist.world_size()
    device = dist.local_device(device)
    if cfg.train.batch_size % world:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is not divisible by {world} ranks")
    from store.shards import ImageSet
    data = ImageSet.open(cfg.data.images)
    cfg = resolve_data(cfg, data, recorded=_recorded_data(out) if resume else None)
    plan = Plan(data, seed=cfg.data.seed, views=cfg.data.views, batch_size=cfg.train.batch_size,
                rank=rank, world=world, window=cfg.data.shuffle_window, streams=cfg.data.streams,
                n_student=cfg.data.student_visible)
    source, stats = build_source(cfg, plan, device=device, run_dir=out)
    spe = plan.steps_per_epoch
    total = cfg.schedule.epochs * spe if max_steps is None else min(max_steps, cfg.schedule.epochs * spe)
    warmup = int(round(total * cfg.schedule.warmup_epochs / cfg.schedule.epochs))  # same fraction if capped
    lrs = lr_schedule(total_steps=total, warmup_steps=warmup, peak=cfg.derived()["lr"],
                      kind=cfg.schedule.kind, min_lr=cfg.schedule.min_lr)

    objective = build_objective(cfg, stats).to(device)
    wrap_student_side(objective, world=world, device=device, use_compile=cfg.train.compile)
    opt = make_optimizer(cfg, objective)
    meta = dict(config=cfg.to_dict(), git_commit=git_commit(), source=cfg.data.source, world_size=world,
                total_steps=total, steps_per_epoch=spe)

    step = 0
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "last.pt"
    if resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        ck = load_checkpoint(ckpt_path)
        diff = [f"{s}.{k}: checkpoint {ck['meta']['config'].get(s, {}).get(k)!r}, now {v!r}"
                for s, sec in meta["config"].items() for k, v in sec.items()
                if f"{s}.{k}" not in _MOVABLE and ck["meta"]["config"].get(s, {}).get(k) != v]
        if ck["meta"]["total_steps"] != total:
            diff.append(f"total_steps: checkpoint {ck['meta']['total_steps']}, now {total}")
        if diff:
            raise ValueError(f"cannot resume {ckpt_path}: it was made with another config:\n  " + "\n  ".join(diff))
        objective.student_side().load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        restore_rng(ck["rng"], device)
        step = int(ck["step"])
    elif ckpt_path.exists():
        raise FileExistsError(f"{out} already holds a run (last.pt); pass --resume to continue it "
                              "or choose another --out")
    if rank == 0:
        cfg.save(out / "config.yaml")
        (out / "run.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "config"}, indent=2))
        _truncate_metrics(out / "metrics.jsonl", step)

    def checkpoint():
        if rank == 0:
            _save_atomic(dict(model=objective.student_side().state_dict(), optimizer=opt.state_dict(),
                              step=step, epoch=step // spe, step_in_epoch=step % spe, meta=meta,
                              rng=rng_state(device)),
                         ckpt_path)
        dist.barrier()

    dev = torch.device(device)
    use_amp = dev.type == "cuda" and cfg.train.amp == "bf16"
    flops = None                                        # per image, from the first batch's shapes
    peak = _peak_flops(dev)
    bar = progress_bar(total=total, initial=step, unit="step", desc=f"train ({cfg.data.source})",
               progress=progress and rank == 0, dynamic_ncols=True)
    sums, n_sum, first_bad = None, 0, torch.full((), -1, dtype=torch.long, device=device)
    t_log, img_log, t0 = time.perf_counter(), 0, time.perf_counter()
    last = {}
    metrics_f = open(out / "metrics.jsonl", "a") if rank == 0 else None
    try:
        while step < total:
            epoch, start = divmod(step, spe)
            for s_in_epoch, cpu_batch in source.epoch(epoch, start_step=start):
                batch = source.materialize(cpu_batch, device)
                if flops is None:
                    flops = step_flops_per_image(cfg, n_visible=batch["student_visible"].shape[1], teacher_tokens={
                        n: 1 + t["index"].shape[1] for n, t in batch["teachers"].items()})["total"]
                parts = train_step(objective, opt, batch, lr=float(lrs[step]), clip_grad=cfg.train.clip_grad,
                                   amp=use_amp)
                loss = parts["loss"]
                bad = ~torch.isfinite(loss.detach())
                first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, step), first_bad)
                det = {k: v.detach().float() for k, v in parts.items()}
                sums = det if sums is None else {k: sums[k] + det[k] for k in det}
                n_sum += 1
                step += 1
                img_log += plan.batch_size
                bar.update(1)
                if step % cfg.train.log_every == 0 or step == total:
                    stop_if_non_finite(first_bad, world=world, ckpt_path=ckpt_path)   # host sync
                    if world > 1:                               # the global batch's mean
                        keys = sorted(sums)
                        flat = torch.stack([sums[k] for k in keys])
                        torch.distributed.all_reduce(flat)
                        sums = {k: v / world for k, v in zip(keys, flat)}
                    now = time.perf_counter()
                    ips = img_log / (now - t_log)
                    last = {"step": step, "epoch": epoch, "lr": float(lrs[step - 1]),
                            **{k: float(v) / n_sum for k, v in sums.items()},
                            "images_per_second": ips}
                    if peak:
                        last["mfu"] = ips / world * flops / peak
                    if metrics_f:
                        metrics_f.write(json.dumps(last) + "\n")
                        metrics_f.flush()
                    bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{ips:.1f}")
                    sums, n_sum, t_log, img_log = None, 0, now, 0
                if (ckpt_steps and step % ckpt_steps == 0) or step % (spe * cfg.train.ckpt_every) == 0 \
                        or step == total:
                    checkpoint()
                if step >= total:
                    break
    finally:
        bar.close()
        if metrics_f:
            metrics_f.close()
    elapsed = time.perf_counter() - t0
    if rank == 0:
        from train.export import export_student
        from train.plots import plot_losses
        export_student(objective.student, out / "student.safetensors")
        plot_losses(out / "metrics.jsonl", out / "loss.png")
    dist.barrier()
    return dict(steps=step, out_dir=str(out), last=last, seconds=elapsed)


def _recorded_data(out: Path) -> dict | None:
    """The ``data`` section of the run's resolved config.yaml, if it has one."""
    import yaml
    path = out / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}).get("data") if path.is_file() else None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop logged lines past ``step`` (a resumed run logs them again)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


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
