"""eval linear under torchrun: the micro-batches split over ranks and gathered back in one process's order
(a unit test with a stand-in process group), and two gloo ranks on the CPU, crashed after a checkpoint and
resumed, ending with one process's run bit for bit."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import cli
import eval.linear as linear
from core.run import read_metrics
from core import dist

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class ValueImages(torch.utils.data.Dataset):
    """Image i is a 1x1 picture whose pixels hold i."""

    labels = np.zeros(11, dtype=np.int64)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.full((3, 1, 1), float(i)), 0


class ValueBackbone(nn.Module):
    """Its CLS feature of an image is (value,) * 4; records the micro-batches (their values) it ran."""

    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1))
        self.seen = []

    def forward_features(self, x):                # (B, 3, 1, 1) -> (B, 1 token, 4)
        self.seen.append(x[:, 0, 0, 0].long().tolist())
        return x[:, 0, 0, 0][:, None, None].expand(-1, 1, 4)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_rank_runs_its_round_robin_share_of_one_process_micro_batches_and_all_get_them_in_order(
        world, monkeypatch):
    order = torch.randperm(11, generator=torch.Generator().manual_seed(5))
    mb, count = 3, 4                                        # chunks of 3, 3, 3 and the last 2 images
    one_process = [order[k * mb:(k + 1) * mb].tolist() for k in range(count)]
    for rank in range(world):
        def all_gather(chunks, sent, rank=rank):            # other ranks' slots: -(slot + 1) everywhere
            for slot, chunk in enumerate(chunks):
                chunk.copy_(sent if slot == rank else torch.full_like(sent, -(slot + 1.0)))
        monkeypatch.setattr(dist, "rank", lambda rank=rank: rank)
        monkeypatch.setattr(dist, "world_size", lambda: world)
        monkeypatch.setattr(linear.td, "all_gather", all_gather)
        backbone = ValueBackbone()
        got = list(linear._chunk_features(backbone, ValueImages(), order, count=count, micro_batch=mb, dim=4,
                                          device=torch.device("cpu"), num_workers=0))
        # this rank ran exactly its own chunks (k = rank, rank + world, ...), each one process's micro-batch
        assert backbone.seen == one_process[rank::world]
        assert [len(f) for f in got] == [3, 3, 3, 2]
        for k, feats in enumerate(got):                     # chunk k arrives in its place, from slot k % world
            want = one_process[k] if k % world == rank else [-(k % world + 1)] * len(one_process[k])
            assert feats.tolist() == [[v] * 4 for v in want], (rank, k)


def _args(toy, out, *extra):
    train, val, ck = toy
    # 12 train images, batch 5: 2 steps of 10 images; micro-batch 2: 5 micro-batches per epoch, so the
    # last round of 2 ranks holds one (rank 1 sends padding) and micro-batch 2 (rows 4, 5) spans both
    # steps; 6 val images: 3 micro-batches. A small lr keeps the losses away from 0 on this easy toy.
    return ["eval", "linear", "--checkpoint", str(ck), "--model-arg", "img_size=32", "--model-arg", "depth=2",
            "--train", str(train), "--val", str(val), "--out", str(out), "--device", "cpu", "--workers", "0",
            "--epochs", "4", "--warmup-epochs", "1", "--batch-size", "5", "--micro-batch", "2",
            "--optimizer", "sgd", "--lr", "0.003", *extra]


# Each rank: the command crashes right after epoch 2's checkpoint (every rank reaches Run.save; rank 0
# writes), then the same command with --resume in the same process group.
_JOB = """
import datetime, json, sys
from pathlib import Path
import torch.distributed as td
td.init_process_group("gloo", timeout=datetime.timedelta(seconds=180))
import core.run
from cli import main

args = json.loads(sys.argv[1])
out = Path(args[args.index("--out") + 1])

class Crash(Exception):
    pass

save, saves = core.run.Run.save, []
def save_then_crash(run, obj, name=None):
    path = save(run, obj, name)
    saves.append(path)
    if len(saves) == 2:
        raise Crash
    return path
core.run.Run.save = save_then_crash
try:
    main(args, standalone_mode=False)
    raise AssertionError("the run did not crash")
except Crash:
    core.run.Run.save = save
td.barrier()
assert len(core.run.read_metrics(out / "metrics.jsonl")) == 2 and not (out / "result.json").exists()
main([*args, "--resume"], standalone_mode=False)
td.destroy_process_group()
"""


def test_two_torchrun_ranks_crashed_and_resumed_end_with_the_one_process_run_bit_for_bit(toy, tmp_path):
    """One process (in-process) vs 2 gloo ranks: the micro-batches of each step are computed on both ranks
    and gathered, the head steps on every rank. The ranks crash right after epoch 2's checkpoint and resume
    on 2 ranks: metrics.jsonl (loss and top-1/top-5 of every epoch), the result and the head equal the
    uninterrupted one-process run exactly. Each image's features are computed in the same micro-batch as
    in one process (same images, same augmentation keyed by (seed, epoch, index), same shapes, one thread),
    so there is no rounding difference to allow for."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    res = CliRunner().invoke(cli.main, _args(toy, whole))
    assert res.exit_code == 0, res.output + repr(res.exception)
    (tmp_path / "job.py").write_text(_JOB)
    env = {**ENV, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([*TORCHRUN, str(tmp_path / "job.py"), json.dumps(_args(toy, cut))], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("result written to") == 1          # rank 0 reports, rank 1 does not

    rows = read_metrics(whole / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and min(r["loss"] for r in rows) > 0
    assert read_metrics(cut / "metrics.jsonl") == rows
    a, b = (json.loads((p / "result.json").read_text()) for p in (whole, cut))
    assert a["metrics"] == b["metrics"] and a["config"] == b["config"]
    heads = [torch.load(p / "last.pt", weights_only=True)["head"] for p in (whole, cut)]
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


def test_eval_knn_refuses_to_run_under_torchrun(toy, tmp_path, monkeypatch):
    train, val, ck = toy
    monkeypatch.setenv("WORLD_SIZE", "2")
    res = CliRunner().invoke(cli.main, ["eval", "knn", "--checkpoint", str(ck), "--model-arg", "img_size=32",
                                        "--model-arg", "depth=2", "--train", str(train), "--val", str(val),
                                        "--out", str(tmp_path / "knn"), "--device", "cpu"])
    assert res.exit_code == 1 and res.output.startswith("Error: eval knn runs in one process, not under torchrun")
    assert not (tmp_path / "knn").exists()
