"""Validate the whole product on one GPU in under 9 minutes (or on the CPU in CI with --quick).

    python bench/gpu_check.py                        # GPU 0: the full check, <= 9 minutes
    python bench/gpu_check.py --device cuda:1        # another GPU
    python bench/gpu_check.py --device cpu --quick   # the same checks, small, on the CPU (CI)

--quick also cuts the three random-init ViT-B/16 teachers to one block (QUICK's teacher_depth):
the same architecture, patches, width and token geometry, so the CPU form checks the plumbing of
every section, end to end; the teachers' speed is measured by the full form only.

Writes OUT/gpu_check.json and OUT/gpu_check.md, rewritten after each of its six sections
(bench/gpu_sections.py), and exits 1 if any check failed. What each section measures and which
rows it fills: docs/performance.md, "Validating a GPU"."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_sections import (check_agreement, check_cli, check_decode,  # noqa: E402 - after sys.path
                                check_environment, check_teachers, check_training, teacher_label)

# Sizes of a run: the full one for a GPU, and --quick (CI on 2 CPU cores, <= 3 minutes).
# teacher_depth: None for the real ViT-B/16 teachers, else their blocks (bench/gpu_sections.py).
FULL = dict(budget_s=540, teacher_depth=None, agree_views=32, decode_views=2048, decode_batch=128, fwd_batch=256,
            fwd_iters=8, copies=80, shard=128, views=2, ex_batch=128, stats=256, train_batch=128, bench_steps=6,
            bench_warmup=2, bench_rounds=3, peak_n=8192, knn_batch=256, knn_k=20, train_steps=40, kill_after=30)
QUICK = dict(budget_s=180, teacher_depth=1, agree_views=4, decode_views=64, decode_batch=32, fwd_batch=2,
             fwd_iters=1, copies=1, shard=4, views=1, ex_batch=4, stats=4, train_batch=4, bench_steps=2,
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
                 f"{m['seconds']:.0f} s of a {m['budget_s']} s budget; teachers: {m['teachers']}.", ""]
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
                             else f"CPU ({os.cpu_count()} cores)"), seconds=0.0, sizes=size,
                teachers=f"random-init {teacher_label(size)}")
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
        if device.type == "cuda":
            # the lent GPU's lease is the hard limit this budget protects
            rep.check(final, "within the time budget", meta["seconds"] <= size["budget_s"],
                      f"{meta['seconds']:.0f} s <= {size['budget_s']} s")
        else:
            # CPUs of one machine kind differ up to 4x per core: a smoke run's wall time is a figure
            rep.figure(final, "wall time", meta["seconds"], "s",
                       f"whole script; the aim is {size['budget_s']} s, checked on a GPU only")
        rep.write()
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{'PASSED' if not rep.failed else 'FAILED: ' + '; '.join(rep.failed)} "
          f"({meta['seconds']:.0f} s) -> {args.out / 'gpu_check.md'}")
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
