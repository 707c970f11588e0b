"""The teachers as data: one descriptor per teacher (name, mask key id, mask ratio, timm
architecture, patch size, input resolution, width, prefix tokens, normalisation, weights licence),
the one place its facts are written (docs/teachers.md, "Teachers as data"). Eight are described
here; any timm ViT joins as ``timm:NAME`` with a descriptor read from the model (``timm_descriptor``).
The registry refuses two teachers sharing a key id and a geometry off the student's grid."""
from __future__ import annotations

import functools
import hashlib
from dataclasses import asdict, dataclass, fields, replace

VIT_B_ARCH = "vit_base_patch16_224"
VIT_B_WIDTH = 768             # ViT-B's token channels: what a store from before the width was recorded holds
STUDENT_GRID = 14               # the student's patches per side (ViT-Tiny/16 at 224 px): the shared grid
VIEW_SIZE = 224                 # the views' side in pixels (the student's input)
# ImageNet statistics of RGB in [0, 1]: how the views are normalised (data/decode/pixels.py) and
# the normalisation of every described teacher.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIMM_PREFIX = "timm:"           # a teacher named timm:NAME is timm's model NAME (``timm_descriptor``)
TIMM_MASK_RATIO = 0.40          # a timm teacher's mask ratio unless its extraction sets one
# Weights licences (SPDX ids) of the official releases, from each release's repository.
CC_BY_NC = "CC-BY-NC-4.0"
APACHE = "Apache-2.0"


@dataclass(frozen=True)
class TeacherDescriptor:
    """One teacher: name, mask key id, mask ratio, timm architecture and token geometry.

    The grid rule: every teacher has the student's 14 x 14 grid. A teacher whose patch is not
    16 runs on the same 224 px view resized to ``resolution`` = 14 x patch (196 px for /14, 112
    px for /8), so its patch p covers the image region of the student's patch p; masks, the gate
    and the losses are defined on that one grid.

    Prefix tokens: ``class_token`` (the stored CLS slot), a distillation token (``dist_token``)
    and ``registers`` run in the forward; only the class token is stored. A ViT without one
    (``pool`` "avg" or "map") stores in the CLS slot what its own head pools from the tokens it
    saw (timm's ``forward_head(pre_logits=True)``). ``mean``/``std``: the normalisation its
    weights expect; the teacher renormalises the (ImageNet-normalised) view to it.
    """

    name: str
    key_id: int                 # part of its masks' key (data/views.py teacher_visible)
    mask_ratio: float           # fraction of the grid's patches masked per view
    arch: str                   # timm model its official weights convert to
    patch_size: int = 16
    resolution: int = 224
    width: int = VIT_B_WIDTH    # token channels
    registers: int = 0          # register tokens of its forward (not stored)
    class_token: bool = True    # its CLS slot is the class token; else its head's pooling
    dist_token: bool = False    # a distillation token runs after the class token (not stored)
    pool: str = "token"         # timm's global_pool: "token", "avg" or "map"
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    license: str = "unknown"    # of its weights (SPDX id where there is one)

    @property
    def is_timm(self) -> bool:
        """A teacher read from timm (``timm:NAME``), not one of the described eight."""
        return self.name.startswith(TIMM_PREFIX)

    def record(self) -> dict:
        """What a store keeps of it (JSON values); ``from_record`` reads it back."""
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    @classmethod
    def from_record(cls, record: dict) -> "TeacherDescriptor":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in record.items() if k in known}
        values["mean"], values["std"] = tuple(values["mean"]), tuple(values["std"])
        return cls(**values)

    @property
    def grid(self) -> int:
        """Patches per side of its input."""
        return self.resolution // self.patch_size

    @property
    def model_kwargs(self) -> dict:
        """What timm's ``create_model(arch)`` needs besides the name to take this input."""
        return {"img_size": self.resolution}


# Mask ratios: the paper's 0.50 / 0.40 / 0.30 for MAE / MoCo v3 / iBOT; dino's and DINOv2's are
# our choice (DINOv2 trains with iBOT's masked-token loss, so it takes iBOT's ratio). Licences:
# MAE and MoCo v3 released their weights under CC BY-NC 4.0 (their repositories' LICENSE), DINO,
# iBOT and DINOv2 under Apache 2.0.
DESCRIPTORS: dict[str, TeacherDescriptor] = {d.name: d for d in (
    TeacherDescriptor("mae", key_id=0, mask_ratio=0.50, arch=VIT_B_ARCH, license=CC_BY_NC),
    TeacherDescriptor("mocov3", key_id=1, mask_ratio=0.40, arch=VIT_B_ARCH, license=CC_BY_NC),
    TeacherDescriptor("ibot", key_id=2, mask_ratio=0.30, arch=VIT_B_ARCH, license=APACHE),
    TeacherDescriptor("dino", key_id=3, mask_ratio=0.40, arch=VIT_B_ARCH, license=APACHE),
    TeacherDescriptor("dinov2_b14", key_id=4, mask_ratio=0.30, arch="vit_base_patch14_dinov2",
                      patch_size=14, resolution=196, license=APACHE),
    TeacherDescriptor("dinov2_b14_reg4", key_id=5, mask_ratio=0.30, arch="vit_base_patch14_reg4_dinov2",
                      patch_size=14, resolution=196, registers=4, license=APACHE),
    TeacherDescriptor("dinov2_l14", key_id=6, mask_ratio=0.30, arch="vit_large_patch14_dinov2",
                      patch_size=14, resolution=196, width=1024, license=APACHE),
    TeacherDescriptor("dinov2_l14_reg4", key_id=7, mask_ratio=0.30, arch="vit_large_patch14_reg4_dinov2",
                      patch_size=14, resolution=196, width=1024, registers=4, license=APACHE),
)}
# CoMAD's three teachers (docs/method.md): the default ensemble of training, the demo and the benches.
PAPER_TEACHERS = ("mae", "mocov3", "ibot")


# Weights licences from the most permissive to the most restrictive (lower-case SPDX ids, as the
# Hugging Face hub writes them); a licence not listed counts as the most restrictive.
LICENSE_ORDER = ("mit", "bsd-3-clause", "apache-2.0", "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0",
                 "cc-by-nc-sa-4.0", "cc-by-nc-nd-4.0")


def most_restrictive(licenses) -> str | None:
    """The most restrictive of ``licenses`` (``LICENSE_ORDER``; an unlisted one wins, as "other"
    unless it is the only one); None for none."""
    ids = [str(x).lower() for x in licenses]
    unknown = sorted({x for x in ids if x not in LICENSE_ORDER})
    if unknown:
        return unknown[0] if len(set(ids)) == 1 else "other"
    return max(ids, key=LICENSE_ORDER.index) if ids else None


# timm teachers met in this process (``register``): from an extraction's model or a store's record.
_REGISTERED: dict[str, TeacherDescriptor] = {}


def is_teacher_name(name: str) -> bool:
    """A described teacher's name or ``timm:NAME``."""
    return name in DESCRIPTORS or (name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX))


def descriptor(name: str) -> TeacherDescriptor:
    """The descriptor of ``name``: a described teacher's, a registered timm teacher's, or for an
    unregistered ``timm:NAME`` the one read from timm's model (``timm_descriptor``, not registered:
    an extraction or a store registers the one it uses); KeyError naming the known teachers otherwise."""
    if name in DESCRIPTORS:
        return DESCRIPTORS[name]
    if name in _REGISTERED:
        return _REGISTERED[name]
    if is_teacher_name(name):
        return _derived(name)
    raise KeyError(f"unknown teacher {name!r}; known: {', '.join(DESCRIPTORS)} or timm:NAME (any timm ViT)")


def teacher_order(name: str) -> tuple:
    """Sort key of teachers: the described ones in the table's order, then timm teachers by name."""
    return (0, list(DESCRIPTORS).index(name), "") if name in DESCRIPTORS else (1, 0, name)


def register(d: TeacherDescriptor) -> TeacherDescriptor:
    """Make timm teacher ``d`` known to this process (``descriptor``); ValueError if its name is
    known with other facts (e.g. another mask ratio) or its key id is another teacher's."""
    if not d.is_timm:
        if DESCRIPTORS.get(d.name) != d:
            raise ValueError(f"teacher {d.name}: its record differs from teachers/descriptors.py's")
        return d
    held = _REGISTERED.get(d.name)
    if held is not None and held != d:
        changed = {k: (v, getattr(d, k)) for k, v in asdict(held).items() if getattr(d, k) != v}
        raise ValueError(f"teacher {d.name} is already known in this process with other facts "
                         f"({', '.join(f'{k} {a!r} vs {b!r}' for k, (a, b) in changed.items())}); "
                         "one process uses one descriptor per teacher")
    check_key_ids([*DESCRIPTORS.values(), *(x for x in _REGISTERED.values() if x.name != d.name), d])
    _REGISTERED[d.name] = d
    return d


@functools.lru_cache(maxsize=None)
def _derived(name: str) -> TeacherDescriptor:
    return timm_descriptor(name)


def key_id_of(name: str) -> int:
    """A timm teacher's mask key id: from its name only (stable across machines and versions),
    above the described teachers' ids."""
    return (1 << 20) + int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") % (1 << 30)


def check_key_ids(teachers) -> None:
    """ValueError naming two of ``teachers`` (descriptors) that share a mask key id."""
    seen: dict[int, str] = {}
    for d in teachers:
        if seen.get(d.key_id, d.name) != d.name:
            raise ValueError(f"teachers {seen[d.key_id]} and {d.name} share the mask key id {d.key_id}; "
                             "their masks would be the same draws")
        seen[d.key_id] = d.name


def timm_descriptor(name: str, *, mask_ratio: float | None = None) -> TeacherDescriptor:
    """The descriptor of ``timm:NAME`` read from timm's model NAME (built on the meta device: no
    weights, no download): patch size, width, prefix tokens, pooling, and mean, std and licence
    from its pretrained config. The input is 14 x its patch (the grid rule). ValueError, one line,
    for a model the masked forward cannot run: not a timm VisionTransformer, no absolute position
    embedding, a non-square patch, a dynamic input size."""
    import timm
    import torch
    from timm.models.vision_transformer import VisionTransformer

    arch = name[len(TIMM_PREFIX):]
    try:
        with torch.device("meta"):
            vit = timm.create_model(arch, pretrained=False, num_classes=0)
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"teacher {name}: timm cannot build {arch!r} ({type(error).__name__}: {error})") from None
    why = None
    if not isinstance(vit, VisionTransformer):
        why = f"it is a {type(vit).__name__}, not a timm VisionTransformer"
    elif vit.pos_embed is None:
        why = "it has no absolute position embedding"
    elif getattr(vit, "dynamic_img_size", False):
        why = "it has a dynamic input size"
    elif len(set(vit.patch_embed.patch_size)) != 1:
        why = f"its patch {tuple(vit.patch_embed.patch_size)} is not square"
    if why:
        raise ValueError(f"teacher {name}: the masked forward cannot run {arch}: {why}")
    patch = int(vit.patch_embed.patch_size[0])
    cfg = dict(getattr(vit, "pretrained_cfg", None) or {})
    registers = 0 if getattr(vit, "reg_token", None) is None else int(vit.reg_token.shape[1])
    return TeacherDescriptor(
        name, key_id=key_id_of(name), mask_ratio=TIMM_MASK_RATIO if mask_ratio is None else float(mask_ratio),
        arch=arch, patch_size=patch, resolution=STUDENT_GRID * patch, width=int(vit.embed_dim),
        registers=registers, class_token=vit.cls_token is not None,
        dist_token=getattr(vit, "dist_token", None) is not None, pool=str(vit.global_pool or "token"),
        mean=tuple(float(x) for x in cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(float(x) for x in cfg.get("std", IMAGENET_STD)), license=str(cfg.get("license") or "unknown"))


def with_mask_ratio(d: TeacherDescriptor, mask_ratio: float | None) -> TeacherDescriptor:
    """``d`` with another mask ratio (a timm teacher's extraction choice); the described teachers'
    ratios are fixed (ValueError)."""
    if mask_ratio is None or float(mask_ratio) == d.mask_ratio:
        return d
    if not d.is_timm:
        raise ValueError(f"teacher {d.name}'s mask ratio is {d.mask_ratio} (teachers/descriptors.py); "
                         "--mask-ratio is for timm:NAME teachers")
    if not 0 < float(mask_ratio) < 1:
        raise ValueError(f"--mask-ratio {mask_ratio} must lie in (0, 1)")
    return replace(d, mask_ratio=float(mask_ratio))


def on_shared_grid(patch_size: int, resolution: int) -> bool:
    """The grid rule: a teacher's input of ``resolution`` px in patches of ``patch_size`` is the
    student's 14 x 14 grid."""
    return resolution == STUDENT_GRID * patch_size


def _check_registry() -> None:
    check_key_ids(DESCRIPTORS.values())
    for d in DESCRIPTORS.values():
        if not on_shared_grid(d.patch_size, d.resolution):
            raise ValueError(f"teacher {d.name}: {d.resolution} px with patch {d.patch_size} is not the "
                             f"shared {STUDENT_GRID} x {STUDENT_GRID} grid (resolution = {STUDENT_GRID} x patch)")


_check_registry()
