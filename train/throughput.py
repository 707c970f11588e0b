"""Throughput measured in this process: the training step's images/s by data path (``measure``:
cached store vs online teachers vs the in-memory ceiling; bench/train.py, the demo report,
bench/gpu_check.py) and one teacher forward's images/s (``teacher_rate``: the machine speed by
which the demo's time is normalised; the demo, bench/demo.py, bench/cache_cost.py)."""
from __future__ import annotations

import dataclasses
import itertools
import time

import numpy as np
import torch

from core.precision import autocast_dtype, grad_scaler
from data import views as V
from teachers.descriptors import descriptor
from train.config import load_config, teacher_names
from train.flops import step_flops_per_image
from train.loader import Plan
from train.runstore import open_run_store
from train.learner import make_optimizer, train_step
from train.sources import build_source
from train.objective import build_objective

__all__ = ["measure", "teacher_rate"]


def _time_steps(objective, opt, batches, *, amp: torch.dtype | None, device, clip_grad: float) -> float:
    """Seconds for the steps over ``batches`` (an iterator of materialised batches) under autocast
    ``amp`` (float16 with a gradient scaler, as training runs)."""
    dev, scaler = torch.device(device), grad_scaler(amp, device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t = time.perf_counter()
    for b in batches:
        train_step(objective, opt, b, lr=1e-4, clip_grad=clip_grad, amp=amp, scaler=scaler)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t


def measure(*, data, store, batch_size: int = 16, steps: int = 8, warmup: int = 2, rounds: int = 3,
            device: str = "cpu", decoder: str = "dali", threads: int = 2, views: int | str = "auto",
            streams: int = 1, modes=("cached", "online", "ceiling"), teachers: dict | None = None,
            overrides=(), other_stores: dict | None = None) -> list[dict]:
    """Rows {mode, images_per_second, seconds, steps, batch_size, ...} measured in this process.
    ``teachers``: {name: Teacher} already built, for the online row (``build_source``);
    ``overrides``: further KEY=VALUE of the train config (the model measured, e.g. the demo's).
    ``other_stores``: {mode: store} more cached rows, each from its own store of the same data
    (another codec; view pixels, which ``data.pixels=auto`` takes when complete), timed in turn
    with the others.

    The modes are timed in turn, ``rounds`` times (A B C A B C ...), each round over ``steps``
    steps after ``warmup`` untimed ones (the ceiling's only in the first round: its batches
    stay in memory and its step is warm after it), and each row keeps its median round: on
    a noisy machine this compares the paths under the same conditions. ``warmup=0`` suits
    an online row whose ``teachers`` already ran. ``views``: the store's V (``auto``) or a
    number that must equal it. The ceiling's batches are the first ``warmup + steps`` of
    epoch 0, materialised once. ValueError when an epoch has fewer steps than
    ``warmup + steps``."""
    from data.shards import ImageSet

    images = ImageSet.open(data)
    cfg = load_config(None, [f"data.images={data}", f"data.store={store}", f"data.views={views}",
                             f"data.decoder={decoder}", f"data.num_workers={threads}", f"data.streams={streams}",
                             "data.shuffle_window=2", f"train.batch_size={batch_size}", *overrides])
    cfg, store = open_run_store(cfg, images)
    plan = Plan(images, seed=0, views=cfg.data.views, store_views=store.store_views, batch_size=batch_size,
                window=2, streams=streams)
    need = warmup + steps
    if plan.steps_per_epoch < need:
        raise ValueError(f"the data gives {plan.steps_per_epoch} steps of {batch_size} per epoch; "
                         f"need {need}: use more data or a smaller batch")
    amp, clip = autocast_dtype(cfg.train.amp, device), cfg.train.clip_grad
    setups = {}
    configs = {mode: (cfg, store) for mode in modes}
    for mode, path in (other_stores or {}).items():
        configs[mode] = open_run_store(dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, store=str(path), pixels="auto", views="auto")), images)
    modes = tuple(configs)
    for mode in modes:
        cfg_m, store_m = configs[mode]
        source, stats = build_source(cfg_m, plan, store=store_m, online=(mode == "online"), device=device,
                                     teachers=teachers)
        objective = build_objective(cfg_m, stats).to(device)
        batches = None
        if mode == "ceiling":
            epoch = source.epoch(0)
            batches = [source.materialize(b, device) for _, b in itertools.islice(epoch, need)]
            epoch.close()
        setups[mode] = (source, objective, make_optimizer(cfg, objective), batches)
    times = {mode: [] for mode in modes}
    for r in range(rounds):
        for mode, (source, objective, opt, batches) in setups.items():
            if batches is not None:            # in memory: warm after the first round's warm-up
                if r == 0:
                    _time_steps(objective, opt, batches[:warmup], amp=amp, device=device, clip_grad=clip)
                times[mode].append(_time_steps(objective, opt, batches[warmup:], amp=amp, device=device, clip_grad=clip))
                continue
            it = iter(source.epoch(r))
            warm = (source.materialize(next(it)[1], device) for _ in range(warmup))
            _time_steps(objective, opt, warm, amp=amp, device=device, clip_grad=clip)
            timed = (source.materialize(next(it)[1], device) for _ in range(steps))
            times[mode].append(_time_steps(objective, opt, timed, amp=amp, device=device, clip_grad=clip))
            it.close()
    rows = []
    for mode in modes:
        sec = sorted(times[mode])[len(times[mode]) // 2]
        rows.append(dict(mode=mode, images_per_second=steps * batch_size / sec, seconds=sec, steps=steps,
                         rounds=rounds, batch_size=batch_size, device=str(device), decoder=decoder,
                         spread=[steps * batch_size / t for t in times[mode]]))
    ceiling = next((r["images_per_second"] for r in rows if r["mode"] == "ceiling"), None)
    online = next((r["images_per_second"] for r in rows if r["mode"] == "online"), None)
    flops = step_flops_per_image(cfg, n_visible=cfg.data.student_visible, teacher_tokens={
        n: 1 + V.num_visible(descriptor(n).mask_ratio) for n in teacher_names(cfg)})["total"]
    for r in rows:
        r["vs_online"] = r["images_per_second"] / online if online else None
        r["vs_ceiling"] = r["images_per_second"] / ceiling if ceiling else None
        r["student_tflops"] = r["images_per_second"] * flops / 1e12
    return rows


def teacher_rate(teacher, *, device: str, images: int = 8, full: bool = False, repeats: int = 3) -> float:
    """Images per second of one teacher forward on a batch of ``images`` seeded noise images,
    the median of ``repeats`` timed batches after a warm-up batch of 2: masked as in extraction
    (its visible patches of view 0, seed 0), or ``full`` (196 patches); in the teacher's precision
    (by default fp32 on the CPU, bf16 autocast on CUDA, as extraction runs). The machine's speed,
    by which the demo's time is normalised (bench/demo.py, docs/performance.md);
    bench/cache_cost.py combines it over its teachers."""
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(images, 3, 224, 224, generator=g).to(device)
    visible = torch.from_numpy(V.teacher_visible(0, np.arange(images), 0, teacher.name)).to(device)
    dev = torch.device(device)

    def forward(n):
        return teacher.forward_full(batch[:n]) if full else teacher(batch[:n], visible[:n])

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    seconds = []
    with torch.inference_mode():                 # the teacher's own precision: bf16 on CUDA, fp32 on the CPU
        forward(2)
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            forward(images)
            sync()
            seconds.append(time.perf_counter() - t)
    return images / float(np.median(seconds))
