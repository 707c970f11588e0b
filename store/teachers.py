"""The teachers as data: one descriptor per teacher, the one place its facts are written.

A descriptor holds what every layer must agree on about a teacher: its name, the id that keys
its masks (``store/views.py``: never renumber), its mask ratio, its timm architecture and the
geometry of its tokens (patch size, input resolution, width, grid). The CLI's choices, the
config's known teachers, the mask draws and the store's per-teacher record read it; how a
teacher's official file converts to that architecture lives with the checkpoints
(``extract/checkpoints.py``, one converter per descriptor). Adding a teacher is one entry here
plus its converter and a test.

Every teacher today is a ViT-B/16 at 224 px (768 wide, a 14 x 14 grid, the student's), and
the readers of the grid and the width (``store/views.py``'s masks, the token arrays, the
adapters) still assume it: the registry refuses, at import, a descriptor of another geometry.
"""
from __future__ import annotations

from dataclasses import dataclass


VIT_B_ARCH = "vit_base_patch16_224"


@dataclass(frozen=True)
class TeacherDescriptor:
    """One teacher: name, mask key id, mask ratio, timm architecture and token geometry."""

    name: str
    key_id: int                 # part of its masks' key (store/views.py teacher_visible)
    mask_ratio: float           # fraction of its 196 patches masked per view
    arch: str                   # timm model its official weights convert to
    patch_size: int = 16
    resolution: int = 224
    width: int = 768            # token channels

    @property
    def grid(self) -> int:
        """Patches per side of its input."""
        return self.resolution // self.patch_size


# Mask ratios: the paper's 0.50 / 0.40 / 0.30 for MAE / MoCo v3 / iBOT; dino's is our choice.
DESCRIPTORS: dict[str, TeacherDescriptor] = {d.name: d for d in (
    TeacherDescriptor("mae", key_id=0, mask_ratio=0.50, arch=VIT_B_ARCH),
    TeacherDescriptor("mocov3", key_id=1, mask_ratio=0.40, arch=VIT_B_ARCH),
    TeacherDescriptor("ibot", key_id=2, mask_ratio=0.30, arch=VIT_B_ARCH),
    TeacherDescriptor("dino", key_id=3, mask_ratio=0.40, arch=VIT_B_ARCH),
)}
# CoMAD's three teachers (METHOD.md): the default ensemble of training, the demo and the benches.
PAPER_TEACHERS = ("mae", "mocov3", "ibot")


def descriptor(name: str) -> TeacherDescriptor:
    """The descriptor of ``name``; KeyError naming the known teachers otherwise."""
    try:
        return DESCRIPTORS[name]
    except KeyError:
        raise KeyError(f"unknown teacher {name!r}; known: {', '.join(DESCRIPTORS)}") from None


STUDENT_GEOMETRY = (16, 224, 768)       # (patch size, resolution, width) every reader assumes today


def _check_registry() -> None:
    ids = [d.key_id for d in DESCRIPTORS.values()]
    if len(set(ids)) != len(ids):
        raise ValueError(f"two teachers share a mask key id: {ids}")
    for d in DESCRIPTORS.values():
        if (d.patch_size, d.resolution, d.width) != STUDENT_GEOMETRY:
            raise ValueError(f"teacher {d.name}: patch {d.patch_size}, {d.resolution} px, width {d.width}; "
                             f"only {STUDENT_GEOMETRY} (ViT-B/16 at 224 px) is read by the store and the objective")


_check_registry()
