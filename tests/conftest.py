"""Session-wide fixtures shared by every test package.

- ``photo_tree``: an ImageFolder tree of 13 real photos (scikit-image samples) in
  3 classes, mixing RGB/CMYK/grayscale JPEG and RGB/RGBA/L/LA/palette PNG, long side
  at most 256 px (see ``samples/photos.py`` for the exact list).
- ``prepared_data``: that tree packed by ``data.shards.prepare`` with
  ``shard_size=5`` (3 shards: 5 + 5 + 3 samples, the last one partial).

Both are built once per session and must be treated as read-only by tests.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def photo_tree(tmp_path_factory) -> Path:
    """ImageFolder root ``<tmp>/photos/{animals,objects,science}/*.{jpg,png}``."""
    from samples.photos import write_photo_tree

    return write_photo_tree(tmp_path_factory.mktemp("photo_tree") / "photos", max_side=256)


@pytest.fixture(scope="session")
def prepared_data(photo_tree, tmp_path_factory) -> Path:
    """Root of a finished ``prepare`` of ``photo_tree`` (open it with ``ImageSet.open``)."""
    from data.shards import prepare

    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare(photo_tree, out, shard_size=5, progress=False, workers=0)
    return out


@pytest.fixture(scope="session")
def teacher_store(prepared_data, tmp_path_factory, worker_id) -> Path:
    """A complete feature store of ``prepared_data``: the three paper teachers, untrained
    (random init, seed 0), 2 views, fp16 codec, no view pixels; adapter statistics from all 13
    images (a 4-image basis made the fused-target CKA of tests/train/test_demo.py depend on
    which 4 images the keyed sample drew).
    Read-only for tests. The xdist workers of a run share one copy, made by the first that asks
    (the others wait for it): a store names its images by their digest, equal in every worker's
    ``prepared_data``."""
    if worker_id == "master":
        return _extract_teacher_store(prepared_data, tmp_path_factory.mktemp("features") / "store")
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / "teacher_store"
    done = shared.with_name("teacher_store.done")
    with FileLock(shared.with_name("teacher_store.making")):
        if not done.exists():
            shutil.rmtree(shared, ignore_errors=True)          # a worker that died while making it
            _extract_teacher_store(prepared_data, shared)
            done.touch()
    return shared


def _extract_teacher_store(prepared_data: Path, store: Path) -> Path:
    from extract.runner import run_extraction
    from teachers.vit import build_teacher
    from data.shards import ImageSet

    data = ImageSet.open(prepared_data)
    for name in ("mae", "mocov3", "ibot"):
        run_extraction(teacher=build_teacher(name, random_init=True, seed=0), data=data, store_path=store,
                       views=2, seed=0, batch_size=4, decoder="pil", progress=False, stats_images=13)
    return store


@pytest.fixture
def sigkill_when():
    """``sigkill_when(cmd, ready, env=...)``: start ``cmd``, poll ``ready()`` every 50 ms and
    SIGKILL its whole process group as soon as it is true (asserting it was still running then),
    so that a launcher's workers (torchrun) die with it, as on a preempted node."""
    import os
    import signal
    import subprocess
    import time

    def run(cmd, ready, *, env=None, cwd=None, timeout=300):
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.time() + timeout
        try:
            while time.time() < deadline and proc.poll() is None and not ready():
                time.sleep(0.05)
            assert proc.poll() is None, "the process finished before it could be killed"
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return run


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a module (opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): tiny models on a shared
    2-core machine run far faster without OpenMP spin-waiting, and fp32 CPU results only
    repeat bit for bit at a fixed thread count. Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _step_difference(objective, reference: dict, other: dict) -> tuple[float, float, float]:
    """One step of ``objective`` on two batches: (the reference batch's loss, relative loss
    difference |l_o - l_r| / |l_r|, relative gradient difference ||g_o - g_r|| / ||g_r|| over
    every trainable parameter)."""
    import torch

    params = [p for p in objective.trainable.parameters() if p.requires_grad]
    out = []
    for batch in (reference, other):
        loss = objective(batch)["loss"]
        grads = torch.autograd.grad(loss, params)
        out.append((loss.detach(), torch.cat([g.flatten() for g in grads])))
    (lr, gr), (lo, go) = out
    return float(lr), float((lo - lr).abs() / lr.abs()), float((go - gr).norm() / gr.norm())


@pytest.fixture
def step_difference():
    """The function ``(objective, reference batch, other batch) -> (reference loss, relative loss
    difference, relative gradient difference)`` of one step on each (cached vs online, stored
    views vs fresh decode, a codec vs fp16 tokens)."""
    return _step_difference


class _RunsCode:
    """Unpickling this object would write a marker file (stands for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "code ran")


@pytest.fixture
def code_running_object(tmp_path) -> tuple[_RunsCode, Path]:
    """(an object whose unpickling writes ``marker``, marker): put it in a checkpoint file to
    check that loading the file refuses it before it runs."""
    marker = tmp_path / "marker.txt"
    return _RunsCode(marker), marker
