"""One writer per teacher group: a second extract of the same store and teacher is refused
in one line naming the holder, also through a symlinked store path; the kernel frees the lock
when the holder is SIGKILLed."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from store.lock import StoreLocked, WriterLock, lock_path

ROOT = Path(__file__).resolve().parents[2]
# The holder: takes the lock with the API extract uses, says so, and waits to be killed.
HOLD = ("import sys, time; from store.lock import WriterLock; WriterLock(sys.argv[1], sys.argv[2]).acquire(); "
        "print('held', flush=True); time.sleep(600)")


def test_a_second_lock_is_refused_naming_the_holder_until_released(tmp_path):
    first = WriterLock(tmp_path / "store", "mae").acquire()
    assert first.path == tmp_path / "store.mae.lock"
    with pytest.raises(StoreLocked, match=f"pid {os.getpid()} on host {socket.gethostname()}"):
        WriterLock(tmp_path / "store", "mae").acquire()
    with WriterLock(tmp_path / "store", "ibot"):          # another teacher of the same store
        pass
    first.release()
    with WriterLock(tmp_path / "store", "mae"):
        pass


def test_a_symlinked_store_path_is_refused_while_the_real_path_is_locked(tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "store")
    with WriterLock(tmp_path / "store", "mae"):
        with pytest.raises(StoreLocked, match=re.escape(f"{tmp_path / 'link'}/mae: another extract is writing it "
                                                        f"(pid {os.getpid()} ")):
            WriterLock(tmp_path / "link", "mae").acquire()
    assert lock_path(tmp_path / "link", "mae") == tmp_path / "store.mae.lock"


def test_run_extraction_holds_the_lock_while_it_writes(monkeypatch, tmp_path):
    import extract.runner as runner
    from extract.config import ExtractConfig

    seen = []

    def probe(cfg, *, teacher, **job):
        with pytest.raises(StoreLocked):
            WriterLock(cfg.store, teacher.name).acquire()
        seen.append(lock_path(cfg.store, teacher.name))
        return {}
    monkeypatch.setattr(runner, "_extract", probe)
    teacher = type("Teacher", (), {"name": "mocov3", "untrained": True, "source": "random-init"})()
    data = type("ImageSet", (), {"root": tmp_path / "data"})()
    runner.run_extraction(ExtractConfig(store=tmp_path / "store", view_pixels="none", device="cpu"), teacher=teacher,
                          data=data)
    assert seen == [tmp_path / "store.mocov3.lock"]
    with WriterLock(tmp_path / "store", "mocov3"):        # released afterwards
        pass


def test_second_extract_is_refused_in_one_line_and_a_rerun_proceeds_after_sigkill(
        prepared_data, teacher_store, tmp_path, tiny_random_init):
    store = tmp_path / "store"
    shutil.copytree(teacher_store, store)
    args = ["extract", "--teacher", "mae", "--data", str(prepared_data), "--store", str(store), "--random-init",
            "--views", "2", "--decoder", "pil", "--device", "cpu", "--batch-size", "4", "--codec", "fp16",
            "--view-pixels", "none"]                                        # the shared store's settings
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(store), "mae"], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        refused = CliRunner().invoke(main, args)
        assert isinstance(refused.exception, SystemExit) and refused.exit_code == 1, refused.output
        lines = refused.output.splitlines()
        assert len(lines) == 1 and "Traceback" not in refused.output, refused.output
        assert lines[0].startswith(f"Error: {store}/mae: another extract is writing it (pid {holder.pid} on host "
                                   f"{socket.gethostname()} since "), lines[0]
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    rerun = CliRunner().invoke(main, args)
    assert rerun.exit_code == 0, rerun.output
    assert "mae: 0 blocks written, 6 already complete" in rerun.output
