"""Creating a feature store: a kill or a full disk at any write while the root or a teacher's
group is created leaves what a rerun finishes into a store equal to an uninterrupted one; a
root or group half-created by an older writer is named by open and finished by the rerun."""
import errno
import multiprocessing
import os
import shutil
import signal
import threading

import pytest
import zarr
import zarr.storage._local as local_store

from store.features import DataInfo, FeatureStore, StoreError

V, N, S = 2, 11, 4          # shards of 4, 4, 3
CONFIG = dict(codec="int8", n_visible=5, mask_ratio=0.5, checkpoint_digest="abc", untrained=True, pca_dim=0,
              embed_dim=32, input="source")


def _data():
    return DataInfo(digest="d0", num_samples=N, shards=[[f, min(S, N - f)] for f in range(0, N, S)])


def _root(path):
    return FeatureStore.create_or_open(path, data=_data(), views=V, seed=0)


def _teacher(path):
    return _root(path).create_teacher("mae", CONFIG)


STAGES = {"root": _root, "teacher": _teacher}


def _files(path) -> dict:
    """Every file below ``path``: relative name -> bytes (zarr metadata holds no path or time)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _hook_writes(on_write):
    """Route zarr's every file write through ``on_write(k, write)`` (k counts from 1; zarr
    writes an array's files from several threads)."""
    put, count, lock = local_store._put, [0], threading.Lock()

    def hooked(*args, **kwargs):
        with lock:
            count[0] += 1
            k = count[0]
        return on_write(k, lambda: put(*args, **kwargs))
    local_store._put = hooked
    return count, put


def _writes_of(stage, path) -> int:
    """How many files zarr writes when ``stage`` runs on ``path`` (where the stage before it ran)."""
    count, put = _hook_writes(lambda k, write: write())
    try:
        STAGES[stage](path)
    finally:
        local_store._put = put
    return count[0]


def _killed_after_write(stage, path, k):
    """Forked child: run ``stage`` and SIGKILL itself right after zarr's k-th file write (or
    attempt: zarr's exclusive writes of parent metadata fail when it exists)."""
    def on_write(i, write):
        try:
            return write()
        finally:
            if i == k:
                os.kill(os.getpid(), signal.SIGKILL)
    _hook_writes(on_write)
    STAGES[stage](path)
    os._exit(0)


@pytest.fixture
def reference(tmp_path):
    """The files of a store created without interruption (root and teacher ``mae``)."""
    _teacher(tmp_path / "ref")
    return _files(tmp_path / "ref")


def _prepare(stage, path):
    if stage == "teacher":
        _root(path)


def _points(writes: int) -> list[int]:
    """The writes to interrupt: the first ones, the middle and the last ones (every one costs a
    creation and a rerun)."""
    return sorted({k for k in (1, 2, 3, writes // 2, writes - 1, writes) if 1 <= k <= writes})


@pytest.mark.parametrize("stage", ["root", "teacher"])
def test_a_sigkill_after_any_write_of_the_creation_is_finished_by_the_rerun(tmp_path, reference, stage):
    probe = tmp_path / "probe"
    _prepare(stage, probe)
    writes = _writes_of(stage, probe)
    fork = multiprocessing.get_context("fork")
    for k in _points(writes):
        store = tmp_path / f"store{k}"
        _prepare(stage, store)
        child = fork.Process(target=_killed_after_write, args=(stage, store, k))
        child.start()
        child.join()
        assert child.exitcode == -signal.SIGKILL, (k, child.exitcode)
        _teacher(store)                                       # the rerun
        assert _files(store) == reference, f"killed after write {k} of {writes}"
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["ref", "probe", *(f"store{k}" for k in _points(writes))]), left


@pytest.mark.parametrize("stage", ["root", "teacher"])
def test_a_full_disk_at_any_write_of_the_creation_is_named_and_finished_by_the_rerun(tmp_path, reference, stage):
    probe = tmp_path / "probe"
    _prepare(stage, probe)
    writes = _writes_of(stage, probe)

    for k in _points(writes):
        store = tmp_path / f"store{k}"
        _prepare(stage, store)

        def on_write(i, write, k=k):
            if i == k:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return write()
        _, put = _hook_writes(on_write)
        try:
            with pytest.raises(StoreError) as refusal:
                STAGES[stage](store)
        finally:
            local_store._put = put
        message = str(refusal.value)
        assert "\n" not in message and str(store) in message and "No space left on device" in message, message
        _teacher(store)                                       # the rerun
        assert _files(store) == reference, f"full disk at write {k} of {writes}"
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["ref", "probe", *(f"store{k}" for k in _points(writes))]), left


def test_a_root_and_a_group_half_created_by_an_older_extract_are_named_by_open_and_finished_by_the_rerun(
        tmp_path, reference):
    store = tmp_path / "store"
    zarr.create_group(store=str(store), zarr_format=3)        # the root before its attributes
    with pytest.raises(StoreError, match="creation was interrupted"):
        FeatureStore.open(store)
    _teacher(store)
    assert _files(store) == reference
    for key in ("complete", "tokens", "scale"):               # the group before its last arrays
        shutil.rmtree(store / "mae" / key)
    with pytest.raises(StoreError, match="zarr.json: missing"):
        FeatureStore.open(store).teacher("mae")
    _teacher(store)
    assert _files(store) == reference
