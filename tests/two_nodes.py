"""Two torchrun node launchers on this machine, one rank each, joined by a c10d rendezvous on a
free local port: the multi-node path of scripts/train_multinode.sbatch (docs/running.md, "SLURM")
without a cluster. Used by the tests that compare two ranks with one process."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the rendezvous binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_launcher(port: int, run_id: str) -> list[str]:
    """One node's ``torchrun`` of a two-node job (c10d numbers the nodes as they join)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", run_id]


def run_two_nodes(args: list[str], *, logs: Path, cwd=None, env=None, timeout: float = 600) -> list[tuple[int, str]]:
    """Start two node launchers of ``torchrun ... ARGS`` and wait for both; their output goes to
    ``logs/node-<i>.log``. Returns each launcher's (exit status, output). A launcher that fails
    gets the other killed at once (it would otherwise wait out the rendezvous), and neither
    outlives the call: each runs in its own session, killed whole (its ranks too) on a failure or
    after ``timeout`` seconds."""
    logs.mkdir(parents=True, exist_ok=True)
    port, run_id = free_port(), f"two-nodes-{os.getpid()}-{time.monotonic_ns()}"
    paths, procs = [logs / f"node-{i}.log" for i in range(2)], []
    try:
        for path in paths:
            with open(path, "w") as out:            # the launcher writes to its own copy of the file
                procs.append(subprocess.Popen([*node_launcher(port, run_id), *map(str, args)], cwd=cwd, env=env,
                                              stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() != 0:                   # running, or failed with its ranks maybe still running
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait()
    return [(p.returncode, path.read_text()) for p, path in zip(procs, paths)]
