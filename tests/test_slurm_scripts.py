"""The SLURM scripts (scripts/*.sbatch) run by bash under a faked job: SLURM_* variables set, and
stubs of `srun` and `scontrol` first in PATH and of the interpreter (PYTHON) that record what
they were given. What they record is parsed by the real launchers: torchrun's own argument
parser, then the CLI's click commands, so a flag that torchrun or `cli.py` lacks fails here.
Nothing trains (the multi-node path itself: tests/two_nodes.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from cli import main

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"

# Every stub appends {"prog", "argv", "pid", "node", "cache"} to $CALLS. `srun` runs its command once
# per node of the job with SLURM_NODEID set, as srun --ntasks-per-node 1 does; `scontrol show
# hostnames` prints $FAKE_HOSTS one a line.
_STUB = f"""#!{sys.executable}
import json, os, subprocess, sys
prog, argv = os.path.basename(sys.argv[0]), sys.argv[1:]
with open(os.environ["CALLS"], "a") as calls:
    calls.write(json.dumps(dict(prog=prog, argv=argv, pid=os.getpid(), node=os.environ.get("SLURM_NODEID"),
                                cache=os.environ.get("COMAD_CACHE"))) + "\\n")
if prog == "scontrol" and argv[:2] == ["show", "hostnames"]:
    print("\\n".join(os.environ["FAKE_HOSTS"].split()))
if prog == "srun":
    valued = {{"--nodes", "-N", "--ntasks", "-n", "--ntasks-per-node"}}
    i = 0
    while argv[i].startswith("-"):
        i += 2 if argv[i] in valued else 1
    codes = [subprocess.call(argv[i:], env={{**os.environ, "SLURM_NODEID": str(node)}})
             for node in range(int(os.environ["SLURM_NNODES"]))]
    sys.exit(max(codes))
"""


@pytest.fixture
def job(tmp_path):
    """``job(script, *args, **env)``: run ``bash scripts/SCRIPT ARGS`` in a faked SLURM job; returns
    (the finished bash process: pid, returncode, stderr; the stubs' calls). DATA and STORE are
    empty folders, RUN a folder to be."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("srun", "scontrol", "python"):
        (bin_dir / name).write_text(_STUB)
        (bin_dir / name).chmod(0o755)
    for name in ("data", "store"):
        (tmp_path / name).mkdir()
    calls = tmp_path / "calls.jsonl"

    def run(script, *args, **env):
        calls.write_text("")
        base = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "CALLS": str(calls),
                "PYTHON": str(bin_dir / "python"), "DATA": str(tmp_path / "data"), "STORE": str(tmp_path / "store"),
                "RUN": str(tmp_path / "run"), "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "4"}
        with subprocess.Popen(["bash", str(SCRIPTS / script), *args], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**base, **env}) as proc:
            _, stderr = proc.communicate(timeout=60)
        done = SimpleNamespace(pid=proc.pid, returncode=proc.returncode, stderr=stderr)     # pid: the batch shell's
        return done, [json.loads(line) for line in calls.read_text().splitlines()]
    return run


def _sbatch(script) -> dict:
    """The script's ``#SBATCH --key=value`` header as {key: value} (a flag: True)."""
    header = {}
    for line in (SCRIPTS / script).read_text().splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            header[key] = value or True
    return header


def _torchrun(call) -> tuple:
    """(torchrun's parsed options, the click context of the `cli.py` command) of a recorded
    ``PYTHON -m torch.distributed.run ... cli.py ARGS``; a flag either lacks raises."""
    from torch.distributed.run import get_args_parser

    assert call["argv"][:2] == ["-m", "torch.distributed.run"], call
    launch = get_args_parser().parse_args(call["argv"][2:])
    assert launch.training_script == "cli.py"
    group = main.make_context("cli.py", list(launch.training_script_args))
    name, command, rest = main.resolve_command(group, group._protected_args + group.args)
    return launch, command.make_context(name, rest, parent=group)


def test_the_one_node_script_execs_torchrun_of_an_auto_resumed_requeued_train_on_the_nodes_gpus(job, tmp_path):
    proc, calls = job("train_1node.sbatch", "train.wandb=true")
    assert proc.returncode == 0, proc.stderr
    [call] = calls
    launch, train = _torchrun(call)
    assert launch.standalone and launch.nproc_per_node == "4"          # SLURM_GPUS_ON_NODE
    assert train.info_name == "train" and train.params["auto_resume"] and train.params["requeue"]
    assert (train.params["data"], train.params["store_path"], train.params["out_dir"]) == tuple(
        str(tmp_path / n) for n in ("data", "store", "run"))
    assert train.params["overrides"] == ("train.wandb=true",)
    # the batch shell became torchrun, so the batch shell's early SIGTERM reaches torchrun, which
    # passes it on to its ranks
    assert call["pid"] == proc.pid
    header = _sbatch("train_1node.sbatch")
    assert (header["signal"], header["nodes"], header["output"], header["requeue"]) == (
        "B:TERM@120", "1", "%x-%j.out", True)

    proc, [call] = job("train_1node.sbatch", NPROC="2", REQUEUE="0")
    launch, train = _torchrun(call)
    assert launch.nproc_per_node == "2" and not train.params["requeue"] and train.params["auto_resume"]


def test_the_multinode_script_starts_one_torchrun_per_node_meeting_on_the_first_host(job):
    proc, calls = job("train_multinode.sbatch", SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu-[07-08]",
                      FAKE_HOSTS="gpu-07 gpu-08", SLURM_GPUS_ON_NODE="8", SLURM_CPUS_PER_TASK="16", PORT="29611")
    assert proc.returncode == 0, proc.stderr
    assert [c["prog"] for c in calls] == ["scontrol", "srun", "python", "python"]
    assert calls[0]["argv"] == ["show", "hostnames", "gpu-[07-08]"]
    srun = calls[1]["argv"]
    assert srun[srun.index("--nodes") + 1] == "2" and srun[srun.index("--ntasks-per-node") + 1] == "1"
    assert "--cpus-per-task=16" in srun        # the job's CPUs per node, which srun does not inherit
    nodes = calls[2:]
    assert [c["node"] for c in nodes] == ["0", "1"] and nodes[0]["argv"] == nodes[1]["argv"]
    launch, train = _torchrun(nodes[0])
    assert (launch.nnodes, launch.nproc_per_node, launch.rdzv_backend, launch.rdzv_endpoint, launch.rdzv_id) == (
        "2", "8", "c10d", "gpu-07:29611", "4242")
    assert not launch.standalone
    assert train.info_name == "train" and train.params["auto_resume"] and train.params["requeue"]
    # srun's job step gets the early SIGTERM (not the batch shell, which only waits on srun)
    header = _sbatch("train_multinode.sbatch")
    assert (header["signal"], header["ntasks-per-node"], header["output"]) == ("TERM@120", "1", "%x-%j.out")


def test_the_extraction_array_runs_one_teacher_per_task_the_first_writing_the_view_pixels(job, tmp_path):
    store = tmp_path / "store"
    # a later task waits for the first to create the store's JPEG views; here it is given 0 s
    proc, calls = job("extract_array.sbatch", SLURM_ARRAY_TASK_ID="1", PIXELS_WAIT="0")
    assert proc.returncode == 2 and calls == []
    assert proc.stderr.strip() == f"Error: {store}/pixels not created by task 0 (mae) within 0 s"

    seen = []
    for task in range(3):
        if task == 1:
            (store / "pixels").mkdir()
            (store / "pixels" / "zarr.json").write_text("{}")        # what task 0 creates
        proc, [call] = job("extract_array.sbatch", "--views", "4", SLURM_ARRAY_TASK_ID=str(task))
        assert proc.returncode == 0, proc.stderr
        launch, extract = _torchrun(call)
        assert launch.standalone and launch.nproc_per_node == "4" and call["pid"] == proc.pid
        assert extract.info_name == "extract" and extract.params["views"] == 4
        assert call["cache"] == str(tmp_path / ".cache" / "comad")                # COMAD_CACHE: the weights
        seen.append((extract.params["teacher"], extract.params["view_pixels"], extract.params["store"]))
    assert seen == [("mae", "jpeg", str(store)), ("mocov3", "none", str(store)), ("ibot", "none", str(store))]

    # without JPEG views nothing waits; a task past the teachers stops naming them
    proc, [call] = job("extract_array.sbatch", SLURM_ARRAY_TASK_ID="1", VIEW_PIXELS="raw", STORE=str(tmp_path / "s2"),
                       PIXELS_WAIT="0")
    assert _torchrun(call)[1].params["view_pixels"] == "none"
    proc, calls = job("extract_array.sbatch", SLURM_ARRAY_TASK_ID="3")
    assert proc.returncode == 2 and calls == []
    assert proc.stderr.strip() == "Error: array task 3 but TEACHERS has 3: mae mocov3 ibot"
    header = _sbatch("extract_array.sbatch")
    assert (header["array"], header["signal"], header["output"]) == ("0-2", "B:TERM@120", "%x-%A_%a.out")
