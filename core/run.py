"""The run folder of a long job (training, an evaluation that trains, the demo): config.yaml,
run.json, last.pt (atomic), metrics.jsonl, log.txt (core/log.py), TensorBoard events and the
writer lock run.lock (docs/running.md, section 4). :func:`open_run` starts one or resumes it
(refusing other settings), :func:`load_checkpoint` loads with ``weights_only=True``, and
:class:`StepMetrics` keeps a step's scalars on the device until a logging step."""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import yaml

from core.config import DERIVED, flatten
from core.io import git_commit, git_dirty, remove_temp_files, save_atomic, write_atomic
from core.lock import FileLock, Locked
from core.log import LOG, RunLog, command_line, open_log

__all__ = ["Run", "open_run", "lock_folder", "saved_config", "load_checkpoint", "trim_metrics", "read_metrics",
           "settings_diff", "StepMetrics", "first_non_finite"]

CONFIG, INFO, METRICS, CHECKPOINT, LOCK = "config.yaml", "run.json", "metrics.jsonl", "last.pt", "run.lock"
RESULT = "result.json"        # an evaluation's record inside its run folder (eval writes, export reads)
EVAL_ROOT = Path("runs/eval")  # where evaluations put their run folders by default


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint onto the CPU: ``load_state_dict`` then copies weights and optimizer
    state to where the parameters live, and RNG states must stay CPU byte tensors.

    Loaded with ``weights_only=True`` (tensors, plain containers, numbers and strings: what
    every checkpoint of this code holds); a file that asks for anything else, and so may
    run code, or one that is damaged or cut short, raises one ValueError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:                             # missing or unreadable: it names the file
        raise
    except pickle.UnpicklingError as error:     # the weights-only unpickler's refusal
        reason = _gist(str(error).split("WeightsUnpickler error: ", 1)[-1])
        raise ValueError(f"{path}: not a checkpoint this code can load safely ({reason}); it may run code when "
                         "loaded, so it is refused: use a checkpoint this code wrote") from error
    except Exception as error:                  # a damaged file fails in many ways in the reader
        raise ValueError(f"{path}: not a readable checkpoint ({type(error).__name__}: "
                         f"{_gist(str(error)) or 'no more data'}); it is damaged or cut short: restore it "
                         "from a copy, or start the run again") from error


def _gist(message: str) -> str:
    """The first sentence of an error message (torch's go on with advice over several lines)."""
    lines = message.strip().splitlines()
    return lines[0].split(". ")[0] if lines else ""


def saved_config(folder: str | Path) -> dict | None:
    """The resolved config a run folder records (its config.yaml), or None without one."""
    path = Path(folder) / CONFIG
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else None


def settings_diff(saved: Mapping[str, Any], current: Mapping[str, Any], *,
                  movable: Iterable[str] = ()) -> list[str]:
    """``"key: checkpoint A, now B"`` for every dotted key whose values differ (nested
    mappings are compared key by key; tuples equal lists; ``movable`` keys are skipped)."""
    a, b = flatten(_plain(saved)), flatten(_plain(current))
    keys = [*a, *(k for k in b if k not in a)]
    skip = set(movable)
    return [f"{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}" for k in keys
            if k not in skip and a.get(k) != b.get(k)]


class Run:
    """An open run folder (:func:`open_run` makes one); use as a context manager. Only rank 0
    writes; every rank checks and loads."""

    def __init__(self, path: Path, *, rank: int, state: dict | None, step: int,
                 checkpoint: str = CHECKPOINT, tensorboard: bool = True, lock: FileLock | None = None,
                 log: RunLog | None = None):
        self.path, self.rank, self.state, self.step = path, rank, state, step
        self.checkpoint_path = path / checkpoint
        self._lock, self._log = lock, log
        self._metrics = None
        self._tb = None
        if rank == 0:
            self._metrics = open(path / METRICS, "a")
            self._tb = _tensorboard(path, purge_step=step + 1 if step else None) if tensorboard else None

    @property
    def resumed(self) -> bool:
        return self.state is not None

    def log(self, row: Mapping[str, Any]) -> None:
        """Append ``row`` (it has ``"step"``) to metrics.jsonl, and its numbers to TensorBoard."""
        if self._metrics is None:
            return
        self._metrics.write(json.dumps(dict(row)) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, global_step=int(row["step"]))

    def note(self, message: str) -> None:
        """Write ``message`` (one line) into this run's log.txt alone; rank 0 only."""
        if self._log is not None:
            self._log.write(message)

    def save(self, obj: Any, name: str | None = None) -> Path:
        """Save ``obj`` atomically as the checkpoint (or as ``name`` in the folder); rank 0 only."""
        path = self.checkpoint_path if name is None else self.path / name
        if self.rank == 0:
            save_atomic(obj, path)
        return path

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_run(path: str | Path, *, config: Any, resume: bool, movable: Iterable[str] = (),
             compare: Mapping[str, Any] | None = None, info: Mapping[str, Any] | None = None,
             rank: int = 0, checkpoint: str = CHECKPOINT, step_key: str = "step",
             tensorboard: bool = True) -> Run:
    """Open the run folder ``path`` for a new run, or resume the one it holds.

    ``config``: the resolved config, a TypedConfig (written with its ``to_yaml``) or a
    nested mapping. ``compare``: further values a resume must match (e.g. the total number
    of steps), kept in run.json; ``info``: values run.json records without comparing them.
    ``movable``: dotted config keys that may differ on resume (paths that may move).
    Raises FileExistsError (a checkpoint exists and not ``resume``), FileNotFoundError
    (``resume`` without a checkpoint or a config.yaml), ValueError (the settings differ, or
    the checkpoint cannot be loaded safely) and Locked (another process writes the folder).
    Rank 0 holds the folder's lock and keeps its log.txt open (the command line first; progress
    lines and the command's last line go there too) until the Run is closed. On resume the
    checkpoint is loaded onto the CPU (``Run.state``) and metrics.jsonl is trimmed to its step,
    since the resumed run logs the later steps again.
    """
    path = Path(path)
    ckpt = path / checkpoint
    current = config.to_dict() if hasattr(config, "to_dict") else _plain(config)
    compare = _plain(dict(compare or {}))
    _check_checkpoint(ckpt, resume=resume)              # refused before anything is made
    lock, log = lock_folder(path, rank=rank), None
    try:
        if rank == 0:                                   # the first line even of a refused resume
            log = open_log(path / LOG, start=f"start: {command_line()}")
        _check_checkpoint(ckpt, resume=resume)          # again as the sole writer: another run may have ended
        state, step = None, 0
        if resume:
            saved = saved_config(path)
            if saved is None:
                raise FileNotFoundError(f"--resume: {path} holds no {CONFIG} to compare the settings with")
            saved = {k: v for k, v in saved.items() if k != DERIVED}
            saved_info = json.loads((path / INFO).read_text()) if (path / INFO).is_file() else {}
            diff = settings_diff(saved, current, movable=movable)
            diff += settings_diff({k: saved_info.get(k) for k in compare}, compare)
            if diff:
                raise ValueError(f"cannot resume {ckpt}: it was made with other settings: " + "; ".join(diff))
            state = load_checkpoint(ckpt)
            step = int(state.get(step_key, 0)) if isinstance(state, Mapping) else 0
            if log is not None:
                log.write(f"resumed from {ckpt} at {step_key} {step}")
        if rank == 0:
            text = config.to_yaml() if hasattr(config, "to_yaml") else yaml.safe_dump(current, sort_keys=False)
            write_atomic(path / CONFIG, text)
            record = dict(git_commit=git_commit(), git_dirty=git_dirty(), **_plain(dict(info or {})), **compare)
            write_atomic(path / INFO, json.dumps(record, indent=2) + "\n")
            trim_metrics(path / METRICS, step)
        return Run(path, rank=rank, state=state, step=step, checkpoint=checkpoint, tensorboard=tensorboard,
                   lock=lock, log=log)
    except BaseException:
        if log is not None:
            log.close()
        if lock is not None:
            lock.release()
        raise


def _check_checkpoint(ckpt: Path, *, resume: bool) -> None:
    if resume and not ckpt.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt}")
    if not resume and ckpt.exists():
        raise FileExistsError(f"{ckpt.parent} already holds a run ({ckpt.name}); pass --resume to continue it "
                              "or choose another --out")


def lock_folder(path: str | Path, *, rank: int = 0) -> FileLock | None:
    """Rank 0: make the folder ``path``, take its writer lock (``path/run.lock``, core/lock.py)
    and remove the temporary files of saves that killed writers left in it; returns the lock,
    to release when the writing ends (other ranks get None). Another process holding it
    raises ``Locked`` naming that holder, on every rank (under torchrun, rank 0's answer is
    broadcast: call it on every rank)."""
    path = Path(path)
    lock, refusal = None, None
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        try:
            lock = FileLock(path / LOCK, busy=f"{path}: another process is writing this run folder").acquire()
        except Locked as error:
            refusal = str(error)
        else:
            remove_temp_files(path)
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        box = [refusal]
        torch.distributed.broadcast_object_list(box, src=0)
        refusal = box[0]
    if refusal is not None:
        raise Locked(refusal)
    return lock


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl (a line cut short by a kill is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def trim_metrics(path: str | Path, step: int) -> None:
    """Drop logged rows past ``step`` (a resumed run logs them again), atomically."""
    path = Path(path)
    if path.exists():
        keep = [r for r in read_metrics(path) if r["step"] <= step]
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))


def first_non_finite(first_bad: torch.Tensor, *, world: int) -> int | None:
    """The first step with a non-finite loss over all ranks, or None.

    first_bad: () int64, this rank's first bad step, -1 if none. With several ranks all
    agree (all-reduce MIN) before anyone acts on it, so no rank is left waiting in a
    collective. A host sync: call at logging intervals."""
    never = torch.iinfo(torch.int64).max
    bad = torch.where(first_bad >= 0, first_bad, torch.full_like(first_bad, never))
    if world > 1:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MIN)
    step = int(bad)
    return None if step == never else step


class StepMetrics:
    """Sums of each step's scalar tensors, kept on the device between logging intervals, and the
    first step whose watched value is not finite; it syncs with the host (and all-reduces over
    ranks) only when asked, at logging intervals."""

    def __init__(self, device: str | torch.device, *, watch: str = "loss"):
        self.watch = watch
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.sums: dict[str, torch.Tensor] | None = None
        self.count = 0

    def add(self, step: int, parts: Mapping[str, torch.Tensor]) -> None:
        """Accumulate ``parts`` ({name: () tensor}) of ``step``; notes whether ``parts[watch]``
        is finite. No host sync."""
        det = {k: v.detach().float() for k, v in parts.items()}
        bad = ~torch.isfinite(det[self.watch])
        self.first_bad = torch.where(bad & (self.first_bad < 0), torch.full_like(self.first_bad, step),
                                     self.first_bad)
        self.sums = det if self.sums is None else {k: self.sums[k] + det[k] for k in det}
        self.count += 1

    def first_non_finite(self, world: int = 1) -> int | None:
        """The first step (of any rank) whose watched value was not finite, or None. A host sync."""
        return first_non_finite(self.first_bad, world=world)

    def reduce(self, world: int = 1) -> dict[str, float]:
        """The means since the last call (over steps, and over ranks: an all-reduce), then reset."""
        if self.sums is None:
            return {}
        sums = self.sums
        if world > 1:
            keys = sorted(sums)
            flat = torch.stack([sums[k] for k in keys])
            torch.distributed.all_reduce(flat)
            sums = {k: v / world for k, v in zip(keys, flat)}
        out = {k: float(v) / self.count for k, v in sums.items()}
        self.sums, self.count = None, 0
        return out


def _tensorboard(path: Path, *, purge_step: int | None):
    """A SummaryWriter into ``path`` when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(path), purge_step=purge_step)


def _plain(value: Any) -> Any:
    """YAML/JSON-safe copy: tuples become lists, paths strings, tensors and numpy scalars numbers."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return value.tolist()
    return value
