"""Durable files and the code's identity: atomic saves (``NAME.tmp<pid>`` beside the target,
fsync, rename, directory fsync: a crash leaves the old file or the new one), fsync of files and
trees, file digests, the git commit. A failed save (a full disk) raises an OSError naming the
target and leaves its old version; a killed writer's temporary files are removed by the folder's
next sole writer (:func:`remove_temp_files`)."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import google_crc32c

__all__ = ["save_atomic", "write_atomic", "sha256_file", "file_digests", "remove_temp_files", "fsync_path", "fsync_tree", "git_commit", "git_dirty",
           "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parent.parent
_TEMP = re.compile(r".+\.tmp\d+")         # _atomic's temporary names, NAME.tmp<pid>


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (tmp + fsync + rename + directory fsync)."""
    import torch
    return _atomic(Path(path), lambda f: torch.save(obj, f))


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically, as :func:`save_atomic` does."""
    return _atomic(Path(path), lambda f: f.write(data.encode() if isinstance(data, str) else data))


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (streamed)."""
    return _digests(Path(path), crc32c=False)[0]


def file_digests(path: str | Path) -> tuple[str, int]:
    """(sha256 hex digest, crc32c) of the file at ``path``, read once."""
    return _digests(Path(path), crc32c=True)


def _digests(path: Path, *, crc32c: bool) -> tuple[str, int | None]:
    digest, crc = hashlib.sha256(), 0 if crc32c else None
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
            if crc32c:
                crc = google_crc32c.extend(crc, block)
    return digest.hexdigest(), crc


def remove_temp_files(folder: str | Path) -> list[Path]:
    """Remove the temporary files of atomic saves in ``folder`` (not below it); returns them.
    Only for the folder's sole writer (it holds the folder's lock): any such file is then
    the litter of a writer that was killed mid-save."""
    folder = Path(folder)
    litter = sorted(p for p in folder.iterdir() if _TEMP.fullmatch(p.name) and p.is_file()) if folder.is_dir() else []
    for path in litter:
        path.unlink(missing_ok=True)
    return litter


class _Writes:
    """The temporary file, keeping the OSError of a failed write: torch.save reports one as
    an unrelated RuntimeError."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.f.flush()


def _atomic(path: Path, write) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            out = _Writes(f)
            try:
                write(out)
            except Exception as error:
                if out.error is None:
                    raise
                raise out.error from error
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise _not_written(path, error) from error
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _not_written(path: Path, error: OSError) -> OSError:
    """One line naming the file (a failed write or fsync names none), with the errno."""
    message = f"cannot write {path}: {error.strerror or error}; the file is left as it was"
    return OSError(error.errno, message) if error.errno else OSError(message)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened or synced)."""
    try:
        fsync_path(folder)
    except OSError:
        pass


def fsync_path(path: str | Path) -> None:
    """fsync one file or directory (its data, or a rename or creation in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """fsync ``path`` (a file) or every file below it and their folders (a chunk, a group)."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in [*files, *{p.parent for p in files}]:
        fsync_path(p)


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
