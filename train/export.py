"""The trained student as a plain timm ViT-Tiny state dict (the loss-curve figure is in train/plots.py)."""
from __future__ import annotations

from pathlib import Path

import torch

from core.io import write_atomic
from core.run import load_checkpoint
from core.state import load_strict


def student_state_dict(student) -> dict[str, torch.Tensor]:
    """timm ``vit_tiny_patch16_224`` keys. The classifier (``head``) was never trained: it is
    written as zeros of the default 1000 classes so that timm's strict pretrained loading
    accepts the file (``pretrained=True`` with the default classes; ``num_classes=0`` or
    any other count drops it). Every ``eval`` protocol (eval/common.py: load_backbone) and
    ``model.checkpoint`` drop the all-zero head when they load the file
    (``core.state.drop_placeholder_head``)."""
    vit = student.vit if hasattr(student, "vit") else student
    sd = {k: v.detach().float().cpu().contiguous() for k, v in vit.state_dict().items()
          if not k.startswith("head")}
    width = sd["cls_token"].shape[-1]
    sd["head.weight"] = torch.zeros(1000, width)
    sd["head.bias"] = torch.zeros(1000)
    return sd


def export_student(student, out) -> Path:
    """Write the student as a timm state dict (safetensors), atomically."""
    from safetensors.torch import save
    data = save(student_state_dict(student), metadata={"format": "pt", "arch": "vit_tiny_patch16_224"})
    return write_atomic(out, data)


def export_run(run_dir, out) -> Path:
    """Rebuild the student from RUN/last.pt and its config, then export it."""
    from train.config import Config
    from train.objective import build_objective
    run_dir = Path(run_dir)
    ck_path = run_dir / "last.pt"
    if not ck_path.exists():
        raise FileNotFoundError(f"{run_dir}: no checkpoint (last.pt) to export")
    ck = load_checkpoint(ck_path)
    cfg = Config.from_dict(ck["meta"]["config"])
    objective = build_objective(cfg, None)
    load_strict(objective.student_side(), ck["model"], what=f"checkpoint {ck_path}")
    return export_student(objective.student, out)
