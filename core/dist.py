"""Process-group helpers for torchrun: rank, world size, barrier, broadcast, all-gather; a no-op in one process."""
from __future__ import annotations

import os

import torch
import torch.distributed as td


def init_from_env(device: str = "cpu") -> None:
    """Join the process group that torchrun describes in the environment (gloo on the CPU,
    NCCL on CUDA); do nothing when not launched by torchrun."""
    if td.is_available() and not td.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        td.init_process_group(backend="nccl" if cuda else "gloo")


def rank() -> int:
    return td.get_rank() if td.is_available() and td.is_initialized() else 0


def world_size() -> int:
    return td.get_world_size() if td.is_available() and td.is_initialized() else 1


def barrier() -> None:
    if world_size() > 1:
        td.barrier()


def broadcast(obj):
    """Rank 0's ``obj`` (picklable) on every rank; ``obj`` itself in one process."""
    if world_size() == 1:
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` in one process."""
    if world_size() == 1:
        return [obj]
    box = [None] * world_size()
    td.all_gather_object(box, obj)
    return box


def local_device(device: str) -> str:
    """'cuda' -> 'cuda:<LOCAL_RANK>' under torchrun; anything else unchanged."""
    if device == "cuda":
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def shutdown() -> None:
    if td.is_available() and td.is_initialized():
        td.destroy_process_group()
