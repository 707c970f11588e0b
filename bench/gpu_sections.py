"""The six sections of bench/gpu_check.py (which holds the sizes, the report and the driver).

Each section is ``check_*(rep, sec, ctx)``: it adds figures and checks to ``sec`` through
``rep`` (a ``bench.gpu_check.Report``) and may leave results in ``ctx`` for later sections
(``peak`` from 1; ``teachers`` from 4; ``data`` and ``store`` from 5). ``ctx`` holds
``device``, ``size`` (FULL or QUICK) and ``tmp`` (the work folder).

The teachers are random-init ViT-B/16s; ``size["teacher_depth"]`` (QUICK: 1) cuts them to that
many blocks (``teacher_kwargs``), in this process (sections 4 and 6) and in the command line's
subprocesses (section 5, ``_cli``): the same architecture, patches, width and token geometry,
so the CPU form checks every step of the plumbing at a fraction of the cost, while the GPU
form (FULL) measures the real teachers.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

# The tolerance between decoders (data/decode/pixels.py): worst view and mean over views of
# |DALI - PIL| on 0..255; the GPU decoder is allowed CUDA_BOUND_SCALE times as much.
from data.decode.pixels import CUDA_BOUND_SCALE, MEAN_BOUND, VIEW_BOUND
from teachers.descriptors import PAPER_TEACHERS, VIT_B_WIDTH

TEACHERS = PAPER_TEACHERS
TEACHER_DEPTH = 12                      # blocks of the paper teachers' ViT-B/16


def teacher_kwargs(size: dict) -> dict | None:
    """The random-init teachers' model_kwargs: None (the descriptor's ViT-B/16), or the same cut
    to ``size["teacher_depth"]`` blocks."""
    depth = size.get("teacher_depth")
    return None if depth is None else {"depth": depth}


def teacher_label(size: dict) -> str:
    depth = size.get("teacher_depth")
    return "ViT-B/16" if depth is None else f"ViT-B/16 cut to {depth} of {TEACHER_DEPTH} blocks"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- 1. environment ---------------------------------------------------------------------
def matmul_peak(device: torch.device, *, n: int) -> tuple[float, str]:
    """Measured matmul rate (FLOP/s) of an n x n product: bf16 on a GPU, fp32 on the CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps, start = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - start < 0.5:
        a @ b
        reps += 1
        if reps % 10 == 0:
            _sync(device)
    _sync(device)
    return reps * 2 * n ** 3 / (time.perf_counter() - start), str(dtype).replace("torch.", "")


def _driver() -> str:
    if shutil.which("nvidia-smi") is None:
        return "no nvidia-smi"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return out.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError) as error:
        return f"unknown ({type(error).__name__})"


def check_environment(rep: Report, sec: dict, ctx: dict) -> None:
    device = ctx["device"]
    try:
        import nvidia.dali as dali
        dali_version = dali.__version__
    except ImportError as error:
        dali_version = f"not importable ({error})"
    rep.figure(sec, "python", platform.python_version(), "", "interpreter version")
    rep.figure(sec, "torch", torch.__version__, "", "torch version")
    rep.figure(sec, "torch CUDA", str(torch.version.cuda), "", "CUDA version torch was built with")
    rep.figure(sec, "DALI", dali_version, "", "nvidia.dali version")
    rep.check(sec, "DALI importable", not dali_version.startswith("not"), dali_version)
    if device.type == "cuda":
        ok = rep.check(sec, "CUDA available", torch.cuda.is_available(),
                       f"torch.cuda.is_available() with {torch.cuda.device_count()} devices visible")
        if not ok:
            raise RuntimeError("no CUDA device: nothing else can run")
        props = torch.cuda.get_device_properties(device)
        rep.figure(sec, "driver", _driver(), "", "NVIDIA driver version (nvidia-smi)")
        rep.figure(sec, "GPU", props.name, "", f"device {device}")
        rep.figure(sec, "GPU memory", props.total_memory / 2 ** 30, "GiB", "total device memory")
        rep.figure(sec, "compute capability", f"{props.major}.{props.minor}", "", "SM version")
    else:
        rep.figure(sec, "CPU threads", torch.get_num_threads(), "", "torch intra-op threads")
    peak, dtype = matmul_peak(device, n=ctx["size"]["peak_n"])
    ctx["peak"] = peak
    rep.figure(sec, f"{dtype} matmul peak", peak / 1e12, "TFLOP/s",
               f"measured {ctx['size']['peak_n']}^3 {dtype} matmuls back to back: the denominator of every "
               "MFU and peak fraction below")
    rep.check(sec, "matmul peak measured", np.isfinite(peak) and peak > 0, f"{peak / 1e12:.3f} TFLOP/s")


# -- 2. DALI vs PIL ------------------------------------------------------------------
def check_agreement(rep: Report, sec: dict, ctx: dict) -> None:
    from bench.decode import kind_photos, views_of
    from data.decode import DaliViewDecoder, pil_views

    device = ctx["device"]
    kind = "cuda" if device.type == "cuda" else "cpu"
    scale = CUDA_BOUND_SCALE if kind == "cuda" else 1.0
    n = ctx["size"]["agree_views"]
    decoder = DaliViewDecoder(batch_size=n, device=device, normalize=False)
    per_view = {}
    for name, data in kind_photos().items():
        datas, boxes, flips = views_of([data], n, seed=1)
        got = decoder(datas, boxes, flips).cpu()
        want = pil_views(datas, boxes, flips, normalize=False)
        per_view[name] = (got - want).abs().flatten(1).mean(1).numpy()
    for name, diff in per_view.items():
        rep.figure(sec, f"{name}: mean / worst", f"{diff.mean():.3f} / {diff.max():.3f}", "(0..255)",
                   f"|DALI {kind} - PIL| per pixel over {n} views, mean over views / worst view")
    worst = max(float(d.max()) for d in per_view.values())
    mean = float(np.mean(np.concatenate(list(per_view.values()))))
    rep.check(sec, "worst view", worst <= scale * VIEW_BOUND, f"{worst:.3f} <= {scale * VIEW_BOUND}")
    rep.check(sec, "mean over views", mean <= scale * MEAN_BOUND, f"{mean:.3f} <= {scale * MEAN_BOUND}")


# -- 3. decode throughput -----------------------------------------------------------
def check_decode(rep: Report, sec: dict, ctx: dict) -> None:
    from bench.decode import make_photos, time_dali, time_pil, views_of

    device, size = ctx["device"], ctx["size"]
    photos = make_photos(long_side=500)
    datas, boxes, flips = views_of(photos, size["decode_views"])
    cores = os.cpu_count() or 1
    n, batch = len(datas), size["decode_batch"]
    what = (f"{n} views (224x224, normalised) of {len(photos)} JPEG photos at long side 500, "
            f"batch {batch}")
    rows = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        rows["DALI cuda"] = n / time_dali(datas, boxes, flips, device="cuda", threads=min(cores, 8),
                                          batch_size=batch)
        loads = {load: n / time_dali_cuda(datas, boxes, flips, device=device, threads=min(cores, 8),
                                          batch_size=batch, hw_decoder_load=load) for load in HW_LOADS}
        for load, rate in loads.items():
            rep.figure(sec, f"DALI cuda, hw_decoder_load={load}", rate, "images/s",
                       "the same views; share of the JPEGs given to the hardware decoder (0: nvJPEG CUDA only)")
        best = max(loads, key=loads.get)
        rep.figure(sec, "best hw_decoder_load", best, "", "the measured choice: the default to put in "
                   "data/decode/dali.py HW_DECODER_LOAD, train/config.py and cli.py")
    rows[f"DALI cpu, {cores} threads"] = n / time_dali(datas, boxes, flips, device="cpu", threads=cores,
                                                       batch_size=batch)
    procs = min(cores, 8) if device.type == "cuda" else 1
    rows[f"PIL, {procs} procs"] = n / time_pil(datas, boxes, flips, procs=procs, batch_size=batch)
    _check_stored_views(rep, sec, rows, datas[:batch], boxes[:batch], flips[:batch], device=device, batch=batch)
    for name, rate in rows.items():
        rep.figure(sec, name, rate, "images/s", what)
    ctx["decode"] = rows
    rep.check(sec, "every decoder ran", all(r > 0 for r in rows.values()), ", ".join(rows))


def _check_stored_views(rep: Report, sec: dict, rows: dict, datas, boxes, flips, *, device, batch: int) -> None:
    """The views stored once (extract --view-pixels jpeg): DALI on ``device`` decodes them as
    PIL does (per-view mean |diff| within the decoders' bound), and how fast."""
    from bench.decode import stored_views, time_stored
    from data.decode import denormalize
    from data.decode.stored import make_view_decoder, pil_stored_views

    stored = stored_views(datas, boxes, flips, form="jpeg")
    kind = "cuda" if device.type == "cuda" else "cpu"
    got = make_view_decoder("jpeg", "dali", batch_size=batch, device=str(device))(stored).cpu()
    diff = (denormalize(got) - denormalize(pil_stored_views(stored))).abs().flatten(1).mean(1)
    bound = (CUDA_BOUND_SCALE if kind == "cuda" else 1.0) * VIEW_BOUND
    rep.check(sec, f"stored JPEG views: DALI {kind} vs PIL, worst view", float(diff.max()) <= bound,
              f"{float(diff.max()):.3f} <= {bound}")
    rows[f"stored JPEG views (the first {len(stored)}), DALI {kind}"] = len(stored) / time_stored(
        stored, form="jpeg", kind="dali", device=str(device), threads=min(os.cpu_count() or 1, 8), batch_size=batch)


HW_LOADS = (0.0, 0.65, 1.0)


def time_dali_cuda(datas, boxes, flips, *, device, threads: int, batch_size: int, hw_decoder_load: float) -> float:
    """Seconds for DALI on ``device`` to decode all views with this hardware decoder share,
    2 batches in flight, after one warm-up batch."""
    from data.decode import DaliViewDecoder

    decoder = DaliViewDecoder(batch_size=batch_size, device=device, num_threads=threads, prefetch=2,
                              hw_decoder_load=hw_decoder_load)
    batches = [(datas[s:s + batch_size], boxes[s:s + batch_size], flips[s:s + batch_size])
               for s in range(0, len(datas), batch_size)]
    decoder(*batches[0])
    _sync(device)
    start = time.perf_counter()
    for _ in decoder.map(batches):
        pass
    _sync(device)
    return time.perf_counter() - start


# -- 4. teacher forward -------------------------------------------------------------
def teacher_flops(n_visible: int, *, width: int = VIT_B_WIDTH, depth: int = TEACHER_DEPTH) -> float:
    """Matmul FLOPs of one masked ViT-B/16 forward on CLS + ``n_visible`` patches."""
    t = n_visible + 1
    return 2 * n_visible * (3 * 16 * 16) * width + depth * (2 * t * 12 * width * width + 4 * t * t * width)


def check_teachers(rep: Report, sec: dict, ctx: dict) -> None:
    from teachers.vit import build_teacher
    from data import views as V

    device, size = ctx["device"], ctx["size"]
    b, iters = size["fwd_batch"], size["fwd_iters"]
    index = np.arange(b)
    images = torch.randn(b, 3, 224, 224, device=device)
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    depth = size.get("teacher_depth") or TEACHER_DEPTH
    for name in TEACHERS:
        teacher = build_teacher(name, random_init=True, seed=0, device=device, model_kwargs=teacher_kwargs(size))
        visible = torch.from_numpy(V.teacher_visible(0, index, 0, name)).to(device)
        with torch.inference_mode():
            out = teacher(images, visible)
            _sync(device)
            start = time.perf_counter()
            for _ in range(iters):
                out = teacher(images, visible)
            _sync(device)
        rate = b * iters / (time.perf_counter() - start)
        nv = visible.shape[1]
        frac = rate * teacher_flops(nv, depth=depth) / ctx["peak"]
        rep.figure(sec, f"{name} masked forward", rate, "images/s",
                   f"untrained {teacher_label(size)} on CLS + {nv} visible patches, batch {b}, {precision}, "
                   f"{iters} batches")
        rep.figure(sec, f"{name} fraction of peak", frac, "", "its matmul FLOP/s over the measured peak")
        rep.check(sec, f"{name} tokens finite", bool(torch.isfinite(out["patch"]).all()),
                  f"patch tokens {tuple(out['patch'].shape)}")
        ctx.setdefault("teachers", {})[name] = teacher   # the online row of section 6 reuses them


# -- 5. the command line end to end ---------------------------------------------------
# ``python -c _CUT_CLI DEPTH ARGS`` is ``python cli.py ARGS`` whose random-init teachers built without
# model arguments (extract --random-init) are cut to DEPTH blocks; a store records that build, so
# the commands that read it later rebuild the same teachers. (tests/conftest.py's TINY_CLI does
# the same for the tests.)
_CUT_CLI = ("import sys, teachers.vit as vit; depth = int(sys.argv.pop(1)); build = vit.build_teacher\n"
            "def cut(name, **kw):\n"
            "    if kw.get('random_init') and kw.get('model_kwargs') is None:\n"
            "        kw['model_kwargs'] = {'depth': depth}\n"
            "    return build(name, **kw)\n"
            "vit.build_teacher = cut\n"
            "from cli import main; main()")


def _cli(*args, size: dict | None = None) -> list[str]:
    """The command line of ``cli.py ARGS`` in a new interpreter (run from the repository root),
    with the teachers of ``size`` (``teacher_kwargs``)."""
    depth = (size or {}).get("teacher_depth")
    if depth is None:
        return [sys.executable, str(ROOT / "cli.py"), *map(str, args)]
    return [sys.executable, "-c", _CUT_CLI, str(depth), *map(str, args)]


def _subprocess_env(tmp: Path) -> dict:
    """The subprocesses' environment. Under PYTHONDONTWRITEBYTECODE every interpreter compiles
    all it imports again (torch, timm: seconds of a core each time); the commands here share one
    bytecode cache under the work folder instead (removed with it)."""
    env = dict(os.environ)
    if env.pop("PYTHONDONTWRITEBYTECODE", None):
        env["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
    return env


def _metric_steps(path: Path) -> list[int]:
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError):
            pass                        # a line being written
    return steps


def _run_until(cmd: list[str], ready, *, log: Path, timeout: float,
               env: dict | None = None) -> tuple[int | None, bool]:
    """Run ``cmd``; SIGKILL it as soon as ``ready()`` holds. Returns (exit code, killed).
    (Each step's timeout, three times the whole budget, only catches a hung step: a slow run
    still finishes and fails the budget check.)"""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        try:
            while proc.poll() is None and time.time() < deadline:
                if ready():
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return proc.returncode, True
                time.sleep(0.01)
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            return proc.returncode, False
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def killed_step(name: str) -> bool:
    return name.endswith("SIGKILL")


def check_cli(rep: Report, sec: dict, ctx: dict) -> None:
    from samples.photos import write_photo_tree

    device, size, tmp = ctx["device"], ctx["size"], ctx["tmp"]
    dev = str(device)
    photos = write_photo_tree(tmp / "photos", max_side=500, copies=size["copies"])
    n = sum(1 for p in photos.rglob("*") if p.is_file())
    data, store, run, logs = tmp / "data", tmp / "store", tmp / "run", tmp / "logs"
    logs.mkdir()
    views, batch = size["views"], size["train_batch"]
    n_steps, kill_after = size["train_steps"], size["kill_after"]
    # checkpoints at step kill_after (--ckpt-steps) and at the end only; every step logged
    overrides = [f"data.views={views}", "data.streams=1", "data.shuffle_window=2", "train.log_every=1",
                 "train.ckpt_every=1000", f"data.num_workers={min(os.cpu_count() or 1, 4)}"]
    train = ["train", "--data", data, "--store", store, "--out", run, "--steps", n_steps,
             "--ckpt-steps", kill_after, "--batch-size", batch, "--device", dev, *overrides]
    steps = [("prepare", ["prepare", photos, data, "--shard-size", size["shard"], "--no-progress"], n)]
    for name in TEACHERS:
        steps.append((f"extract {name}", ["extract", "--teacher", name, "--random-init", "--data", data,
                                          "--store", store, "--views", views, "--batch-size", size["ex_batch"],
                                          "--stats-images", size["stats"], "--device", dev], n * views))
    steps += [("verify", ["verify", store, "--data", data], n * views * len(TEACHERS)),
              (f"train {kill_after} of {n_steps} steps, then SIGKILL", train, kill_after * batch),
              (f"train --resume ({n_steps - kill_after} steps)", [*train, "--resume"],
               (n_steps - kill_after) * batch),
              ("export", ["export", run, tmp / "student.safetensors"], None),
              ("eval knn", ["eval", "knn", "--checkpoint", tmp / "student.safetensors", "--train", data,
                            "--val", data, "--device", dev, "--batch-size", size["knn_batch"], "--workers", 2,
                            "--k", size["knn_k"],
                            "--out", tmp / "knn"], 2 * n)]
    metrics, env = run / "metrics.jsonl", _subprocess_env(tmp)
    for k, (name, args, images) in enumerate(steps):
        log = logs / f"{k}.log"
        start = time.perf_counter()
        if killed_step(name):
            # log_every=1: a line past step kill_after means that checkpoint is on disk, and the
            # final one is not (it is written after the last step's line)
            rc, killed = _run_until(_cli(*args, size=size), lambda: any(kill_after < s < n_steps
                                                                        for s in _metric_steps(metrics)),
                                    log=log, timeout=3 * size["budget_s"], env=env)
            ok = killed
            detail = f"killed after its step-{kill_after} checkpoint" if killed else f"exit {rc} before it could be killed"
        else:
            try:
                proc = subprocess.run(_cli(*args, size=size), cwd=ROOT, stdout=open(log, "w"),
                                      stderr=subprocess.STDOUT, timeout=3 * size["budget_s"], env=env)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            ok, detail = rc == 0, f"exit {rc}"
        seconds = time.perf_counter() - start
        rate = f", {images / seconds:.1f} images/s" if images else ""
        rep.figure(sec, name, seconds, "s", f"wall time of `cli.py {args[0]}` in a subprocess"
                   + (f" ({images} images{rate})" if images else "")
                   + (f"; teachers {teacher_label(size)}" if args[0] == "extract" else ""))
        if not ok:
            tail = log.read_text()[-600:].replace("\n", " / ")
            detail += f": {tail}"
        if not rep.check(sec, name, ok, detail):
            return
        if name == "verify":
            ctx["data"], ctx["store"] = data, store      # section 6 measures on this store
        if killed_step(name):
            saved = int(torch.load(run / "last.pt", map_location="cpu", weights_only=False)["step"])
            if not rep.check(sec, "checkpoint left by the killed run", saved == kill_after,
                             f"last.pt at step {saved} (expected {kill_after})"):
                return
    logged = _metric_steps(metrics)
    rep.check(sec, "resume logged every step once", logged == list(range(1, n_steps + 1)),
              f"metrics.jsonl steps {logged[:3]}...{logged[-3:]} ({len(logged)} lines)")
    result = json.loads((tmp / "knn" / "result.json").read_text())
    top1 = result["metrics"].get("top1")
    rep.figure(sec, "knn top-1", top1, "%", f"k-NN top-1 of the {n_steps}-step student, train = val = the {n} photos "
               "(a smoke figure: the data is tiny)")
    rep.check(sec, "knn result", top1 is not None and np.isfinite(top1), f"top1 {top1}")


# -- 6. training throughput ------------------------------------------------------------
def check_training(rep: Report, sec: dict, ctx: dict) -> None:
    from train.throughput import measure

    if "store" not in ctx:
        raise RuntimeError("needs the store of section 5, which did not get past verify")
    device, size = ctx["device"], ctx["size"]
    rows = measure(data=ctx["data"], store=ctx["store"], batch_size=size["train_batch"], steps=size["bench_steps"],
                   warmup=size["bench_warmup"], rounds=size["bench_rounds"], device=str(device), decoder="dali",
                   threads=min(os.cpu_count() or 1, 4), views=size["views"], streams=1,
                   teachers=ctx.get("teachers"))
    what = {"cached": "store blocks + DALI decoding in a prefetch thread + the step",
            "online": f"the same decoding + the three teachers' forward ({teacher_label(size)}) + the step",
            "ceiling": "the step alone on batches already on the device"}
    for r in rows:
        mfu = r["student_tflops"] * 1e12 / ctx["peak"]
        rep.figure(sec, f"{r['mode']}", r["images_per_second"], "images/s",
                   f"{what[r['mode']]}; batch {r['batch_size']}, median of {r['rounds']} rounds of {r['steps']} steps")
        rep.figure(sec, f"{r['mode']} MFU", mfu, "", "the step's FLOPs per image (train/flops.py: what the step "
                   "runs) x images/s over the measured peak")
        rep.check(sec, f"{r['mode']} ran", np.isfinite(r["images_per_second"]) and r["images_per_second"] > 0,
                  f"{r['images_per_second']:.1f} images/s")
    by = {r["mode"]: r["images_per_second"] for r in rows}
    rep.figure(sec, "cached / online", by["cached"] / by["online"], "x", "speed-up of the store over online teachers")
    rep.figure(sec, "cached / ceiling", by["cached"] / by["ceiling"], "", "fraction of the in-memory ceiling")
