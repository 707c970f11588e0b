"""The teacher of an extraction: built with its descriptor registered (``build_extraction_teacher``)
and the record a store keeps of it (``teacher_config``)."""
from __future__ import annotations

from data import views as V
from extract.config import ExtractConfig
from store import codecs
from store.teacherstore import stored_build
from teachers.descriptors import descriptor, register, with_mask_ratio


def build_extraction_teacher(cfg: ExtractConfig, *, device):
    """The teacher ``cfg`` names, built on ``device``: a timm teacher's descriptor (with
    ``cfg.mask_ratio``) registered first (teachers/descriptors.py ``register``), so that its masks
    and store record carry that ratio."""
    from teachers.vit import build_teacher
    register(with_mask_ratio(descriptor(cfg.teacher), cfg.mask_ratio))
    return build_teacher(cfg.teacher, checkpoint=cfg.checkpoint, random_init=cfg.random_init, seed=cfg.seed,
                         device=device)


def teacher_config(teacher, *, codec: str, pca_dim: int, precision: str, input: str = "source") -> dict:
    """What identifies a teacher's tokens: stored in the store and checked on reopening.
    ``input``: the pixels the teacher runs on (store/features.py TEACHER_INPUTS); ``build``: what
    a reader rebuilds it from (``stored_build``)."""
    d = getattr(teacher, "descriptor", None) or descriptor(teacher.name)
    return dict(teacher=teacher.name, source=str(teacher.source), checkpoint_digest=teacher.digest,
                untrained=bool(teacher.untrained), mask_ratio=d.mask_ratio, n_visible=V.num_visible(d.mask_ratio),
                resolution=d.resolution, patch_size=d.patch_size, embed_dim=int(teacher.embed_dim), codec=codec,
                pca_dim=codecs.stored_dim(codec, pca_dim), precision=precision, input=input,
                build=stored_build(teacher.name, teacher.build), descriptor=d.record())
