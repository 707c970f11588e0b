"""Frozen ViT teachers (``build_teacher``: a descriptor's timm ViT with official or random weights,
and its build record) and their masked forward on the visible patches only, one output surface
``{"cls": (B, C), "patch": (B, n, C), "index": (B, n)}`` for every teacher (docs/CONTRACTS.md,
"Teachers"; docs/teachers.md). bf16 autocast with fused attention under CUDA, fp32 on the CPU,
unless ``amp`` says otherwise (core/precision.py).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core import precision
from core.io import sha256_file
from core.keys import name_seed
from teachers.checkpoints import (
    TEACHERS,
    fetch_official,
    load_official_state_dict,
    load_timm_state_dict,
    spec_of,
    state_dict_sha256,
    teacher_model_kwargs,
)
from teachers.descriptors import IMAGENET_MEAN, IMAGENET_STD, VIEW_SIZE, descriptor

__all__ = ["TEACHERS", "TIMM_PRETRAINED", "Teacher", "build_teacher", "default_build", "rebuild_teacher"]

# The source of a timm teacher whose weights timm fetched (its pretrained tag), not a file.
TIMM_PRETRAINED = "timm-pretrained"


class Teacher(nn.Module):
    """A frozen, eval-mode ViT teacher with a masked forward.

    Attributes: ``name`` (registry name), ``digest`` (sha256 of the checkpoint file, or
    of the random weights), ``untrained`` (True for ``random_init``), ``source`` (file
    path or ``"random-init"``), ``embed_dim`` (768 for ViT-B, 1024 for ViT-L),
    ``num_patches`` (196), ``img_size`` (its input: 224 or 196 px), ``amp`` (whether the
    forward autocasts; ``amp_dtype``: in which dtype), ``arch`` (timm model name), ``build``
    (its build record, ``default_build``'s form: what rebuilds it), ``vit`` (the timm model).

    Supported: timm's VisionTransformer with an absolute position embedding, over the prefix
    tokens and the patches (timm's default) or over the patches only (``no_embed_class=True``);
    prefix tokens in timm's order: class token, then a distillation token or registers. The CLS
    slot is the class token, or for a ViT without one what its head pools from the tokens it saw
    (teachers/descriptors.py ``TeacherDescriptor``). Refused: no position embedding, a dynamic
    input size.
    """

    def __init__(self, vit: nn.Module, *, name: str, digest: str, untrained: bool,
                 source: str, build: dict, amp: bool | str | None = None):
        super().__init__()
        arch = build["arch"]
        if getattr(vit, "pos_embed", None) is None:
            raise ValueError(f"teacher {name}: {arch} has no position embedding; the masked forward needs one")
        if getattr(vit, "dynamic_img_size", False):
            raise ValueError(f"teacher {name}: dynamic_img_size models are not supported")
        self.descriptor = descriptor(name)
        self.prefix_names = [n for n in ("cls_token", "dist_token", "reg_token") if getattr(vit, n, None) is not None]
        prefix = sum(int(getattr(vit, n).shape[1]) for n in self.prefix_names)
        if prefix != int(getattr(vit, "num_prefix_tokens", prefix)):
            raise ValueError(f"teacher {name}: {arch} has {vit.num_prefix_tokens} prefix tokens, "
                             f"{self.prefix_names} hold {prefix}")
        no_embed_class = bool(getattr(vit, "no_embed_class", False))
        self.vit = vit
        self.name = name
        self.digest = digest
        self.untrained = untrained
        self.source = source
        self.build = build
        self.arch = arch
        self.embed_dim = int(vit.embed_dim)
        self.num_patches = int(vit.patch_embed.num_patches)
        self.img_size = tuple(vit.patch_embed.img_size)
        self.no_embed_class = no_embed_class
        self.class_token = getattr(vit, "cls_token", None) is not None
        # the view arrives ImageNet-normalised: x -> x * scale + shift is its own normalisation
        mean, std = self.descriptor.mean, self.descriptor.std
        self.renormalise = (tuple(mean), tuple(std)) != (IMAGENET_MEAN, IMAGENET_STD)
        scale = torch.tensor(IMAGENET_STD, dtype=torch.float32) / torch.tensor(std, dtype=torch.float32)
        shift = (torch.tensor(IMAGENET_MEAN, dtype=torch.float32) - torch.tensor(mean, dtype=torch.float32)) \
            / torch.tensor(std, dtype=torch.float32)
        self.register_buffer("_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_shift", shift.view(1, 3, 1, 1), persistent=False)
        self._amp = _amp_setting(name, amp)
        for block in vit.blocks:  # scaled-dot-product attention, whatever TIMM_FUSED_ATTN says
            if hasattr(block.attn, "fused_attn"):
                block.attn.fused_attn = True
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "Teacher":
        """Teachers stay in eval mode; ``train()`` is a no-op kept for nn.Module callers."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.vit.pos_embed.device

    @property
    def amp(self) -> bool:
        """Whether the forward autocasts (``amp_dtype``)."""
        return self.amp_dtype is not None

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The forward's autocast dtype: the setting given (at build or ``set_amp``) on any
        device; without one, bfloat16 on CUDA and None (float32) on the CPU."""
        if self._amp is None:
            return torch.bfloat16 if self.device.type == "cuda" else None
        return precision.amp_dtype(self._amp)

    def set_amp(self, amp: bool | str | None) -> "Teacher":
        """Set the forward's precision as the constructor's ``amp`` does; returns the teacher."""
        self._amp = _amp_setting(self.name, amp)
        return self

    @property
    def config(self) -> dict:
        """What identifies this teacher's outputs (for store configs and run records)."""
        return dict(name=self.name, digest=self.digest, untrained=self.untrained,
                    source=self.source, arch=self.arch, embed_dim=self.embed_dim, build=self.build)

    def _check_inputs(self, images: torch.Tensor, visible: torch.Tensor | None) -> None:
        sizes = list(dict.fromkeys([(VIEW_SIZE, VIEW_SIZE), self.img_size]))
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) not in sizes:
            raise ValueError(f"teacher {self.name}: images must be " + " or ".join(
                f"(B, 3, {h}, {w})" for h, w in sizes) + f", got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"teacher {self.name}: images must be a float tensor (normalised), "
                            f"got {images.dtype}")
        if visible is None:
            return
        if visible.ndim != 2 or visible.shape[0] != images.shape[0]:
            raise ValueError(f"teacher {self.name}: visible must be (B, n) with B="
                             f"{images.shape[0]}, got {tuple(visible.shape)}")
        if visible.dtype != torch.int64:
            raise TypeError(f"teacher {self.name}: visible must be int64 patch ids, got {visible.dtype}")
        if visible.device.type == "cpu" and visible.numel():  # checked without a device sync
            if int(visible.min()) < 0 or int(visible.max()) >= self.num_patches:
                raise ValueError(f"teacher {self.name}: visible patch ids must lie in "
                                 f"[0, {self.num_patches}), got [{int(visible.min())}, "
                                 f"{int(visible.max())}]")
            if visible.shape[1] > 1 and not bool((visible[:, 1:] > visible[:, :-1]).all()):
                raise ValueError(f"teacher {self.name}: visible patch ids must be strictly "
                                 f"ascending in every row")

    def _encode(self, images: torch.Tensor, visible: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Shared body of ``forward``/``forward_full``; ``visible=None`` keeps all patches."""
        self._check_inputs(images, visible)
        vit, device = self.vit, self.device
        images = images.to(device, non_blocking=True)
        autocast = precision.autocast(device, self.amp_dtype)     # this setting, whatever encloses the call
        with torch.no_grad():
            if self.renormalise:                                 # its own mean/std (descriptor)
                images = images.float() * self._scale + self._shift
            if tuple(images.shape[2:]) != self.img_size:         # the grid rule's resize (224 -> 196 px)
                images = F.interpolate(images, size=self.img_size, mode="bilinear",
                                       antialias=True, align_corners=False)
            with autocast:
                x = vit.patch_embed(images)                      # (B, N, C)
                batch, _, width = x.shape
                pos = vit.pos_embed                              # (1, N, C) or (1, P + N, C)
                prefix = torch.cat([getattr(vit, n) for n in self.prefix_names], dim=1) if self.prefix_names \
                    else x.new_zeros(1, 0, width)                # (1, P, C): class, dist / register tokens
                if self.no_embed_class:
                    x = x + pos
                else:
                    skip = prefix.shape[1]
                    x, prefix = x + pos[:, skip:], prefix + pos[:, :skip]
                if visible is None:
                    index = torch.arange(self.num_patches, device=device).expand(batch, -1)
                else:
                    index = visible.to(device, non_blocking=True)
                    x = torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, width))  # (B, n, C)
                prefix = prefix.expand(batch, -1, -1)
                x = torch.cat([prefix.to(x.dtype), x], dim=1)    # (B, P + n, C)
                x = vit.norm_pre(x)
                x = vit.blocks(x)
                x = vit.norm(x)
                # the CLS slot: the class token, else the model's own pooling of what it saw
                cls = x[:, 0] if self.class_token else vit.forward_head(x, pre_logits=True)
        skip = prefix.shape[1]
        return {"cls": cls.float(), "patch": x[:, skip:].float(), "index": index}

    def forward(self, images: torch.Tensor, visible: torch.Tensor) -> dict[str, torch.Tensor]:
        """Masked forward on the visible patches plus CLS.

        images: (B, 3, 224, 224) float, ImageNet-normalised (any device; moved to the
            teacher's); resized to the teacher's input if that is smaller (196 px for /14:
            bilinear, antialiased), which may also be given directly.
        visible: (B, n) int64, strictly ascending patch ids in [0, 196) (row-major 14 x 14
            grid). Values are validated when ``visible`` is on the CPU.
        Returns {"cls": (B, C) float32, "patch": (B, n, C) float32 (the final-LayerNorm
            tokens of the visible patches, in the order of ``visible``),
            "index": (B, n) int64 (= ``visible``)}, all on the teacher's device.
        """
        return self._encode(images, visible)

    def forward_full(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unmasked forward (all 196 patches), for benchmarks and reference checks.

        images: as ``forward``'s. Returns {"cls": (B, C), "patch": (B, 196, C),
            "index": (B, 196) int64 = arange(196)}, float32.
        """
        return self._encode(images, None)


def _amp_setting(name: str, amp) -> str | None:
    """A teacher's ``amp`` as it keeps it: None (auto), or one of core.precision.AMP (True is
    "bf16", False "none"); ValueError naming the teacher for anything else."""
    if amp is None or isinstance(amp, bool):
        return None if amp is None else "bf16" if amp else "none"
    if amp not in precision.AMP:
        raise ValueError(f"teacher {name}: amp={amp!r} must be None, a bool or one of {list(precision.AMP)}")
    return amp


def _create(arch: str, model_kwargs: dict | None) -> nn.Module:
    import timm

    return timm.create_model(arch, pretrained=False, num_classes=0, **(model_kwargs or {}))


# std of timm's ViT initialisation (vision_transformer.py init_weights, mode ''): Linear
# weights and pos_embed N(0, 0.02) truncated at +-2 (100 std: the same law as untruncated),
# Linear biases 0, the CLS/register tokens N(0, 1e-6); the rest by its own reset_parameters()
_TOKEN_STD = {"pos_embed": 0.02, "cls_token": 1e-6, "reg_token": 1e-6, "dist_token": 0.02, "latent": 0.02}
_LINEAR_STD = 0.02


def _random_vit(arch: str, model_kwargs: dict | None) -> nn.Module:
    """A ``_create(arch)`` model with timm's initialisation law drawn fast from the global RNG
    (the caller seeds it): the model is built on the meta device, then every Linear weight is
    drawn with ``normal_`` (timm's ``trunc_normal_`` costs an erfinv per value: ~7 s of a ViT-B
    on the CPU), biases zeroed, tokens drawn, and modules with ``reset_parameters`` (the patch
    convolution, LayerNorms) reset. Raises naming any tensor this leaves unset."""
    with torch.device("meta"):
        vit = _create(arch, model_kwargs)
    vit.to_empty(device="cpu")
    unset = {id(t): n for n, t in list(vit.named_parameters()) + list(vit.named_buffers())}
    with torch.no_grad():
        for module in vit.modules():
            own = dict(module.named_parameters(recurse=False))
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, _LINEAR_STD)
                if module.bias is not None:
                    module.bias.zero_()
            elif own and callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
            else:
                for name, tensor in own.items():
                    if name in _TOKEN_STD:
                        tensor.normal_(0.0, _TOKEN_STD[name])
                        unset.pop(id(tensor), None)
                continue
            for tensor in own.values():
                unset.pop(id(tensor), None)
    if unset:
        raise ValueError(f"random_init of {arch}: no initialisation for {sorted(unset.values())[:5]}")
    return vit


def _timm_pretrained(name: str, arch: str, model_kwargs: dict) -> nn.Module:
    """timm's model ``arch`` with the pretrained weights timm fetches (Hugging Face hub or its
    URL; cached by timm); ``CheckpointUnavailableError`` in one line where they cannot be had."""
    import timm

    from teachers.checkpoints import CheckpointUnavailableError
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)         # its retry warnings would print before our one line
    try:
        return timm.create_model(arch, pretrained=True, num_classes=0, **model_kwargs)
    except Exception as error:          # no network, no such tag, a hub error: all say the same to the user
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointUnavailableError(
            f"teacher {name}: timm could not fetch the pretrained weights of {arch} ({type(error).__name__}: "
            f"{first[:200]}); pass a file with --checkpoint, or --random-init for an untrained teacher") from None
    finally:
        hub_log.setLevel(level)


def default_build(name: str, *, arch: str | None = None, model_kwargs: dict | None = None,
                  seed: int | None = None) -> dict:
    """The build record of teacher ``name`` (what a store keeps to rebuild it): {"arch": the timm
    architecture (default: its descriptor's), "model_kwargs": all ``create_model`` got besides
    the name and num_classes=0 (``teacher_model_kwargs``: the descriptor's under the caller's),
    "seed": random init's seed, None for an official file}."""
    return {"arch": arch or descriptor(name).arch, "model_kwargs": teacher_model_kwargs(name, model_kwargs),
            "seed": None if seed is None else int(seed)}


def build_teacher(name: str, *, checkpoint: str | os.PathLike | None = None,
                  random_init: bool = False, seed: int = 0, device: str | torch.device = "cpu",
                  amp: bool | str | None = None, cache_dir: str | os.PathLike | None = None,
                  fetch_timeout_s: float = 5.0, arch: str | None = None,
                  model_kwargs: dict | None = None) -> Teacher:
    """Build teacher ``name`` (a descriptor of teachers/descriptors.py), frozen and in eval mode.

    checkpoint: the official file (any of the layouts in ``teachers/checkpoints.py``).
        Without one, ``CACHE/NAME/FILENAME`` is used, fetched from the official URL if
        absent (``fetch_timeout_s`` bounds the first contact); without network the error
        says which file to download and from where.
    random_init: untrained weights with timm's initialisation law (``_random_vit``) drawn from
        ``core.keys.name_seed(name, seed)`` inside a forked RNG: identical in every process,
        global RNG untouched; ``untrained=True``.
    amp: the forward's autocast (``_amp_setting``): "bf16" (or True), "fp16", "none" (or False);
        None (default): bf16 on CUDA, fp32 on the CPU.
    arch / model_kwargs: the timm architecture (default: the teacher's descriptor's,
        teachers/descriptors.py) and what it is built with: the descriptor's ``model_kwargs`` (its
        input size) under these (tests shrink it, the official checkpoints need the default).
    The teacher's ``build`` records the architecture, the arguments it got and random init's seed
    (``default_build``), so that a store's readers rebuild it (``rebuild_teacher``).
    """
    d = descriptor(name)
    if not d.is_timm:
        spec_of(name)
    build = default_build(name, arch=arch, model_kwargs=model_kwargs, seed=seed if random_init else None)
    arch, built_with = build["arch"], build["model_kwargs"]
    if random_init and checkpoint is not None:
        raise ValueError(f"teacher {name}: give either checkpoint= or random_init=True, not both")
    if random_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(name_seed(name, seed))
            vit = _random_vit(arch, built_with)
        digest = state_dict_sha256(vit.state_dict())
        source, untrained = "random-init", True
    elif d.is_timm and checkpoint in (None, TIMM_PRETRAINED):
        vit = _timm_pretrained(name, arch, built_with)
        digest, source, untrained = state_dict_sha256(vit.state_dict()), TIMM_PRETRAINED, False
    else:
        if checkpoint is None:
            path = fetch_official(name, cache_dir=cache_dir, timeout_s=fetch_timeout_s)
        else:
            path = Path(checkpoint)
        weights = (load_timm_state_dict(name, path, arch=arch, model_kwargs=built_with) if d.is_timm else
                   load_official_state_dict(name, path, arch=arch, model_kwargs=model_kwargs))
        with torch.device("meta"):
            vit = _create(arch, built_with)
        vit.load_state_dict(weights, strict=True, assign=True)
        left = [n for n, t in list(vit.named_parameters()) + list(vit.named_buffers()) if t.is_meta]
        if left:
            raise RuntimeError(f"teacher {name}: {arch} has tensors the checkpoint does not "
                               f"fill: {left[:5]}")
        digest = sha256_file(path)
        source, untrained = str(path), False
    teacher = Teacher(vit, name=name, digest=digest, untrained=untrained, source=source, build=build,
                      amp=amp)
    return teacher.to(device)


def rebuild_teacher(name: str, build: dict, *, checkpoint: str | os.PathLike | None = None,
                    device: str | torch.device = "cpu", amp: bool | str | None = None) -> Teacher:
    """Teacher ``name`` as its build record ``build`` (``default_build``'s form, e.g. a store's)
    says: random init with the record's seed when it has one, else the official file
    ``checkpoint``; both with the record's architecture and model arguments."""
    kwargs = dict(arch=build["arch"], model_kwargs=build["model_kwargs"], device=device, amp=amp)
    if build["seed"] is not None:
        return build_teacher(name, random_init=True, seed=build["seed"], **kwargs)
    return build_teacher(name, checkpoint=checkpoint, **kwargs)
