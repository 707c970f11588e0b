"""Snapshots: ``train.snapshot_every`` N epochs keeps the student as RUN/snapshots/epoch_NNNN.safetensors
(and with ``train.snapshot_full`` the checkpoint as epoch_NNNN.pt), which ``eval`` loads like any student
and a resume continues from like last.pt."""
import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from cli import main
from core.run import load_checkpoint
from eval.common import load_backbone
from tests.eval.conftest import make_toy_folder
from tests.train.conftest import logged_losses, tiny_run_config
from train.loop import train

# fp32 CPU sums repeat at a fixed thread count; a TINY_RUN: 2 steps an epoch, 5 steps of its 4 epochs
pytestmark = pytest.mark.usefixtures("one_torch_thread", "no_loss_plots")


def test_snapshots_keep_the_student_every_n_epochs_for_eval_and_the_checkpoint_for_a_resume(
        prepared_data, teacher_store, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_run_config(prepared_data, teacher_store, **{"train.snapshot_every": 2, "train.snapshot_full": "true"})
    train(cfg, out_dir=run, max_steps=5, progress=False)
    snaps = run / "snapshots"
    assert sorted(p.name for p in snaps.iterdir()) == ["epoch_0002.pt", "epoch_0002.safetensors"]   # not epoch 1
    full = load_checkpoint(snaps / "epoch_0002.pt")
    assert (full["step"], full["epoch"]) == (4, 2) and load_checkpoint(run / "last.pt")["step"] == 5
    # the student of step 4, as student.safetensors holds the final one (timm keys, zero head)
    student = load_file(snaps / "epoch_0002.safetensors")
    assert student.keys() == load_file(run / "student.safetensors").keys()
    for key, value in full["model"].items():
        if key.startswith("student.vit."):
            assert torch.equal(student[key[len("student.vit."):]], value), key
    assert not torch.equal(student["norm.weight"], load_file(run / "student.safetensors")["norm.weight"])
    # eval loads either form as the same backbone
    a = load_backbone(snaps / "epoch_0002.safetensors", depth=2).state_dict()
    b = load_backbone(snaps / "epoch_0002.pt", depth=2).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    toy = make_toy_folder(tmp_path / "toy", per_class=2, seed=1)
    result = CliRunner().invoke(main, [str(a) for a in (
        "eval", "knn", "--checkpoint", snaps / "epoch_0002.safetensors", "--model-arg", "depth=2", "--train", toy,
        "--val", toy, "--out", tmp_path / "knn", "--device", "cpu", "--workers", "0")])
    assert result.exit_code == 0, (result.output, result.exception)
    record = json.loads((tmp_path / "knn" / "result.json").read_text())
    assert record["checkpoint"]["path"] == str(snaps / "epoch_0002.safetensors")
    # the full snapshot as last.pt: the resume repeats step 5
    branch = tmp_path / "branch"
    shutil.copytree(run, branch, ignore=shutil.ignore_patterns("snapshots", "student.safetensors"))
    shutil.copy(snaps / "epoch_0002.pt", branch / "last.pt")
    train(tiny_run_config(prepared_data, teacher_store), out_dir=branch, max_steps=5, progress=False, resume=True)
    assert logged_losses(branch) == logged_losses(run) and len(logged_losses(run)) == 5
