"""Training noise: torch's global generators (stochastic depth, anything else a step draws), seeded
per rank from (train.seed, rank) and held in every checkpoint, so a resume on as many ranks draws
what the uninterrupted run would; a sweep's learners each swap their own states in around their
step (train/learner.py, Learner). The rules: docs/method.md, ``model.drop_path``."""
from __future__ import annotations

import torch

from core.keys import Role, hash_keys

__all__ = ["rng_state", "restore_rng", "seed_noise", "resume_noise"]


def rng_state(device: str) -> dict:
    """The generators a step may draw from: the CPU one and, on CUDA, the device's own."""
    dev = torch.device(device)
    return dict(torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None)


def restore_rng(state: dict, device: str) -> None:
    """Restore ``rng_state``'s generators; the states are CPU byte tensors (load with
    ``map_location="cpu"``), each set by its own setter on ``device``."""
    torch.set_rng_state(state["torch"].cpu())
    dev, cuda = torch.device(device), state.get("cuda")
    if isinstance(cuda, (list, tuple)):         # older checkpoints: every visible GPU's state
        cuda = cuda[dev.index or 0] if cuda else None
    if dev.type == "cuda" and cuda is not None:
        torch.cuda.set_rng_state(cuda.cpu(), dev)


def seed_noise(seed: int, rank: int, *extra: int) -> None:
    """Seed torch's global generators (CPU and every GPU) from the keyed hash of (seed, rank,
    *extra) (core/keys.py, Role.NOISE)."""
    torch.manual_seed(int(hash_keys(Role.NOISE, seed, rank, *extra)) >> 1)   # 63 bits


def resume_noise(saved, *, seed: int, rank: int, world: int, step: int, device: str) -> None:
    """Continue the noise of a checkpoint: each rank's own saved state when the checkpoint
    holds one per rank of this world size; a single-process state in one process; otherwise
    (another world size, or a checkpoint with rank 0's state only) fresh per-rank noise keyed
    by (seed, rank, step), so that no two ranks draw the same masks."""
    if isinstance(saved, list) and len(saved) == world:
        restore_rng(saved[rank], device)
    elif isinstance(saved, dict) and world == 1:
        restore_rng(saved, device)
    else:
        seed_noise(seed, rank, step)
