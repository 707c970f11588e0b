"""The one typed configuration of a CoMAD training run.

Every quantity that METHOD.md marks as a (choice) is a named value here, with the
METHOD.md default. The dataclasses below *are* the default config; a run changes it
with a YAML file (nested sections, only the keys it changes) and then with dotted
``key=value`` overrides, in that order::

    cfg = load_config("exp.yaml", overrides=["gate.mode=uniform", "optim.base_lr=1e-4"])

Unknown keys are errors that name the key and list the valid ones; values are
type-checked against the field types (a string from the command line is converted
when it parses as the field's type). Derived values (the scaled learning rate) are
computed once by :meth:`Config.derived` and written into the resolved YAML dump under
``derived:``; loading a dump checks that they still agree with their inputs.

Only builders read this object (``train/objective.py: build_objective``); modules
take explicit keyword arguments.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

TEACHER_NAMES = ("mae", "mocov3", "ibot", "dino")


@dataclass
class ModelConfig:
    """The student encoder: a timm ViT run on CLS + its visible patches."""

    arch: str = "vit_tiny_patch16_224"  # timm model name (created with num_classes=0)
    embed_dim: int = 192                # passed to timm; 192/12/3 is ViT-Tiny
    depth: int = 12
    num_heads: int = 3
    drop_path: float = 0.0              # (choice) stochastic depth of the student
    checkpoint: str = ""                # "" = from scratch; else a timm state dict file


@dataclass
class DecoderConfig:
    """The light MAE-style decoder that maps encoder output to all 196 positions."""

    width: int = 192                    # (choice) 192 wide
    depth: int = 2                      # (choice) 2 blocks
    num_heads: int = 3
    mlp_ratio: float = 4.0
    pos_embed: str = "sincos"           # (choice) "sincos" (fixed, MAE) or "learned"


@dataclass
class AdaptersConfig:
    """Per-teacher A_k(t) = LayerNorm(W_k t + b_k): teacher width -> student width."""

    mode: str = "frozen"                # "frozen" (no grad) or "trainable"
    init: str = "pca"                   # "pca" (from the store's statistics) or "random"
    in_dim: int = 768                   # teacher token width (ViT-B)


@dataclass
class GateConfig:
    """The per-token consensus gate that fuses the adapted teacher tokens."""

    mode: str = "consensus"             # "uniform" | "affinity" | "agreement" | "consensus"
    tau: float = 0.1                    # (choice) tau_g


@dataclass
class LossConfig:
    """Token loss + lambda * spatial loss (+ reconstruction for trainable adapters)."""

    kind: str = "kl"                    # "kl" or "mse" (the KL-vs-MSE ablation)
    tau: float = 1.0                    # (choice) token KL temperature
    tau_spatial: float = 4.0            # (choice) spatial KL temperature tau_s
    spatial_weight: float = 1.0         # (choice) lambda
    recon_weight: float = 1.0           # (choice) weight of ||U_k A_k(t) - t||^2 / var(t)


@dataclass
class OptimConfig:
    """AdamW; the learning rate is base_lr * batch / lr_reference_batch (derived)."""

    base_lr: float = 1.5e-4
    lr_reference_batch: int = 256
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.05
    decay_1d: bool = False              # (choice) False: no weight decay on biases, norms, cls/pos


@dataclass
class ScheduleConfig:
    """Per-step learning-rate schedule: linear warm-up then cosine decay."""

    epochs: int = 300
    warmup_epochs: int = 40             # (choice) MAE pre-training's 40 warm-up epochs
    kind: str = "cosine"                # "cosine" or "constant" (after warm-up)
    min_lr: float = 0.0                 # (choice) end of the cosine


@dataclass
class DataConfig:
    """Where samples come from and how views and masks are drawn."""

    store: str = ""                     # feature store directory (required to train)
    images: str = ""                    # packed image set (prepare output) (required to train)
    source: str = "cached"              # teacher tokens: "cached" (read from the store),
                                        # "online-replay" (teachers run every step on the store's
                                        # V views), "online-fresh" (teachers run every step on a new
                                        # crop, flip and masks per (image, epoch); docs/method.md)
    teachers_from: str = ""             # online-fresh without data.store: "random-init" or a folder
                                        # of the official checkpoint files (extract/checkpoints.py)
    stats_images: int = 1024            # online-fresh without data.store: images of the keyed
                                        # sample whose tokens give the adapter statistics
    random_teacher_depth: int = 12      # blocks of data.teachers_from=random-init teachers (12: ViT-B/16;
                                        # tests shrink them)
    views: int | str = "auto"           # V cached views per image; epoch e uses (e + i) mod V;
                                        # "auto": the store's V (an explicit V must equal it)
    seed: int = 0                       # root of every view/mask draw (must match the store)
    teachers: tuple[str, ...] = ("mae", "mocov3", "ibot")
    student_visible: int = 49           # 25% of 196 patches
    decoder: str = "dali"               # image decoder: "dali" or "pil" (reference)
    num_workers: int = 8
    hw_decoder_load: float = 0.65       # DALI on a GPU: share of the JPEGs for the hardware decoder
                                        # (DALI's default, to be replaced by what bench/gpu_check.py measures)
    preallocate_width_hint: int = 0     # DALI on a GPU: hardware decoder buffers for images of
    preallocate_height_hint: int = 0    # this size (0: no hint)
    shuffle_window: int = 4             # samples are shuffled within this many shards of a stream
    streams: int | str = "auto"         # independent shard streams (train/order.py), fixed so
                                        # batches do not depend on the world size; "auto": the most
                                        # of 8, 4, 2, 1 that suit the data and the global batch
                                        # (train/order.py: auto_streams)


@dataclass
class TrainConfig:
    """The loop: batch, precision, clipping, logging and checkpoint intervals."""

    batch_size: int = 4096              # global batch over all ranks
    clip_grad: float = 0.0              # max grad norm; 0 (MAE's recipe) disables clipping
    amp: str = "bf16"                   # "bf16" autocast on GPU or "none"; CPU runs fp32
    seed: int = 0                       # model initialisation and any training-time noise
    log_every: int = 50                 # steps between logged metrics (the only host syncs)
    ckpt_every: int = 1                 # epochs between checkpoints
    out_dir: str = "runs/comad"
    compile: bool = False               # torch.compile (inductor) the student side (train/loop.py)


# Keys whose value "auto" is resolved when a run starts (train/loader.py: resolve_data) and
# written resolved into the run's config.yaml.
AUTO = "auto"
AUTO_KEYS = ("data.views", "data.streams")

CHOICES: dict[str, tuple[str, ...]] = {
    "decoder.pos_embed": ("sincos", "learned"),
    "adapters.mode": ("frozen", "trainable"),
    "adapters.init": ("pca", "random"),
    "gate.mode": ("uniform", "affinity", "agreement", "consensus"),
    "loss.kind": ("kl", "mse"),
    "schedule.kind": ("cosine", "constant"),
    "data.decoder": ("dali", "pil"),
    "data.source": ("cached", "online-replay", "online-fresh"),
    "train.amp": ("bf16", "none"),
}


@dataclass
class Config:
    """The whole run. Sections are dataclasses; see the module docstring."""

    model: ModelConfig = field(default_factory=ModelConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    adapters: AdaptersConfig = field(default_factory=AdaptersConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # ---- derived values ---------------------------------------------------------
    def derived(self) -> dict[str, Any]:
        """Values computed from the config, once: ``lr`` (peak learning rate)."""
        return {"lr": self.optim.base_lr * self.train.batch_size / self.optim.lr_reference_batch}

    # ---- serialisation ----------------------------------------------------------
    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict of YAML-safe values (tuples become lists)."""
        out: dict[str, dict[str, Any]] = {}
        for sec in dataclasses.fields(self):
            values = {}
            for f in dataclasses.fields(getattr(self, sec.name)):
                v = getattr(getattr(self, sec.name), f.name)
                values[f.name] = list(v) if isinstance(v, tuple) else v
            out[sec.name] = values
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Config":
        """Build from a (possibly partial) nested dict over the defaults; strict."""
        return merge_dict(cls(), data)

    def to_yaml(self) -> str:
        """The resolved config as YAML, with a ``derived:`` section for the record."""
        doc = self.to_dict()
        doc["derived"] = self.derived()
        return yaml.safe_dump(doc, sort_keys=False)

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_yaml` to ``path``."""
        Path(path).write_text(self.to_yaml())

    def validate(self) -> "Config":
        """Check choices and ranges; raises ValueError naming the key. Returns self."""
        for key, allowed in CHOICES.items():
            sec, name = key.split(".")
            value = getattr(getattr(self, sec), name)
            if value not in allowed:
                raise ValueError(f"config {key}={value!r} is not one of {list(allowed)}")
        positive = ["model.embed_dim", "model.depth", "model.num_heads", "decoder.width",
                    "decoder.depth", "decoder.num_heads", "adapters.in_dim", "gate.tau",
                    "loss.tau", "loss.tau_spatial", "optim.base_lr", "optim.lr_reference_batch",
                    "schedule.epochs", "data.student_visible",
                    "train.batch_size", "train.log_every", "train.ckpt_every",
                    "data.shuffle_window", "data.stats_images", "data.random_teacher_depth"]
        for key in positive:
            sec, name = key.split(".")
            if not getattr(getattr(self, sec), name) > 0:
                raise ValueError(f"config {key}={getattr(getattr(self, sec), name)!r} must be > 0")
        for key in AUTO_KEYS:
            sec, name = key.split(".")
            value = getattr(getattr(self, sec), name)
            if value != AUTO and not (isinstance(value, int) and value > 0):
                raise ValueError(f"config {key}={value!r} must be {AUTO!r} or an integer > 0")
        nonneg = ["model.drop_path", "loss.spatial_weight", "loss.recon_weight", "optim.eps",
                  "optim.weight_decay", "schedule.warmup_epochs", "schedule.min_lr",
                  "data.seed", "data.num_workers", "train.clip_grad", "data.preallocate_width_hint",
                  "data.preallocate_height_hint"]
        for key in nonneg:
            sec, name = key.split(".")
            if getattr(getattr(self, sec), name) < 0:
                raise ValueError(f"config {key}={getattr(getattr(self, sec), name)!r} must be >= 0")
        if not 0 <= self.data.hw_decoder_load <= 1:
            raise ValueError(f"config data.hw_decoder_load={self.data.hw_decoder_load!r} must be in [0, 1]")
        if self.model.embed_dim % self.model.num_heads:
            raise ValueError(f"config model.embed_dim={self.model.embed_dim} is not divisible by "
                             f"model.num_heads={self.model.num_heads}")
        if self.decoder.width % self.decoder.num_heads:
            raise ValueError(f"config decoder.width={self.decoder.width} is not divisible by "
                             f"decoder.num_heads={self.decoder.num_heads}")
        if not self.data.teachers:
            raise ValueError("config data.teachers is empty; name at least one of "
                             f"{list(TEACHER_NAMES)}")
        for name in self.data.teachers:
            if name not in TEACHER_NAMES:
                raise ValueError(f"config data.teachers has unknown teacher {name!r}; "
                                 f"valid: {list(TEACHER_NAMES)}")
        if len(set(self.data.teachers)) != len(self.data.teachers):
            raise ValueError(f"config data.teachers={list(self.data.teachers)} repeats a teacher")
        if not 0 < self.data.student_visible <= 196:
            raise ValueError(f"config data.student_visible={self.data.student_visible} "
                             "must be in [1, 196]")
        if not all(0 <= b < 1 for b in self.optim.betas):
            raise ValueError(f"config optim.betas={list(self.optim.betas)} must be in [0, 1)")
        if self.schedule.warmup_epochs > self.schedule.epochs:
            raise ValueError(f"config schedule.warmup_epochs={self.schedule.warmup_epochs} "
                             f"exceeds schedule.epochs={self.schedule.epochs}")
        return self


# ---- loading and overriding ---------------------------------------------------------
def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``key=value`` overrides.

    Raises FileNotFoundError naming a missing file and ValueError naming a bad key/value.
    """
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path} is not valid YAML: {e}") from e
        if data is not None:
            if not isinstance(data, Mapping):
                raise ValueError(f"config file {path} must hold a mapping of sections, "
                                 f"got {type(data).__name__}")
            try:
                cfg = merge_dict(cfg, data)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from e
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """Apply dotted ``section.key=value`` strings (value parsed as YAML, then type-checked)."""
    nested: dict[str, dict[str, Any]] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key.count(".") != 1:
            raise ValueError(f"override {item!r} must look like section.key=value "
                             f"(sections: {_names(Config)})")
        sec, name = key.split(".")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        nested.setdefault(sec, {})[name] = _FromString(raw, value)
    return merge_dict(cfg, nested)


def merge_dict(cfg: Config, data: Mapping[str, Any]) -> Config:
    """A new Config: ``cfg`` with the nested values of ``data``; strict and type-checked.

    A ``derived`` section is accepted only if it equals what the result derives (so a
    resolved dump loads back, but editing a derived value is refused).
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"config must be a mapping of sections, got {type(data).__name__}")
    sections = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    new_sections = {}
    derived = None
    for sec, values in data.items():
        if sec == "derived":
            derived = values
            continue
        if sec not in sections:
            raise ValueError(f"unknown config section {sec!r}; valid sections: {_names(Config)}")
        if not isinstance(values, Mapping):
            raise ValueError(f"config section {sec!r} must be a mapping, got {values!r}")
        section = new_sections.get(sec, sections[sec])
        hints = typing.get_type_hints(type(section))
        changes = {}
        for name, value in values.items():
            if name not in hints:
                raise ValueError(f"unknown config key {sec}.{name}; valid keys in {sec!r}: "
                                 f"{_names(type(section))}")
            changes[name] = _coerce(value, hints[name], f"{sec}.{name}")
        new_sections[sec] = dataclasses.replace(section, **changes)
    out = dataclasses.replace(cfg, **new_sections).validate()
    if derived is not None:
        expected = out.derived()
        if not isinstance(derived, Mapping) or set(derived) != set(expected) or any(
                abs(float(derived[k]) - expected[k]) > 1e-12 * max(1.0, abs(expected[k]))
                for k in expected):
            raise ValueError(f"config derived={dict(derived) if isinstance(derived, Mapping) else derived!r} "
                             f"disagrees with the values computed from the config {expected}; "
                             "derived values are computed (change optim.base_lr or "
                             "train.batch_size instead)")
    return out


class _FromString:
    """A value that came from the command line: its raw text and its YAML parse."""

    def __init__(self, raw: str, parsed: Any):
        self.raw, self.parsed = raw, parsed


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the field type ``tp``; convert command-line strings."""
    raw = None
    if isinstance(value, _FromString):
        raw, value = value.raw.strip(), value.parsed

    def bad():
        shown = raw if raw is not None else repr(value)
        return ValueError(f"config {key}={shown} is not a valid {_type_name(tp)}")

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):   # e.g. int | str: the first type that takes it
        for arm in typing.get_args(tp):
            try:
                return _coerce(value if raw is None else _FromString(raw, value), arm, key)
            except ValueError:
                continue
        raise bad()
    if origin is tuple:
        args = typing.get_args(tp)
        if raw is not None and isinstance(value, str):
            value = [yaml.safe_load(v) for v in value.split(",")]
        if not isinstance(value, (list, tuple)):
            raise bad()
        if len(args) == 2 and args[1] is Ellipsis:
            items = [_coerce(v, args[0], key) for v in value]
        else:
            if len(value) != len(args):
                raise bad()
            items = [_coerce(v, a, key) for v, a in zip(value, args)]
        return tuple(items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is str:
        if raw is not None and not isinstance(value, str):
            return raw  # command-line text that YAML read as a number etc.: keep it as typed
        if isinstance(value, str):
            return value
        raise bad()
    raise TypeError(f"config {key}: unsupported field type {tp!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) if typing.get_origin(tp) is None else str(tp)


def _names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]
