"""Durable files and the code's identity: atomic saves with fsync, the git commit.

An atomic save writes a temporary file beside the target, fsyncs it, renames it over
the target and fsyncs the directory, so that a crash (SIGKILL, power loss) leaves
either the old file or the new one, never a partial file under the target's name.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["save_atomic", "write_atomic", "git_commit", "git_dirty", "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parent.parent


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (tmp + fsync + rename + directory fsync)."""
    import torch
    return _atomic(Path(path), lambda f: torch.save(obj, f))


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically, as :func:`save_atomic` does."""
    return _atomic(Path(path), lambda f: f.write(data.encode() if isinstance(data, str) else data))


def _atomic(path: Path, write) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def git_commit(root: str | Path = REPO_ROOT) -> str | None:
    """Commit of the code being run (``HEAD`` of the repository at ``root``), or None outside git."""
    out = _git(root, "rev-parse", "HEAD")
    return out.strip() or None if out is not None else None


def git_dirty(root: str | Path = REPO_ROOT) -> bool | None:
    """Whether tracked files differ from ``HEAD`` (None outside git)."""
    out = _git(root, "status", "--porcelain", "--untracked-files=no")
    return None if out is None else bool(out.strip())


def _git(root, *args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                              check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
