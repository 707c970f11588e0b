"""Preemption (core/preempt.py): SIGTERM or SIGUSR1 during ``train`` writes every learner's checkpoint
at the current step and stops with ``Preempted`` (the command: one line, exit status 75); the resume
repeats the uninterrupted losses bit for bit. ``extract`` stops after the current block, which a rerun
skips. ``--requeue`` runs ``scontrol requeue``. Two ranks agreeing on the step: tests/train/test_two_ranks.py."""
import os
import signal
import threading

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from core.preempt import PREEMPTED_EXIT, Preempted, PreemptSignals, requeue_job
from core.run import load_checkpoint
from train.learner import Learner
from tests.train.conftest import TINY_RUN, logged_losses, tiny_run_config
from train.loop import train
from train.sweep import parse_variant

# fp32 CPU sums repeat at a fixed thread count; a TINY_RUN of 4 steps (step 3 has no epoch checkpoint)
pytestmark = pytest.mark.usefixtures("one_torch_thread", "no_loss_plots")
VARIANTS = ["uniform:gate.mode=uniform", "mse:loss.kind=mse"]


def _signal_at(monkeypatch, step: int, sig=signal.SIGTERM):
    """The process sends itself ``sig`` once, right after a learner's optimiser step number ``step``."""
    real, sent = Learner.train_on, []

    def train_on(self, *args, **kw):
        real(self, *args, **kw)
        if self.step == step and not sent:
            sent.append(step)
            os.kill(os.getpid(), sig)
    monkeypatch.setattr(Learner, "train_on", train_on)


def test_sigterm_checkpoints_the_step_and_the_resume_repeats_the_uninterrupted_losses(
        prepared_data, teacher_store, tmp_path, monkeypatch):
    cfg, ref, run = tiny_run_config(prepared_data, teacher_store), tmp_path / "ref", tmp_path / "run"
    train(cfg, out_dir=ref, max_steps=4, progress=False)
    before = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as mp:
        _signal_at(mp, 3)
        with pytest.raises(Preempted) as stopped:
            train(cfg, out_dir=run, max_steps=4, progress=False)
    assert str(stopped.value) == (f"preempted by SIGTERM at step 3 of 4: checkpoint written to {run / 'last.pt'}; "
                                  "resume with --resume or --auto-resume")
    assert signal.getsignal(signal.SIGTERM) is before               # the handlers are given back
    assert load_checkpoint(run / "last.pt")["step"] == 3 and not (run / "student.safetensors").exists()
    assert logged_losses(run) == logged_losses(ref)[:3]
    train(cfg, out_dir=run, max_steps=4, progress=False, resume=True)
    assert logged_losses(run) == logged_losses(ref) and len(logged_losses(ref)) == 4


def test_sigusr1_stops_a_sweep_with_each_learners_checkpoint_and_the_resume_repeats_each(
        prepared_data, teacher_store, tmp_path, monkeypatch):
    cfg, ref, run = tiny_run_config(prepared_data, teacher_store), tmp_path / "ref", tmp_path / "run"
    variants = [parse_variant(v) for v in VARIANTS]
    train(cfg, out_dir=ref, max_steps=4, progress=False, variants=variants)
    with monkeypatch.context() as mp:
        _signal_at(mp, 3, signal.SIGUSR1)           # during the first learner's step 3: both finish it
        with pytest.raises(Preempted, match=r"^preempted by SIGUSR1 at step 3 of 4: checkpoints of 2 learner\(s\) "
                                            rf"written to {run}/NAME/last.pt; resume"):
            train(cfg, out_dir=run, max_steps=4, progress=False, variants=variants)
    for name in ("uniform", "mse"):
        assert load_checkpoint(run / name / "last.pt")["step"] == 3
    train(cfg, out_dir=run, max_steps=4, progress=False, variants=variants, resume=True)
    for name in ("uniform", "mse"):
        assert logged_losses(run / name) == logged_losses(ref / name) and len(logged_losses(ref / name)) == 4, name


def test_the_train_command_prints_one_line_exits_75_and_requeues_the_slurm_job(
        prepared_data, teacher_store, tmp_path, monkeypatch):
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    _signal_at(monkeypatch, 1)
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--data", prepared_data, "--store", teacher_store, "--out", run,
                                       "--steps", "4", "--device", "cpu", "--requeue",
                                       *(f"{k}={v}" for k, v in TINY_RUN.items())])
    assert result.exit_code == PREEMPTED_EXIT == 75, (result.output, result.exception)
    assert result.output.splitlines() == [
        f"preempted by SIGTERM at step 1 of 4: checkpoint written to {run / 'last.pt'}; resume with --resume or "
        "--auto-resume; SLURM job 4242 requeued"]
    assert calls.read_text() == "requeue 4242\n" and load_checkpoint(run / "last.pt")["step"] == 1


def test_requeue_fails_softly_and_handlers_stay_out_of_other_threads(monkeypatch, tmp_path):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert requeue_job() == "not requeued: SLURM_JOB_ID is not set"
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("PATH", str(tmp_path))                       # no scontrol
    assert requeue_job() == "not requeued: scontrol not found (requeue SLURM job 7 by hand)"
    (tmp_path / "scontrol").write_text("#!/bin/sh\necho 'Requested operation is presently disabled' >&2\nexit 1\n")
    (tmp_path / "scontrol").chmod(0o755)
    assert requeue_job() == "not requeued: scontrol requeue 7 failed (Requested operation is presently disabled)"
    before, seen = signal.getsignal(signal.SIGUSR1), []
    thread = threading.Thread(target=lambda: seen.append(signal.getsignal(signal.SIGUSR1) is before and
                                                         PreemptSignals().install()._previous == {}))
    thread.start()
    thread.join()
    assert seen == [True]
    with PreemptSignals() as signals:
        assert signal.getsignal(signal.SIGUSR1) == signals._handle and signals.received() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.received() == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def test_extract_stops_after_the_current_block_and_the_rerun_skips_the_blocks_it_wrote(
        prepared_data, teacher_store, tmp_path, tiny_teacher, monkeypatch):
    import store.teacherstore
    from data.shards import ImageSet
    from extract.config import ExtractConfig
    from extract.runner import run_extraction
    from store.features import FeatureStore

    cfg = ExtractConfig(store=tmp_path / "store", views=2, seed=0, batch_size=4, decoder="pil", stats_images=13,
                        codec="fp16", view_pixels="none", device="cpu")
    real, writes = store.teacherstore.TeacherStore.write_block, []

    def write_block(self, *args, **kw):             # the writer thread; the signal reaches the main thread
        real(self, *args, **kw)
        writes.append(1)
        if len(writes) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
    data, teacher = ImageSet.open(prepared_data), tiny_teacher("mae")
    with monkeypatch.context() as mp:
        mp.setattr(store.teacherstore.TeacherStore, "write_block", write_block)
        with pytest.raises(Preempted, match=r"^preempted by SIGTERM after block (2|3) of 6: the store holds mae's"):
            run_extraction(cfg, teacher=teacher, data=data, progress=False)
    done = int(FeatureStore.open(cfg.store).teacher("mae").complete_matrix().sum())
    assert done in (2, 3) and done == len(writes)     # the block in flight is finished, none after it
    summary = run_extraction(cfg, teacher=teacher, data=data, progress=False)
    assert (summary["skipped"], summary["blocks"]) == (done, 6 - done)
    ours, ref = FeatureStore.open(cfg.store).teacher("mae"), FeatureStore.open(teacher_store).teacher("mae")
    for slot in range(2):
        for shard in range(3):
            a, b = ours.read_block(slot, shard), ref.read_block(slot, shard)
            assert all(np.array_equal(a[k], b[k]) for k in b), (slot, shard)
