"""Validate the whole product on one GPU in under 9 minutes (or on the CPU in CI with --quick).

    python bench/gpu_check.py                        # GPU 0: the full check, <= 9 minutes
    python bench/gpu_check.py --device cuda:1        # another GPU
    python bench/gpu_check.py --device cpu --quick   # the same checks, small, on the CPU (CI)

Writes OUT/gpu_check.json (every figure and check, machine-readable) and OUT/gpu_check.md
(the same as tables, every figure with what it measures), rewritten after each section so
that an interrupted run still leaves what it measured. Exits 1 if any check failed.

Sections:
1. environment: driver, torch and its CUDA, DALI, GPU name and memory; the measured matmul
   peak (bf16 on a GPU, fp32 on the CPU), the denominator of every MFU below;
2. DALI views vs the PIL reference on every photo kind (mean and worst per-view |diff| on
   0..255; bounds of tests/store/test_decode.py, doubled for nvJPEG as that test does);
3. decode images/s of DALI on the device vs DALI CPU vs PIL, on the same JPEG photos at
   ImageNet size (long side 500), 224x224 views from store/views.py;
4. teacher masked forward images/s per teacher (bf16 autocast on a GPU) and the fraction of
   the measured peak it reaches;
5. the real command line on generated photos (long side 500), in subprocesses:
   prepare -> extract (mae, mocov3, ibot) -> verify -> train 40 steps, SIGKILLed after its
   step-30 checkpoint (a preempted job) -> train --resume (the last 10 steps) -> export ->
   eval knn (--quick: 8 steps, killed after 6); each step's wall time and images/s;
6. training images/s on that store: cached, online and the in-memory ceiling
   (bench/train.py), and the student's MFU in each.

docs/performance.md says which GPU rows each figure fills.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEACHERS = ("mae", "mocov3", "ibot")
# The tolerance between decoders (store/decode/pixels.py): worst view and mean over views of
# |DALI - PIL| on 0..255; the GPU decoder is allowed CUDA_BOUND_SCALE times as much.
from store.decode.pixels import CUDA_BOUND_SCALE, MEAN_BOUND, VIEW_BOUND  # noqa: E402

# Sizes of a run: the full one for a GPU, and --quick (CI on 2 CPU cores, <= 3 minutes).
FULL = dict(budget_s=540, agree_views=32, decode_views=2048, decode_batch=128, fwd_batch=256, fwd_iters=8,
            copies=80, shard=128, views=2, ex_batch=128, stats=256, train_batch=128, bench_steps=6,
            bench_warmup=2, bench_rounds=3, peak_n=8192, knn_batch=256, knn_k=20, train_steps=40, kill_after=30)
QUICK = dict(budget_s=180, agree_views=4, decode_views=64, decode_batch=32, fwd_batch=2, fwd_iters=1,
             copies=1, shard=4, views=1, ex_batch=4, stats=4, train_batch=4, bench_steps=2,
             bench_warmup=1, bench_rounds=1, peak_n=2048, knn_batch=16, knn_k=5, train_steps=8, kill_after=6)


class Report:
    """Sections of figures ({name, value, unit, measures}) and checks ({name, ok, detail})."""

    def __init__(self, out: Path, meta: dict):
        self.out, self.meta, self.sections = out, meta, []

    def section(self, title: str) -> dict:
        sec = {"title": title, "figures": [], "checks": [], "seconds": None}
        self.sections.append(sec)
        return sec

    @staticmethod
    def figure(sec: dict, name: str, value, unit: str, measures: str) -> None:
        sec["figures"].append({"name": name, "value": value, "unit": unit, "measures": measures})

    @staticmethod
    def check(sec: dict, name: str, ok: bool, detail: str) -> bool:
        sec["checks"].append({"name": name, "ok": bool(ok), "detail": detail})
        return bool(ok)

    @property
    def failed(self) -> list[str]:
        return [f"{s['title']}: {c['name']}" for s in self.sections for c in s["checks"] if not c["ok"]]

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        doc = {**self.meta, "passed": not self.failed, "failed": self.failed, "sections": self.sections}
        (self.out / "gpu_check.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
        (self.out / "gpu_check.md").write_text(self.markdown())

    def markdown(self) -> str:
        m = self.meta
        lines = [f"# gpu_check: {'PASSED' if not self.failed else 'FAILED'}", "",
                 f"`{m['command']}` on {m['device_name']}, {m['date']}; "
                 f"{m['seconds']:.0f} s of a {m['budget_s']} s budget.", ""]
        if self.failed:
            lines += ["Failed checks:", ""] + [f"- {f}" for f in self.failed] + [""]
        for s in self.sections:
            took = f" ({s['seconds']:.1f} s)" if s["seconds"] is not None else ""
            lines += [f"## {s['title']}{took}", ""]
            if s["figures"]:
                lines += ["| figure | value | what it measures |", "|---|---:|---|"]
                for f in s["figures"]:
                    lines.append(f"| {_cell(f['name'])} | {_cell(_fmt(f['value']))} {f['unit']} | "
                                 f"{_cell(f['measures'])} |")
                lines.append("")
            if s["checks"]:
                lines += ["| check | result | detail |", "|---|---|---|"]
                for c in s["checks"]:
                    lines.append(f"| {_cell(c['name'])} | {'ok' if c['ok'] else '**FAILED**'} | {_cell(c['detail'])} |")
                lines.append("")
        return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def _cell(text: str) -> str:
    """Text for one markdown table cell: pipes escaped, one line."""
    return str(text).replace("|", "\\|").replace("\n", " ")


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
    from store.decode import DaliViewDecoder, pil_views

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
                   "store/decode/dali.py HW_DECODER_LOAD, train/config.py and cli.py")
    rows[f"DALI cpu, {cores} threads"] = n / time_dali(datas, boxes, flips, device="cpu", threads=cores,
                                                       batch_size=batch)
    procs = min(cores, 8) if device.type == "cuda" else 1
    rows[f"PIL, {procs} procs"] = n / time_pil(datas, boxes, flips, procs=procs, batch_size=batch)
    for name, rate in rows.items():
        rep.figure(sec, name, rate, "images/s", what)
    ctx["decode"] = rows
    rep.check(sec, "every decoder ran", all(r > 0 for r in rows.values()), ", ".join(rows))


HW_LOADS = (0.0, 0.65, 1.0)


def time_dali_cuda(datas, boxes, flips, *, device, threads: int, batch_size: int, hw_decoder_load: float) -> float:
    """Seconds for DALI on ``device`` to decode all views with this hardware decoder share,
    2 batches in flight, after one warm-up batch."""
    from store.decode import DaliViewDecoder

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
def teacher_flops(n_visible: int, *, width: int = 768, depth: int = 12) -> float:
    """Matmul FLOPs of one masked ViT-B/16 forward on CLS + ``n_visible`` patches."""
    t = n_visible + 1
    return 2 * n_visible * 768 * width + depth * (2 * t * 12 * width * width + 4 * t * t * width)


def check_teachers(rep: Report, sec: dict, ctx: dict) -> None:
    from extract.teachers import build_teacher
    from store import views as V

    device, size = ctx["device"], ctx["size"]
    b, iters = size["fwd_batch"], size["fwd_iters"]
    index = np.arange(b)
    images = torch.randn(b, 3, 224, 224, device=device)
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    for name in TEACHERS:
        teacher = build_teacher(name, random_init=True, seed=0, device=device)
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
        frac = rate * teacher_flops(nv) / ctx["peak"]
        rep.figure(sec, f"{name} masked forward", rate, "images/s",
                   f"untrained ViT-B/16 on CLS + {nv} visible patches, batch {b}, {precision}, {iters} batches")
        rep.figure(sec, f"{name} fraction of peak", frac, "", "its matmul FLOP/s over the measured peak")
        rep.check(sec, f"{name} tokens finite", bool(torch.isfinite(out["patch"]).all()),
                  f"patch tokens {tuple(out['patch'].shape)}")
        ctx.setdefault("teachers", {})[name] = teacher   # the online row of section 6 reuses them


# -- 5. the command line end to end ---------------------------------------------------
def _cli(*args) -> list[str]:
    return [sys.executable, str(ROOT / "cli.py"), *map(str, args)]


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


def _run_until(cmd: list[str], ready, *, log: Path, timeout: float) -> tuple[int | None, bool]:
    """Run ``cmd``; SIGKILL it as soon as ``ready()`` holds. Returns (exit code, killed).
    (Each step's timeout, three times the whole budget, only catches a hung step: a slow run
    still finishes and fails the budget check.)"""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
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
                            "--out", tmp / "knn.json"], 2 * n)]
    metrics = run / "metrics.jsonl"
    for k, (name, args, images) in enumerate(steps):
        log = logs / f"{k}.log"
        start = time.perf_counter()
        if killed_step(name):
            # log_every=1: a line past step kill_after means that checkpoint is on disk, and the
            # final one is not (it is written after the last step's line)
            rc, killed = _run_until(_cli(*args), lambda: any(kill_after < s < n_steps
                                                             for s in _metric_steps(metrics)),
                                    log=log, timeout=3 * ctx["size"]["budget_s"])
            ok = killed
            detail = f"killed after its step-{kill_after} checkpoint" if killed else f"exit {rc} before it could be killed"
        else:
            try:
                proc = subprocess.run(_cli(*args), cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                      timeout=3 * ctx["size"]["budget_s"])
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            ok, detail = rc == 0, f"exit {rc}"
        seconds = time.perf_counter() - start
        rate = f", {images / seconds:.1f} images/s" if images else ""
        rep.figure(sec, name, seconds, "s", f"wall time of `cli.py {args[0]}` in a subprocess"
                   + (f" ({images} images{rate})" if images else ""))
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
    result = json.loads((tmp / "knn.json").read_text())
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
            "online": "the same decoding + the three ViT-B teachers' forward + the step",
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


SECTIONS = [("1. environment", check_environment), ("2. DALI views vs PIL", check_agreement),
            ("3. decode throughput", check_decode), ("4. teacher masked forward", check_teachers),
            ("5. command line end to end", check_cli), ("6. training throughput", check_training)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes (CI on the CPU, <= 3 minutes)")
    parser.add_argument("--out", type=Path, default=Path("gpu_check"), help="folder for gpu_check.{json,md}")
    parser.add_argument("--work", type=Path, default=None, help="keep the generated data here (default: a temp dir)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    size = QUICK if args.quick else FULL
    t0 = time.perf_counter()
    meta = dict(command="python bench/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
                device=str(device), quick=args.quick, budget_s=size["budget_s"], date=time.strftime("%Y-%m-%d %H:%M"),
                device_name=(torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available()
                             else f"CPU ({os.cpu_count()} cores)"), seconds=0.0, sizes=size)
    rep = Report(args.out, meta)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_")) if args.work is None else args.work
    work.mkdir(parents=True, exist_ok=True)
    ctx = dict(device=device, size=size, tmp=work, left=lambda: size["budget_s"] - (time.perf_counter() - t0))
    try:
        for title, run in SECTIONS:
            sec = rep.section(title)
            start = time.perf_counter()
            try:
                run(rep, sec, ctx)
            except Exception as error:  # noqa: BLE001 - recorded as a failed check, next section runs
                last = traceback.format_exception_only(type(error), error)[-1].strip()
                rep.check(sec, "ran", False, last.replace("\n", " "))
                if title.startswith("1."):
                    break
            sec["seconds"] = time.perf_counter() - start
            meta["seconds"] = time.perf_counter() - t0
            rep.write()
            print(f"{title}: {sec['seconds']:.1f} s, "
                  f"{sum(not c['ok'] for c in sec['checks'])} failed checks", flush=True)
        meta["seconds"] = time.perf_counter() - t0
        final = rep.section("budget")
        rep.check(final, "within the time budget", meta["seconds"] <= size["budget_s"],
                  f"{meta['seconds']:.0f} s <= {size['budget_s']} s")
        rep.write()
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{'PASSED' if not rep.failed else 'FAILED: ' + '; '.join(rep.failed)} "
          f"({meta['seconds']:.0f} s) -> {args.out / 'gpu_check.md'}")
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
