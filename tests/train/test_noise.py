"""The run's noise (stochastic depth) is part of the run: seeded by train.seed per rank, saved
for every rank in each checkpoint and restored by each rank on resume (on two torchrun ranks:
tests/train/test_two_ranks.py)."""
import json
from pathlib import Path

import torch

from train.config import load_config
from train.loop import train
from train.noise import resume_noise, seed_noise

NOISY = {"model.drop_path": 0.1, "model.depth": 2}      # stochastic depth in a 2-block student


def _overrides(data, store, **kw):
    base = {"data.images": data, "data.store": store, "data.views": 2, "data.shuffle_window": 2,
            "data.decoder": "pil", "data.num_workers": 1, "data.streams": "auto", "train.batch_size": 4,
            "train.log_every": 1, "schedule.epochs": 4, "schedule.warmup_epochs": 1, **NOISY, **kw}
    return [f"{k}={v}" for k, v in base.items()]


def _losses(run):
    return [json.loads(ln)["loss"] for ln in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_two_runs_with_stochastic_depth_draw_the_same_noise_whatever_the_process_drew_before(
        prepared_data, teacher_store, tmp_path):
    def run(name, **kw):
        train(load_config(None, _overrides(prepared_data, teacher_store, **kw)), out_dir=tmp_path / name,
              max_steps=3, progress=False)
        return _losses(tmp_path / name)

    a = run("a")
    torch.manual_seed(12345)
    torch.rand(1000)                                   # the process's global generator moved on
    b = run("b")
    assert len(a) == 3 and a == b
    # the noise is drawn at all: without stochastic depth the same run logs other losses
    assert run("still", **{"model.drop_path": 0.0}) != a


def test_ranks_draw_different_noise_and_a_resume_restores_each_ranks_own(tmp_path):
    draws = {}
    for rank in (0, 1):
        seed_noise(0, rank)
        draws[rank] = torch.rand(8)
    assert not torch.equal(draws[0], draws[1])
    seed_noise(0, 1)
    assert torch.equal(torch.rand(8), draws[1])
    states = []
    for rank in (0, 1):
        seed_noise(3, rank)
        torch.rand(5)
        states.append({"torch": torch.get_rng_state(), "cuda": None})
    expect = torch.rand(4)                              # rank 1's next draws
    resume_noise(states, seed=3, rank=1, world=2, step=9, device="cpu")
    assert torch.equal(torch.rand(4), expect)
    # another world size (or a checkpoint of rank 0's state only): fresh noise per rank, keyed by the step
    resume_noise(states, seed=3, rank=1, world=4, step=9, device="cpu")
    x = torch.rand(4)
    resume_noise(states[0], seed=3, rank=0, world=2, step=9, device="cpu")
    y = torch.rand(4)
    seed_noise(3, 1, 9)
    assert torch.equal(torch.rand(4), x) and not torch.equal(x, y)
