"""Preemption: SIGTERM or SIGUSR1 (what SLURM sends before it preempts a job or ends its time) set
a flag instead of killing the process; the long job checks it at a point where stopping loses
nothing (``train``: after a step, then a checkpoint; ``extract``: after a block), raises
``Preempted`` with the one line to print, and the command exits with ``PREEMPTED_EXIT``.
docs/running.md, section 4, "Preemption"."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading

from core.errors import ExpectedError

__all__ = ["PREEMPTED_EXIT", "SIGNALS", "Preempted", "PreemptSignals", "requeue_wanted", "requeue_job"]

# The exit status of a preempted command: EX_TEMPFAIL of sysexits.h ("try again later").
PREEMPTED_EXIT = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(ExpectedError, RuntimeError):
    """The job stopped on a signal after saving its work; the message is the line to print (the
    step or block, what was written, how to continue). The command exits with ``exit_code``."""

    exit_code = PREEMPTED_EXIT


class PreemptSignals:
    """The flag that ``SIGNALS`` set while installed (``install``, then ``close``, which puts the
    previous handlers back; or ``with``). Handlers are installed only from the main thread
    (Python's rule); elsewhere the flag never rises and the job runs as before.

    ``agreed()`` (every rank calls it at the same points): whether any rank got a signal, by an
    all-reduce MAX of a CPU integer over gloo (the default group on the CPU; under NCCL a gloo
    group made here, on every rank), so that all ranks stop at the same step and the check never
    waits on the GPU. ``requeue``: after a preemption, ``close`` on rank 0 runs
    ``scontrol requeue $SLURM_JOB_ID`` and adds the outcome to the Preempted line."""

    def __init__(self, *, world: int = 1, rank: int = 0, requeue: bool = False):
        self.world, self.rank, self.requeue = world, rank, requeue
        self.signum = 0                             # the last signal received, 0 for none
        self.preempted: Preempted | None = None     # what ``stop`` raised
        self._previous: dict = {}
        self._group = None                          # the all-reduce's group: None, the default one
        if world > 1:
            import torch.distributed as td          # here: the CLI imports this module for a fast --help
            if td.get_backend() != "gloo":
                self._group = td.new_group(backend="gloo")

    def install(self) -> "PreemptSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __enter__(self) -> "PreemptSignals":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.close()

    def _handle(self, signum, frame) -> None:
        self.signum = int(signum)

    def received(self) -> str | None:
        """This process's signal name (``SIGTERM``), or None; no collective."""
        return signal.Signals(self.signum).name if self.signum else None

    def agreed(self) -> str | None:
        """The signal any rank got (the highest number's name), or None; every rank must call it."""
        if self.world == 1:
            return self.received()
        import torch
        flag = torch.tensor([self.signum], dtype=torch.int64)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._group)
        return signal.Signals(int(flag)).name if int(flag) else None

    def stop(self, message: str) -> Preempted:
        """The Preempted error to raise (``close`` may add the requeue's outcome to its line)."""
        self.preempted = Preempted(message)
        return self.preempted

    def close(self) -> None:
        """Restore the previous handlers; after a preemption with ``requeue``, requeue the job (rank 0)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if self.preempted is not None and self.requeue and self.rank == 0:
            self.preempted.args = (f"{self.preempted.args[0]}; {requeue_job()}",)


def requeue_wanted(flag: bool) -> bool:
    """``--requeue``, or the environment's ``COMAD_REQUEUE=1``."""
    return flag or os.environ.get("COMAD_REQUEUE", "") == "1"


def requeue_job() -> str:
    """Run ``scontrol requeue $SLURM_JOB_ID``; returns what happened, in a few words (it never raises:
    the checkpoint is written, a failed requeue only means resubmitting by hand)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return "not requeued: SLURM_JOB_ID is not set"
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return f"not requeued: scontrol not found (requeue SLURM job {job} by hand)"
    try:
        done = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"not requeued: scontrol requeue {job} failed ({error})"
    if done.returncode:
        reason = (done.stderr or done.stdout).strip().splitlines()
        return f"not requeued: scontrol requeue {job} failed ({reason[0] if reason else f'status {done.returncode}'})"
    return f"SLURM job {job} requeued"
