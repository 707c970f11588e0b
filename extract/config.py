"""The extraction job's config, ``ExtractConfig``: every setting of ``extract`` and ``run_extraction``
with its one default (the fast path: ``codec adapter``, ``view_pixels jpeg``, 4 views), a typed
config (docs/CONTRACTS.md "Typed configs") written resolved beside the teacher's group as
``STORE.<teacher>.extract.yaml`` (docs/format.md); ``ExtractJob``: the command's own options.
Importing this module imports click, yaml and no torch."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from core.config import TypedConfig, check_nonneg, check_positive
from core.precision import AMP
from core.options import check_bounds, option
from data.decoders import AUTO, DECODER_HELP, DECODERS, resolve_decoder
from teachers.descriptors import DESCRIPTORS, is_teacher_name

__all__ = ["ExtractConfig", "ExtractJob", "config_path"]


@dataclass
class ExtractConfig(TypedConfig):
    """What one extraction does: the teacher and its weights, the images, the store, the views,
    the codec, the view pixels, and how it runs (device, decoder, batch, statistics sample)."""

    teacher: str = option("", f"Which frozen teacher to run: {', '.join(DESCRIPTORS)}, or timm:NAME for any timm ViT "
                              "(docs/teachers.md).", required=True)
    data: str = option("", "Images packed by `prepare`.", required=True, path="dir")
    store: str = option("", "Feature store (zarr v3) to create or resume.", required=True, path="dir", exists=False)
    checkpoint: str | None = option(None, "The teacher's official checkpoint file; fetched if omitted and the network "
                                          "allows.", path="file")
    mask_ratio: float | None = option(None, "A timm:NAME teacher's mask ratio (default 0.40); the described "
                                            "teachers' are fixed.", min=0, max=1)
    random_init: bool = option(False, "Untrained teacher (tests, demos); the store records that it is untrained.",
                               negatable=False)
    views: int = option(4, "Cached views per image (V).")
    seed: int = option(0, "Root seed of crops and masks.")
    codec: Literal["fp16", "int8", "pca", "adapter"] = option(
        "adapter", "How tokens are stored (docs/format.md); fp16 keeps the full tokens (trainable adapters).")
    pca_dim: int = option(256, "Principal components kept by --codec pca.")
    batch_size: int = option(64, "Images per teacher forward.")
    amp: Literal[AMP] = option("bf16", "The teacher's autocast on CUDA: bf16 (A100/H100), fp16 (V100/T4) or none "
                                       "(fp32); the CPU runs fp32. The store records the precision used.")
    device: str = option("auto", "auto, cpu, cuda (cuda:LOCAL_RANK under torchrun).")
    decoder: str = option(AUTO, DECODER_HELP, choices=DECODERS)
    threads: int = option(2, "Decoder threads.")
    hw_decoder_load: float = option(0.65, "DALI on a GPU: share of the JPEGs for the hardware decoder (A100/H100); "
                                          "DALI's default until bench/gpu_check.py has measured a better one.",
                                    min=0, max=1)
    preallocate_hint: tuple[int, int] = option((0, 0), "DALI on a GPU: preallocate the hardware decoder's buffers "
                                                       "for W x H images (0 0: no hint).", min=0, metavar="W H")
    stats_images: int = option(1024, "Images whose tokens give the adapter statistics (mean, principal components).")
    stats_from: str | None = option(None, "Take the statistics (the coefficient codecs' basis) from this store's "
                                          "teacher: a held-out store read with a training store's adapters.",
                                    path="dir")
    max_blocks: int | None = option(None, "Stop after this many (shard, view-slot) blocks (a partial run; resume "
                                          "later).")
    view_pixels: Literal["none", "jpeg", "raw"] = option(
        "jpeg", "Also store each view's 224 px pixels (JPEG q95 or raw uint8), once per store, so that training never "
                "opens the image shards (docs/format.md).")

    def validate(self):
        if self.teacher and not is_teacher_name(self.teacher):
            raise ValueError(f"config teacher={self.teacher!r} is not one of {list(DESCRIPTORS)} or timm:NAME")
        if self.decoder not in DECODERS:
            raise ValueError(f"config decoder={self.decoder!r} is not one of {list(DECODERS)}")
        check_positive(self, ["views", "pca_dim", "batch_size", "threads", "stats_images"])
        if self.max_blocks is not None:
            check_nonneg(self, ["max_blocks"])
        check_bounds(self)
        return self

    @property
    def decoder_settings(self) -> dict:
        """The hardware decoder's settings (``make_decoder``)."""
        return dict(hw_decoder_load=self.hw_decoder_load, preallocate_width_hint=self.preallocate_hint[0],
                    preallocate_height_hint=self.preallocate_hint[1])

    def resolved(self, *, teacher, data) -> "ExtractConfig":
        """The config as a job runs it: checked (types too), ``store`` given, the teacher, its
        weights and the images those of the built ``teacher`` and the opened ``data`` (a
        ``teacher`` or ``data`` set otherwise is refused), ``auto`` decoder and device resolved."""
        cfg = type(self).from_dict({k: os.fspath(v) if isinstance(v, os.PathLike) else v   # a Path is a path
                                    for k, v in self.to_dict().items()})
        if not cfg.store:
            raise ValueError("config store is required (the feature store to write, --store)")
        if cfg.teacher not in ("", teacher.name):
            raise ValueError(f"config teacher={cfg.teacher} but the teacher given is {teacher.name}")
        if cfg.data and Path(cfg.data).resolve() != Path(data.root).resolve():
            raise ValueError(f"config data={cfg.data} but the images given are {data.root}")
        device = cfg.device
        if device == "auto":
            import torch
            device = "cuda" if torch.cuda.is_available() else "cpu"
        from teachers.descriptors import descriptor
        d = getattr(teacher, "descriptor", None) or descriptor(teacher.name)
        return dataclasses.replace(cfg, teacher=teacher.name, data=str(data.root), random_init=bool(teacher.untrained),
                                   mask_ratio=d.mask_ratio if d.is_timm else None,
                                   checkpoint=None if teacher.untrained else str(teacher.source),
                                   decoder=resolve_decoder(cfg.decoder, device=device), device=device)


def config_path(store, teacher: str) -> Path:
    """Where the resolved config of ``teacher``'s last extraction into ``store`` lies:
    ``STORE.<teacher>.extract.yaml`` beside the store folder (its resolved path), as the
    teacher's writer lock: a file inside the zarr hierarchy is a member that zarr readers
    warn about whenever they list the store's groups."""
    store = Path(store).resolve()
    return store.with_name(f"{store.name}.{teacher}.extract.yaml")


@dataclass
class ExtractJob:
    """The ``extract`` command's options that are not extraction settings."""

    config_file: str | None = option(None, "YAML of extraction settings (keys of extract/config.py); the options "
                                           "given and KEY=VALUE override it.", flag="--config", path="file")
    estimate: bool = option(False, "Measure a short run, print bytes on disk and hours for the whole run, and exit.",
                            negatable=False)
    ranks: int | None = option(None, "With --estimate: ranks to project for (default: this run's world size).")
    overrides: tuple[str, ...] = option((), "Extraction settings: KEY=VALUE.", argument=True,
                                        metavar="[KEY=VALUE]...")
