"""Training on two torchrun ranks (gloo, CPU), started as two node launchers of one rank each
joined by a c10d rendezvous (tests/two_nodes.py: the multi-node path), one launch for every
two-rank proof: each cached learner of a sweep and an online-fresh run follow the one-process
curve; a two-rank sweep crashed after a checkpoint and resumed with its recorded learners
repeats every learner bit for bit, stochastic depth included (each rank's own noise
restored); a one-process run goes on on two ranks; a non-finite loss on one rank stops both
naming the same step, and so does a SIGTERM that one rank gets (core/preempt.py), each writing
the checkpoint of that step. That the global batches do not depend on the world size is shown
in process (tests/data/test_order.py, tests/train/test_loop.py)."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import teachers.vit
from tests.conftest import tiny_builds
from tests.two_nodes import run_two_nodes
from train.config import load_config
from train.loop import train
from train.sweep import parse_variant

ROOT = Path(__file__).resolve().parents[2]

# a 2-block student on the shared store; views and streams resolved ("auto") and recorded
CACHED = {"data.views": "auto", "data.streams": "auto", "data.shuffle_window": 2, "data.decoder": "pil",
          "data.num_workers": 1, "train.batch_size": 4, "train.log_every": 1, "schedule.epochs": 4,
          "schedule.warmup_epochs": 1, "model.depth": 2}
# plain and mse follow the one-process curve; noisy draws stochastic depth per rank
VARIANTS = ["plain:", "mse:loss.kind=mse", "noisy:model.drop_path=0.1"]
# online-fresh without a store: two random teachers, tiny (tests/conftest.py tiny_builds, in this process
# and in each rank), statistics from 4 images
FRESH = {**CACHED, "data.views": 2, "data.streams": 2, "data.source": "online-fresh",
         "data.teachers_from": "random-init", "data.teachers": "[mae,ibot]", "data.stats_images": 4}
# (rank 0's, rank 1's) first step with a non-finite loss, -1: none
AGREE = [(-1, 3), (7, 4), (-1, -1)]

# Each rank: the non-finite check of every AGREE case followed by the loop's next collective (a rank
# that raised alone would leave the other waiting in it: the group's timeout fails the job), then
# the runs the tests below compare. The crash is in process, right after learner plain's
# checkpoint of step 2 (mse and noisy have written step 1's), and the resume is the command's
# `--resume` without --variant.
_JOB = """
import datetime, json, sys
import torch, torch.distributed as td
td.init_process_group("gloo", timeout=datetime.timedelta(seconds=180))
import teachers.vit
import train.learner as learner
import train.loop as loop
from tests.conftest import tiny_builds
teachers.vit.build_teacher = tiny_builds(teachers.vit.build_teacher)
from cli import main
from train.config import load_config
from train.sweep import parse_variant

spec = json.loads(open(sys.argv[1]).read())
rank = td.get_rank()
said = []
for case in spec["agree"]:
    message = learner.non_finite_message(torch.tensor(case[rank]), world=2, ckpt_path=spec["last_pt"])
    if message is None:
        td.all_reduce(torch.ones(3))
    said.append(message or "continued")
open(spec["agree_out"] % rank, "w").write(json.dumps(said))

sweep, variants = load_config(None, spec["cached"]), [parse_variant(v) for v in spec["variants"]]
loop.train(sweep, out_dir=spec["two"], max_steps=4, progress=False, variants=variants)

class Crash(Exception):
    pass

checkpoint = learner.Learner.checkpoint
def crash_after(learner, **kw):
    checkpoint(learner, **kw)
    if learner.name == "plain" and learner.step == 2:
        raise Crash
learner.Learner.checkpoint = crash_after
try:
    loop.train(sweep, out_dir=spec["cut"], max_steps=4, ckpt_steps=1, progress=False, variants=variants)
    raise AssertionError("the sweep did not crash")
except Crash:
    learner.Learner.checkpoint = checkpoint
main(spec["resume"], standalone_mode=False)
loop.train(load_config(None, spec["cached"]), out_dir=spec["mixed"], max_steps=4, ckpt_steps=1, resume=True,
           progress=False)
loop.train(load_config(None, spec["fresh"]), out_dir=spec["fresh_two"], max_steps=4, progress=False)

import os, signal
from core.preempt import Preempted
train_on = learner.Learner.train_on
def signal_rank_1(self, *args, **kw):
    train_on(self, *args, **kw)
    if rank == 1 and self.step == 3:
        os.kill(os.getpid(), signal.SIGTERM)
learner.Learner.train_on = signal_rank_1
try:
    loop.train(load_config(None, spec["cached"]), out_dir=spec["preempted"], max_steps=4, progress=False)
    said = "not preempted"
except Preempted as stopped:
    said = str(stopped)
open(spec["preempt_out"] % rank, "w").write(said)
td.destroy_process_group()
"""


def _overrides(data, store, base):
    return [f"{k}={v}" for k, v in {"data.images": data, "data.store": store, **base}.items()]


def _losses(run):
    return [json.loads(ln)["loss"] for ln in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def _relative(a, b):
    a, b = np.array(a), np.array(b)
    return np.abs(a - b) / np.abs(a)


@pytest.fixture(scope="module")
def runs(prepared_data, teacher_store, tmp_path_factory, one_torch_thread, arm_crash) -> Path:
    """A folder of the runs compared below: one/, single/ and fresh_one/ in this process, two/,
    cut/, mixed/ (single/ stopped after 2 steps, then resumed on 2 ranks) and fresh_two/ from
    one launch of two torchrun nodes."""
    out = tmp_path_factory.mktemp("two_ranks")
    cached, fresh = _overrides(prepared_data, teacher_store, CACHED), _overrides(prepared_data, "", FRESH)
    variants = [parse_variant(v) for v in VARIANTS]
    train(load_config(None, cached), out_dir=out / "one", max_steps=4, progress=False, variants=variants)
    with pytest.MonkeyPatch.context() as mp:
        crash = arm_crash(mp, 2)
        with pytest.raises(crash):
            train(load_config(None, cached), out_dir=out / "single", max_steps=4, ckpt_steps=1, progress=False)
    shutil.copytree(out / "single", out / "mixed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(teachers.vit, "build_teacher", tiny_builds(teachers.vit.build_teacher))
        train(load_config(None, fresh), out_dir=out / "fresh_one", max_steps=4, progress=False)

    (out / "last.pt").write_bytes(b"")              # the checkpoint the non-finite message names
    resume = ["train", "--data", prepared_data, "--store", teacher_store, "--out", out / "cut", "--steps", 4,
              "--ckpt-steps", 1, "--device", "cpu", "--resume", *cached[2:]]
    spec = dict(agree=AGREE, last_pt=str(out / "last.pt"), agree_out=str(out / "agree-%d.json"), cached=cached,
                variants=VARIANTS, fresh=fresh, resume=[str(a) for a in resume],
                preempt_out=str(out / "preempt-%d.txt"),
                **{k: str(out / k) for k in ("two", "cut", "mixed", "fresh_two", "preempted")})
    (out / "spec.json").write_text(json.dumps(spec))
    (out / "job.py").write_text(_JOB)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    nodes = run_two_nodes([out / "job.py", out / "spec.json"], logs=out / "logs", cwd=ROOT, env=env, timeout=600)
    assert [code for code, _ in nodes] == [0, 0], "\n".join(text[-3000:] for _, text in nodes)
    return out


def test_each_cached_learner_of_a_sweep_follows_the_one_process_curve_on_two_ranks(runs):
    for name in ("plain", "mse"):
        a, b = _losses(runs / "one" / name), _losses(runs / "two" / name)
        rel = _relative(a, b)
        print(f"{name}: one process vs two ranks, relative loss difference per step: {np.round(rel, 4).tolist()}")
        # The same global batches. What differs: DDP averages the two ranks' mean losses with equal
        # weight while one process averages over all the batch's tokens at once (ranks hold different
        # numbers of covered tokens), and the reduction order.
        assert len(a) == len(b) == 4 and rel.max() < 1e-2
    for run in (runs / "one" / "plain", runs / "two" / "plain", runs / "two" / "noisy"):
        data_cfg = load_config(run / "config.yaml").data
        assert (data_cfg.views, data_cfg.streams) == (2, 1)     # recorded resolved (2 ranks share 1 stream)


def test_a_two_rank_sweep_crashed_and_resumed_with_its_recorded_learners_repeats_each_learner_and_its_noise(runs):
    for name in ("plain", "mse", "noisy"):
        assert len(_losses(runs / "two" / name)) == 4
        assert _losses(runs / "cut" / name) == _losses(runs / "two" / name), name
    # each rank's own generators are saved, and restored by that rank on resume
    rngs = torch.load(runs / "cut" / "noisy" / "last.pt", map_location="cpu", weights_only=False)["rng"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])


def test_a_run_stopped_in_one_process_goes_on_on_two_ranks_with_the_same_batches(runs):
    a, c = _losses(runs / "one" / "plain"), _losses(runs / "mixed")     # a sweep's learner is its single run
    rel = _relative(a, c)
    print(f"one process vs one-then-two ranks, relative loss difference per step: {np.round(rel, 4).tolist()}")
    assert len(c) == 4 and c[:2] == a[:2] and rel.max() < 1e-2
    data_cfg = load_config(runs / "mixed" / "config.yaml").data
    assert (data_cfg.views, data_cfg.streams) == (2, 1)


def test_online_fresh_training_on_two_ranks_follows_the_one_process_curve(runs):
    a, b = _losses(runs / "fresh_one"), _losses(runs / "fresh_two")
    rel = _relative(a, b)
    print(f"online-fresh, one process vs two ranks, relative loss difference per step: {np.round(rel, 4).tolist()}")
    # the same global batches (tests/train/test_loop.py); the losses differ for the reasons above, more
    # with two shallow random teachers
    assert len(a) == len(b) == 4 and rel.max() < 3e-2


def test_a_non_finite_loss_on_one_rank_stops_every_rank_naming_the_same_step(runs):
    want = []
    for case in AGREE:
        first = min((b for b in case if b >= 0), default=None)
        want.append("continued" if first is None
                    else f"non-finite loss at step {first}; stopping (last good checkpoint: {runs / 'last.pt'})")
    assert [json.loads((runs / f"agree-{r}.json").read_text()) for r in (0, 1)] == [want, want]


def test_a_signal_on_one_rank_stops_every_rank_at_its_step_with_that_steps_checkpoint(runs):
    line = (f"preempted by SIGTERM at step 3 of 4: checkpoint written to {runs / 'preempted' / 'last.pt'}; resume "
            "with --resume or --auto-resume")
    assert [(runs / f"preempt-{r}.txt").read_text() for r in (0, 1)] == [line, line]
    assert torch.load(runs / "preempted" / "last.pt", map_location="cpu", weights_only=True)["step"] == 3
    assert _losses(runs / "preempted") == _losses(runs / "two" / "plain")[:3]   # a learner is its single run
