"""The official teacher checkpoints: where they come from (cache, download), how they are read
safely (``torch.load(weights_only=True)``, ``argparse.Namespace`` allowed), and how each file's
layout converts to its descriptor's timm architecture, keeping exactly the backbone
(docs/teachers.md, "Key layouts and conversion")."""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import pickle
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from core.errors import ExpectedError
from teachers.descriptors import VIT_B_ARCH, descriptor


class CheckpointError(ExpectedError, ValueError):
    """A checkpoint file that cannot be read safely or is not the expected kind."""


class CheckpointUnavailableError(ExpectedError, FileNotFoundError):
    """No checkpoint given, none in the cache, and the official file could not be fetched."""


@dataclass(frozen=True)
class TeacherSpec:
    """One official teacher release and the rules that convert its key layout.

    containers: entries of the loaded file that may hold the weights, tried in order;
        ``None`` means the file itself is a plain state dict.
    keep_prefix: if set, only keys under this prefix are backbone weights (it is
        stripped); other keys must match ``drop`` or they are unexpected.
    strip_prefixes: prefixes removed (in order, each at most once) from every key.
    drop: key prefixes (matched after stripping) that the format is known to carry
        besides the backbone; they are removed.
    transform: the steps besides renames (DINOv2: tokens moved, ``pos_embed`` resampled):
        (renamed weights, the target's patch grid (h, w)) -> weights; ``None``: renames only.
    """

    name: str
    filename: str
    url: str
    paper: str
    containers: tuple[str | None, ...]
    keep_prefix: str | None = None
    strip_prefixes: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()
    transform: Callable[[dict, tuple[int, int]], dict] | None = None

    def convert(self, obj: Any, grid: tuple[int, int] | None = None) -> tuple[dict, str]:
        """The converter: a loaded file -> (weights under timm names, where they were
        found). ``grid``: the target architecture's patch grid (default: the descriptor's).
        Not yet checked against an architecture (``load_official_state_dict`` does that)."""
        weights, where = _unwrap(self, obj)
        converted = convert_keys(self, weights)[0]
        if self.transform is not None:
            side = descriptor(self.name).grid
            converted = self.transform(converted, tuple(grid) if grid is not None else (side, side))
        return converted, where


def _dinov2(weights: dict, grid: tuple[int, int], *, registers: bool) -> dict:
    """DINOv2's steps besides renames (docs/teachers.md, "Key layouts and conversion"): for a reg4 file the registers and the
    CLS go to timm's ``no_embed_class`` layout, then ``pos_embed`` is resampled to ``grid``
    (bicubic, antialiased). What it cannot read (a key missing, a ``pos_embed`` that is not a
    square grid) is left as it is, for the strict check to name."""
    from timm.layers import resample_abs_pos_embed

    out = dict(weights)
    pos = out.get("pos_embed")
    if not isinstance(pos, torch.Tensor) or pos.ndim != 3:
        return out
    if registers:                   # official: CLS gets pos[:, 0], registers get none
        if "register_tokens" in out:
            out["reg_token"] = out.pop("register_tokens")
        cls = out.get("cls_token")
        if isinstance(cls, torch.Tensor) and cls.shape[-1] == pos.shape[-1]:
            out["cls_token"] = cls + pos[:, :1]
        pos = pos[:, 1:]
    prefix = 0 if registers else 1
    side = math.isqrt(max(pos.shape[1] - prefix, 0))
    if side and side * side == pos.shape[1] - prefix:
        pos = resample_abs_pos_embed(pos, new_size=list(grid), old_size=[side, side],
                                     num_prefix_tokens=prefix, interpolation="bicubic", antialias=True)
    out["pos_embed"] = pos
    return out


def _dinov2_spec(name: str, size: str, registers: bool) -> TeacherSpec:
    """A DINOv2 release: ``size`` "b" or "l" (ViT-B/14, ViT-L/14), with or without 4 registers."""
    stem = f"dinov2_vit{size}14"
    filename = f"{stem}{'_reg4' if registers else ''}_pretrain.pth"
    paper = "Oquab et al., DINOv2: Learning Robust Visual Features without Supervision (2023)"
    if registers:
        paper += "; Darcet et al., Vision Transformers Need Registers (2023)"
    return TeacherSpec(name=name, filename=filename, url=f"https://dl.fbaipublicfiles.com/dinov2/{stem}/{filename}",
                       paper=paper, containers=(None,), drop=("mask_token",),
                       transform=partial(_dinov2, registers=registers))


TEACHERS: dict[str, TeacherSpec] = {
    "mae": TeacherSpec(
        name="mae",
        filename="mae_pretrain_vit_base.pth",
        url="https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth",
        paper="He et al., Masked Autoencoders Are Scalable Vision Learners (2021)",
        containers=("model",),
        drop=("mask_token", "decoder_"),
    ),
    "mocov3": TeacherSpec(
        name="mocov3",
        filename="vit-b-300ep.pth.tar",
        url="https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar",
        paper="Chen, Xie, He, An Empirical Study of Training Self-Supervised ViTs (2021)",
        containers=("state_dict",),
        keep_prefix="module.base_encoder.",
        drop=("head.", "module.momentum_encoder.", "module.predictor."),
    ),
    "ibot": TeacherSpec(
        name="ibot",
        filename="checkpoint_teacher.pth",
        url=("https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/"
             "ibot/vitb_16/checkpoint_teacher.pth"),
        paper="Zhou et al., iBOT: Image BERT Pre-Training with Online Tokenizer (2021)",
        containers=("state_dict", "teacher", None),
        strip_prefixes=("module.", "backbone."),
        drop=("head.", "masked_embed"),
    ),
    "dino": TeacherSpec(
        name="dino",
        filename="dino_vitbase16_pretrain.pth",
        url=("https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/"
             "dino_vitbase16_pretrain.pth"),
        paper="Caron et al., Emerging Properties in Self-Supervised ViTs (2021)",
        containers=("teacher", None),
        strip_prefixes=("module.", "backbone."),
        drop=("head.",),
    ),
    "dinov2_b14": _dinov2_spec("dinov2_b14", "b", registers=False),
    "dinov2_b14_reg4": _dinov2_spec("dinov2_b14_reg4", "b", registers=True),
    "dinov2_l14": _dinov2_spec("dinov2_l14", "l", registers=False),
    "dinov2_l14_reg4": _dinov2_spec("dinov2_l14_reg4", "l", registers=True),
}

# A timm teacher's file (``--checkpoint`` of ``timm:NAME``): a timm state dict, plain or under
# "state_dict"/"model", maybe from DDP ("module."); classifier heads are dropped (teachers are
# built with num_classes=0). timm's own checkpoint filter then maps other layouts (OpenAI CLIP,
# big_vision) and resamples the position embedding to the teacher's grid.
TIMM_FILE = TeacherSpec(name="timm", filename="", url="", paper="", containers=("state_dict", "model", None),
                        strip_prefixes=("module.",), drop=("head.", "head_dist."))

# Globals a weights-only load may construct besides tensors and containers.
SAFE_GLOBALS = (argparse.Namespace,)


def spec_of(name: str) -> TeacherSpec:
    """The registry entry of teacher ``name``; a clear error for an unknown name."""
    if name not in TEACHERS:
        raise KeyError(f"unknown teacher {name!r}; known teachers: {', '.join(TEACHERS)}")
    return TEACHERS[name]


def safe_load(path: str | os.PathLike) -> Any:
    """Load a checkpoint with ``torch.load(weights_only=True)`` onto the CPU.

    Only tensors, plain containers and ``argparse.Namespace`` may be constructed; the
    allow-list is scoped to this call. Anything else (a class, a function, a
    ``__reduce__`` that runs code) is refused with ``CheckpointError`` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"refusing to load {path}: it is not a weights-only checkpoint (it asks to "
            f"construct objects other than tensors, containers and argparse.Namespace). "
            f"Loader said: {first}") from None
    except Exception as err:        # a damaged or foreign file fails in many ways in the unpickler
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _unwrap(spec: TeacherSpec, obj: Any) -> tuple[dict, str]:
    """The weights dict inside a loaded file and a description of where it was found.

    If none of the format's containers is present, the file's top level is returned as
    is, so that the strict key check names what the file holds instead.
    """
    if not isinstance(obj, dict):
        return {f"<{type(obj).__name__}>": obj}, "the file's top level"
    for container in spec.containers:
        if container is None:
            if _is_state_dict(obj):
                return obj, "the file's top level"
        elif container in obj and isinstance(obj[container], dict):
            return obj[container], f"entry {container!r}"
    wanted = " or ".join("a plain state dict" if c is None else repr(c) for c in spec.containers)
    return obj, f"the file's top level, which has no {wanted} (it holds: {_few(list(map(str, obj)))})"


def convert_keys(spec: TeacherSpec, weights: dict) -> tuple[dict, list[str]]:
    """Apply ``spec``'s key rules to a weights dict.

    Returns (converted, dropped): the backbone weights under timm names and the original
    names of the keys dropped as known non-backbone parts. Keys that are neither kept
    nor known extras are passed through unchanged so that the strict check reports them.
    """
    out: dict[str, Any] = {}
    dropped: list[str] = []
    for key, value in weights.items():
        new = key
        if spec.keep_prefix is not None:
            if new.startswith(spec.keep_prefix):
                new = new[len(spec.keep_prefix):]
            elif new.startswith(spec.drop):
                dropped.append(key)
                continue
            else:
                out[new] = value  # unexpected: reported by the strict check
                continue
        for prefix in spec.strip_prefixes:
            if new.startswith(prefix):
                new = new[len(prefix):]
        if new.startswith(spec.drop):
            dropped.append(key)
            continue
        out[new] = value
    return out, dropped


def _few(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return f"{shown}, ..." if len(keys) > n else shown


def check_keys(converted: dict, expected: dict[str, torch.Size], *, what: str,
               path: Path | str, where: str) -> None:
    """Raise ``CheckpointError`` unless ``converted`` has exactly the expected keys and shapes.

    expected: timm name -> parameter shape of the target architecture.
    The message names the file, a few missing and unexpected keys, and their counts.
    """
    missing = [k for k in expected if k not in converted]
    unexpected = [k for k in converted if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{path} is not a {what} checkpoint (weights read from {where}): "
            f"{len(missing)} missing keys ({_few(missing) or 'none'}); "
            f"{len(unexpected)} unexpected keys ({_few(unexpected) or 'none'})")
    def found(value: Any) -> str:
        return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__

    bad = [f"{k}: file {found(converted[k])} vs model {tuple(shape)}"
           for k, shape in expected.items()
           if not isinstance(converted[k], torch.Tensor) or converted[k].shape != shape]
    if bad:
        raise CheckpointError(
            f"{path} does not match the {what} architecture: {len(bad)} keys with other "
            f"shapes ({_few(bad, 3)})")


def teacher_model_kwargs(name: str, model_kwargs: dict | None = None) -> dict:
    """What teacher ``name``'s architecture is built with: its descriptor's ``model_kwargs``
    (the input size of the grid rule) under the caller's (the caller wins: tests shrink depth)."""
    return {**descriptor(name).model_kwargs, **(model_kwargs or {})}


def _meta_model(arch: str, model_kwargs: dict | None):
    import timm

    with torch.device("meta"):      # no memory, no random numbers
        return timm.create_model(arch, pretrained=False, num_classes=0, **(model_kwargs or {}))


def expected_keys(arch: str | None = None, model_kwargs: dict | None = None, *,
                  name: str | None = None) -> dict[str, torch.Size]:
    """timm name -> shape of every state-dict entry of ``arch`` (num_classes=0), built on
    the meta device. With ``name``: teacher ``name``'s architecture (``arch`` defaults to its
    descriptor's, ``model_kwargs`` merged as ``teacher_model_kwargs``); without: ``arch``
    (default ViT-B/16) with ``model_kwargs`` as given."""
    if name is not None:
        arch, model_kwargs = arch or descriptor(name).arch, teacher_model_kwargs(name, model_kwargs)
    model = _meta_model(arch or VIT_B_ARCH, model_kwargs)
    return {k: v.shape for k, v in model.state_dict().items()}


def load_official_state_dict(name: str, path: str | os.PathLike, *, arch: str | None = None,
                             model_kwargs: dict | None = None) -> dict[str, torch.Tensor]:
    """Read teacher ``name``'s official file at ``path`` and return its backbone weights
    under timm names, checked strictly (keys and shapes) against ``arch`` (default: the
    teacher's descriptor's, teachers/descriptors.py) built with ``teacher_model_kwargs(name,
    model_kwargs)``; a format's transform targets that architecture's patch grid.

    Returns: dict name -> float32 CPU tensor, exactly the keys of
    ``timm.create_model(arch, num_classes=0, **kwargs).state_dict()``, in its order.
    """
    spec = spec_of(name)
    arch = arch or descriptor(name).arch
    path = Path(path)
    model = _meta_model(arch, teacher_model_kwargs(name, model_kwargs))
    converted, where = spec.convert(safe_load(path), grid=tuple(model.patch_embed.grid_size))
    what = f"{name} ({spec.filename}, {arch})"
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_keys(converted, expected, what=what, path=path, where=where)
    return {k: v.float() if v.is_floating_point() else v          # in the model's key order
            for k, v in ((k, converted[k]) for k in expected)}


def load_timm_state_dict(name: str, path: str | os.PathLike, *, arch: str,
                         model_kwargs: dict | None) -> dict[str, torch.Tensor]:
    """Timm teacher ``name``'s weights from ``path`` (``TIMM_FILE``; a ``.safetensors`` file is
    read with safetensors), checked strictly against ``arch`` built with ``model_kwargs``."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    path = Path(path)
    model = _meta_model(arch, model_kwargs)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        from safetensors.torch import load_file
        try:
            obj = load_file(str(path))
        except Exception as err:        # a damaged or foreign file
            raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from None
    else:
        obj = safe_load(path)
    weights, where = TIMM_FILE.convert(obj)
    try:
        weights = checkpoint_filter_fn(weights, model)
    except Exception as err:            # timm's filter fails in its own ways on a foreign layout
        raise CheckpointError(f"{path}: timm cannot map its weights to {arch} ({type(err).__name__}: {err})") from None
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_keys(weights, expected, what=f"{name} ({arch})", path=path, where=where)
    return {k: weights[k].float() if weights[k].is_floating_point() else weights[k] for k in expected}


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Hex sha256 of a state dict: names, dtypes, shapes and bytes, in sorted key order."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        if tensor.numel():
            digest.update(tensor.view(torch.uint8).numpy())     # hashed in place (no copy of the bytes)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """``$COMAD_CACHE`` if set, else ``~/.cache/comad``."""
    return Path(os.environ.get("COMAD_CACHE", Path.home() / ".cache" / "comad"))


def cached_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where teacher ``name``'s official file lives in the cache: ``CACHE/NAME/FILENAME``."""
    spec = spec_of(name)
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / name / spec.filename


def fetch_official(name: str, *, cache_dir: str | os.PathLike | None = None,
                   timeout_s: float = 5.0, url: str | None = None) -> Path:
    """Path of teacher ``name``'s official file, downloading it into the cache if absent.

    The server is first asked (HEAD) with a ``timeout_s`` limit, so that a machine
    without network fails within seconds; the download itself is
    ``torch.hub.download_url_to_file`` (temporary file, then an atomic move).
    ``url`` overrides the official address (mirrors, tests).
    Raises ``CheckpointUnavailableError`` naming the file, the URL and where to put it.
    """
    spec = spec_of(name)
    dest = cached_path(name, cache_dir)
    if dest.is_file():
        return dest
    url = url or spec.url

    def unavailable(reason: str) -> CheckpointUnavailableError:
        return CheckpointUnavailableError(
            f"no checkpoint given for teacher {name!r} and its official file "
            f"{spec.filename} could not be downloaded from {url} ({reason}). Download it "
            f"yourself from {url} and either put it at {dest} or pass its path "
            f"(`extract --teacher {name} --checkpoint PATH`); `--random-init` builds an "
            f"untrained teacher for tests.")

    try:
        request = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(request, timeout=timeout_s):
            pass
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise unavailable(f"{type(err).__name__}: {reason}") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(dest), progress=True)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise unavailable(f"download failed: {err}") from None
    return dest
