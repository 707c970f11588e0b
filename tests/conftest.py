"""Session-wide fixtures shared by every test package.

- ``photo_tree``: an ImageFolder tree of 13 real photos (scikit-image samples) in
  3 classes, mixing RGB/CMYK/grayscale JPEG and RGB/RGBA/L/LA/palette PNG, long side
  at most 256 px (see ``samples/photos.py`` for the exact list).
- ``prepared_data``: that tree packed by ``data.shards.prepare`` with
  ``shard_size=5`` (3 shards: 5 + 5 + 3 samples, the last one partial).
- ``teacher_store``: a store of three tiny teachers over it.
- ``one_image_shards``: the tree packed in shards of one image (many blocks, for SIGKILL tests).

These are built once per session and must be treated as read-only by tests.

The tests' teachers are tiny (``tiny_teacher``): the descriptor's timm architecture cut to one
block, random init. Everything else is the real teacher's: patches, input size, width (768 for
ViT-B, 1024 for ViT-L), so every token geometry and byte count (14 x 14 grid, masks, the resize
of /14 teachers, the adapter codec keeping 192 of 768 directions, the pca codec's 256) is the
one the product stores. What a store, a codec or training does with a teacher's tokens does not
depend on its depth, and depth is the cost: a ViT-B of 12 blocks took ~60 s to extract the
shared store on two cores, one block ~2 s. Narrower teachers would save ~1 s more but move what
tests measure (a ViT-S-wide student's PCA adapters need 384 directions; at 384 wide the per-rank
loss weighting of tests/train/test_two_ranks.py exceeds its bound). A subprocess gets them too
(``tiny_cli``: a SIGKILLed or torchrun ``extract``). Full-depth ViT-B/16 and DINOv2 stay in the
tests of the official checkpoints' conversion and the masked forward, and in one smoke of a real
teacher extracted: the default ``extract`` command's test in tests/extract/test_view_pixels.py.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

TINY_TEACHER = {"depth": 1}     # model_kwargs of ``tiny_teacher``


def _tiny_teacher(name: str, *, seed: int = 0, device: str = "cpu", **model_kwargs):
    """Random-init teacher ``name`` (seed ``seed``) built with ``TINY_TEACHER`` under ``model_kwargs``."""
    from teachers.vit import build_teacher

    return build_teacher(name, random_init=True, seed=seed, device=device,
                         model_kwargs={**TINY_TEACHER, **model_kwargs})


def tiny_builds(build_teacher):
    """``build_teacher`` that builds a random-init teacher with ``TINY_TEACHER`` when the caller gives
    no model arguments (what ``extract --random-init`` and ``data.teachers_from=random-init`` do);
    a build with model arguments (a store's record, replayed) is left as asked."""
    def build(name, **kw):
        if kw.get("random_init") and kw.get("model_kwargs") is None:
            kw["model_kwargs"] = TINY_TEACHER
        return build_teacher(name, **kw)
    return build


# ``python -c TINY_CLI ARGS`` is ``python cli.py ARGS`` with ``tiny_builds`` applied first: a subprocess
# (a SIGKILLed or torchrun extraction) builds the teacher ``tiny_teacher`` builds in process. Run
# from the repository root (the interpreter puts the working directory on its path for -c).
TINY_CLI = ("import teachers.vit; from tests.conftest import tiny_builds; "
            "teachers.vit.build_teacher = tiny_builds(teachers.vit.build_teacher); "
            "from cli import main; main()")


@pytest.fixture(scope="session")
def tiny_cli():
    """``tiny_cli(*args)``: the command line (a list) of ``python cli.py ARGS`` in a new interpreter
    whose random-init teachers are tiny (``TINY_CLI``); under torchrun, put it after ``--no-python``."""
    import sys

    return lambda *args: [sys.executable, "-c", TINY_CLI, *map(str, args)]


@pytest.fixture(scope="session")
def tiny_teacher():
    """``tiny_teacher(name, seed=0, device="cpu", **model_kwargs)``: the tests' random-init teacher
    (module docstring); ``model_kwargs`` override ``TINY_TEACHER``."""
    return _tiny_teacher


@pytest.fixture
def tiny_random_init(monkeypatch):
    """For this test, ``teachers.vit.build_teacher`` builds random-init teachers tiny when given no
    model arguments (``tiny_builds``): ``extract --random-init`` through the CLI, and online-fresh
    with ``data.teachers_from=random-init``. A store records the tiny build, so the commands that
    read it later (``train``, ``verify``, ``inspect``) rebuild it without this patch."""
    import teachers.vit

    monkeypatch.setattr(teachers.vit, "build_teacher", tiny_builds(teachers.vit.build_teacher))


def one_error(args, *names, env=None, code=None, alone=False) -> str:
    """Run ``cli.py ARGS`` in process and assert an expected failure: exit status ``code`` (any
    non-zero without it), no traceback, exactly one ``Error: ...`` line (``alone``: and no other
    output line) naming every one of ``names``; return that line."""
    from click.testing import CliRunner

    from cli import main

    r = CliRunner().invoke(main, [str(a) for a in args], env=env)
    assert isinstance(r.exception, SystemExit), (r.exception, r.output)   # not an uncaught exception
    assert r.exit_code == code if code is not None else r.exit_code != 0, r.output
    assert "Traceback" not in r.output, r.output
    lines = [line for line in r.output.splitlines() if (line.strip() if alone else "Error:" in line)]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    for name in names:
        assert str(name) in lines[0], (name, r.output)
    return lines[0]


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
def one_image_shards(photo_tree, tmp_path_factory) -> Path:
    """``photo_tree`` packed with ``shard_size=1``: 13 shards, so an extraction of 2 views writes 26
    blocks, enough for a SIGKILL test to land among them with a tiny teacher (~30 ms a block)."""
    from data.shards import prepare

    out = tmp_path_factory.mktemp("one_image_shards") / "data"
    prepare(photo_tree, out, shard_size=1, progress=False, workers=0)
    return out


@pytest.fixture(scope="session")
def teacher_store(prepared_data, tmp_path_factory, worker_id) -> Path:
    """A complete feature store of ``prepared_data``: the three paper teachers, tiny
    (``tiny_teacher``, seed 0), 2 views, fp16 codec, no view pixels; adapter statistics from all 13
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
    return extract_tiny(prepared_data, store, ("mae", "mocov3", "ibot"))


def extract_tiny(prepared_data: Path, store: Path, names) -> Path:
    """Extract tiny teachers ``names`` (``tiny_teacher``, seed 0) over ``prepared_data`` into ``store``
    as ``teacher_store`` holds its three: 2 views, fp16 codec, no view pixels, statistics from all
    13 images."""
    from extract.config import ExtractConfig
    from extract.runner import run_extraction
    from data.shards import ImageSet

    data = ImageSet.open(prepared_data)
    for name in names:
        run_extraction(ExtractConfig(store=store, views=2, seed=0, batch_size=4, decoder="pil", stats_images=13,
                                     codec="fp16", view_pixels="none", device="cpu"),
                       teacher=_tiny_teacher(name), data=data, progress=False)
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
