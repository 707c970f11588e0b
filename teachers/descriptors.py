"""The teachers as data: one descriptor per teacher (name, mask key id, mask ratio, timm
architecture, patch size, input resolution, width, registers), the one place its facts are
written (docs/teachers.md, "Teachers as data"). The registry refuses, at import, two teachers
sharing a key id and a geometry off the student's grid."""
from __future__ import annotations

from dataclasses import dataclass


VIT_B_ARCH = "vit_base_patch16_224"
VIT_B_WIDTH = 768             # ViT-B's token channels: what a store from before the width was recorded holds
STUDENT_GRID = 14               # the student's patches per side (ViT-Tiny/16 at 224 px): the shared grid
VIEW_SIZE = 224                 # the views' side in pixels (the student's input)


@dataclass(frozen=True)
class TeacherDescriptor:
    """One teacher: name, mask key id, mask ratio, timm architecture and token geometry.

    The grid rule: every teacher has the student's 14 x 14 grid. A teacher whose patch is not
    16 runs on the same 224 px view resized to ``resolution`` = 14 x patch (196 px for /14), so
    its patch p covers the image region of the student's patch p; masks, the gate and the
    losses are defined on that one grid. Register tokens run in the forward and are dropped
    from the stored tokens (CLS and patches are kept).
    """

    name: str
    key_id: int                 # part of its masks' key (data/views.py teacher_visible)
    mask_ratio: float           # fraction of the grid's patches masked per view
    arch: str                   # timm model its official weights convert to
    patch_size: int = 16
    resolution: int = 224
    width: int = VIT_B_WIDTH    # token channels
    registers: int = 0          # register tokens of its forward (not stored)

    @property
    def grid(self) -> int:
        """Patches per side of its input."""
        return self.resolution // self.patch_size

    @property
    def model_kwargs(self) -> dict:
        """What timm's ``create_model(arch)`` needs besides the name to take this input."""
        return {"img_size": self.resolution}


# Mask ratios: the paper's 0.50 / 0.40 / 0.30 for MAE / MoCo v3 / iBOT; dino's and DINOv2's are
# our choice (DINOv2 trains with iBOT's masked-token loss, so it takes iBOT's ratio).
DESCRIPTORS: dict[str, TeacherDescriptor] = {d.name: d for d in (
    TeacherDescriptor("mae", key_id=0, mask_ratio=0.50, arch=VIT_B_ARCH),
    TeacherDescriptor("mocov3", key_id=1, mask_ratio=0.40, arch=VIT_B_ARCH),
    TeacherDescriptor("ibot", key_id=2, mask_ratio=0.30, arch=VIT_B_ARCH),
    TeacherDescriptor("dino", key_id=3, mask_ratio=0.40, arch=VIT_B_ARCH),
    TeacherDescriptor("dinov2_b14", key_id=4, mask_ratio=0.30, arch="vit_base_patch14_dinov2",
                      patch_size=14, resolution=196),
    TeacherDescriptor("dinov2_b14_reg4", key_id=5, mask_ratio=0.30, arch="vit_base_patch14_reg4_dinov2",
                      patch_size=14, resolution=196, registers=4),
    TeacherDescriptor("dinov2_l14", key_id=6, mask_ratio=0.30, arch="vit_large_patch14_dinov2",
                      patch_size=14, resolution=196, width=1024),
    TeacherDescriptor("dinov2_l14_reg4", key_id=7, mask_ratio=0.30, arch="vit_large_patch14_reg4_dinov2",
                      patch_size=14, resolution=196, width=1024, registers=4),
)}
# CoMAD's three teachers (docs/method.md): the default ensemble of training, the demo and the benches.
PAPER_TEACHERS = ("mae", "mocov3", "ibot")


def descriptor(name: str) -> TeacherDescriptor:
    """The descriptor of ``name``; KeyError naming the known teachers otherwise."""
    try:
        return DESCRIPTORS[name]
    except KeyError:
        raise KeyError(f"unknown teacher {name!r}; known: {', '.join(DESCRIPTORS)}") from None


def on_shared_grid(patch_size: int, resolution: int) -> bool:
    """The grid rule: a teacher's input of ``resolution`` px in patches of ``patch_size`` is the
    student's 14 x 14 grid."""
    return resolution == STUDENT_GRID * patch_size


def _check_registry() -> None:
    ids = [d.key_id for d in DESCRIPTORS.values()]
    if len(set(ids)) != len(ids):
        raise ValueError(f"two teachers share a mask key id: {ids}")
    for d in DESCRIPTORS.values():
        if not on_shared_grid(d.patch_size, d.resolution):
            raise ValueError(f"teacher {d.name}: {d.resolution} px with patch {d.patch_size} is not the "
                             f"shared {STUDENT_GRID} x {STUDENT_GRID} grid (resolution = {STUDENT_GRID} x patch)")


_check_registry()
