"""The typed configuration of a CoMAD training run: its sections (dataclasses) and their checks.

The dataclasses are the default config, every (choice) of the method a named value with its
default (docs/method.md lists them by key). ``load_config("exp.yaml", overrides=["gate.mode=uniform"])``
applies a YAML file, then ``key=value`` overrides (core/config.py; docs/CONTRACTS.md "Typed configs").
Only builders read this object (``train/objective.py: build_objective``); modules take keyword arguments."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, Sequence

from core import config as typed
from core.precision import AMP
from data.decoders import DECODERS
from teachers.descriptors import DESCRIPTORS, PAPER_TEACHERS, is_teacher_name
from data.views import NUM_PATCHES

TEACHER_NAMES = tuple(DESCRIPTORS)


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
    in_dim: int | None = None           # every teacher's token width; None: each its own (store statistics, else descriptor)


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
    recon_weight: float = 1.0           # (choice) weight of the reconstruction term
    recon_form: str = "unexplained_variance"    # (choice) ||U_k A_k(t) - t||^2 / batch var(t); or
                                        # "squared_error", the method's plain ||U_k A_k(t) - t||^2 (train/adapters.py)


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
                                        # of the official checkpoint files (teachers/checkpoints.py)
    stats_images: int = 1024            # online-fresh without data.store: images of the keyed
                                        # sample whose tokens give the adapter statistics
    views: int | str = "auto"           # v views per image trained on; epoch e uses slot e mod v of the
                                        # store (view (e + i) mod V when v = V); "auto": the store's V
                                        # (an explicit v may be 1..V: one store serves several budgets)
    seed: int = 0                       # root of every view/mask draw (must match the store)
    teachers: Literal["auto"] | tuple[str, ...] = "auto"   # the teachers distilled; "auto": the store's described
                                        # teachers in registry order (teachers/descriptors.py), the paper's
                                        # three without a store (train/runstore.py: open_run_store)
    student_visible: int = 49           # 25% of 196 patches
    decoder: str = "auto"               # image decoder (data/decoders.py): "dali" (the extra
                                        # '.[dali]'), "pil" (reference, num_workers threads), "torchvision"
                                        # (decode_jpeg, nvJPEG on CUDA) or "auto" (dali where it is installed,
                                        # else torchvision on CUDA, else pil; resolved at the start, recorded
                                        # in config.yaml)
    num_workers: int = 8
    hw_decoder_load: float = 0.65       # DALI on a GPU: share of the JPEGs for the hardware decoder
                                        # (DALI's default, to be replaced by what bench/gpu_check.py measures)
    preallocate_width_hint: int = 0     # DALI on a GPU: hardware decoder buffers for images of
    preallocate_height_hint: int = 0    # this size (0: no hint)
    shuffle_window: int = 4             # samples are shuffled within this many shards of a stream
    pixels: str = "auto"                # cached training images: "views" (the store's view tars,
                                        # no image shard opened), "source" (decode the images
                                        # with the stored crops), "auto" (views when complete;
                                        # resolved at the start, recorded in config.yaml)
    streams: int | str = "auto"         # independent shard streams (data/order.py), fixed so
                                        # batches do not depend on the world size; "auto": the most
                                        # of 8, 4, 2, 1 that suit the data and the global batch
                                        # (data/order.py: auto_streams)


@dataclass
class TrainConfig:
    """The loop: batch, precision, clipping, logging and checkpoint intervals."""

    batch_size: int = 4096              # global batch over all ranks
    clip_grad: float = 0.0              # max grad norm; 0 (MAE's recipe) disables clipping
    amp: str = "bf16"                   # autocast on CUDA (core/precision.py): "bf16" (A100/H100), "fp16"
                                        # (V100/T4: with a gradient scaler) or "none"; the CPU runs fp32
    seed: int = 0                       # model initialisation and any training-time noise
    log_every: int = 50                 # steps between logged metrics (the only host syncs)
    ckpt_every: int = 1                 # epochs between checkpoints
    snapshot_every: int = 0             # every N epochs also keep the student as RUN/snapshots/
                                        # epoch_NNNN.safetensors (NNNN: epochs done); 0: off
    snapshot_full: bool = False         # snapshots also keep the whole checkpoint (epoch_NNNN.pt)
    out_dir: str = "runs/comad"
    compile: bool = False               # torch.compile (inductor) the student side (train/learner.py)
    wandb: bool = False                 # also log to Weights & Biases (train/tracking.py; '.[wandb]')
    wandb_project: str = "comad"        # the W&B project of the run


# Keys whose value "auto" is resolved when a run starts (train/runstore.py: open_run_store) and
# written resolved into the run's config.yaml: these counts, and data.teachers, data.pixels and
# data.decoder.
AUTO = "auto"
AUTO_KEYS = ("data.views", "data.streams")

CHOICES: dict[str, tuple[str, ...]] = {
    "decoder.pos_embed": ("sincos", "learned"),
    "adapters.mode": ("frozen", "trainable"),
    "adapters.init": ("pca", "random"),
    "gate.mode": ("uniform", "affinity", "agreement", "consensus"),
    "loss.kind": ("kl", "mse"),
    "loss.recon_form": ("unexplained_variance", "squared_error"),
    "schedule.kind": ("cosine", "constant"),
    "data.decoder": DECODERS,
    "data.source": ("cached", "online-replay", "online-fresh"),
    "data.pixels": ("auto", "source", "views"),
    "train.amp": AMP,
}


@dataclass
class Config(typed.TypedConfig):
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

    derived_inputs: ClassVar[Sequence[str]] = ("optim.base_lr", "train.batch_size")

    # ---- derived values ---------------------------------------------------------
    def derived(self) -> dict[str, Any]:
        """Values computed from the config, once: ``lr`` (peak learning rate)."""
        return {"lr": self.optim.base_lr * self.train.batch_size / self.optim.lr_reference_batch}

    def validate(self) -> "Config":
        """Check choices and ranges; raises ValueError naming the key. Returns self."""
        typed.check_choices(self, CHOICES)
        typed.check_positive(self, [
            "model.embed_dim", "model.depth", "model.num_heads", "decoder.width",
            "decoder.depth", "decoder.num_heads", "gate.tau",
            "loss.tau", "loss.tau_spatial", "optim.base_lr", "optim.lr_reference_batch",
            "schedule.epochs", "data.student_visible",
            "train.batch_size", "train.log_every", "train.ckpt_every",
            "data.shuffle_window", "data.stats_images"])
        for key in AUTO_KEYS:
            value = typed.get(self, key)
            if value != AUTO and not (isinstance(value, int) and value > 0):
                raise ValueError(f"config {key}={value!r} must be {AUTO!r} or an integer > 0")
        typed.check_nonneg(self, [
            "model.drop_path", "loss.spatial_weight", "loss.recon_weight", "optim.eps",
            "optim.weight_decay", "schedule.warmup_epochs", "schedule.min_lr",
            "data.seed", "data.num_workers", "train.clip_grad", "train.snapshot_every", "data.preallocate_width_hint",
            "data.preallocate_height_hint"])
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
        for name in teacher_names(self):
            if not is_teacher_name(name):
                raise ValueError(f"config data.teachers has unknown teacher {name!r}; "
                                 f"valid: {list(TEACHER_NAMES)} or timm:NAME")
        if self.adapters.in_dim is not None and not self.adapters.in_dim > 0:
            raise ValueError(f"config adapters.in_dim={self.adapters.in_dim!r} must be > 0 or null")
        if len(set(teacher_names(self))) != len(teacher_names(self)):
            raise ValueError(f"config data.teachers={list(self.data.teachers)} repeats a teacher")
        if not 0 < self.data.student_visible <= NUM_PATCHES:
            raise ValueError(f"config data.student_visible={self.data.student_visible} "
                             f"must be in [1, {NUM_PATCHES}]")
        if not all(0 <= b < 1 for b in self.optim.betas):
            raise ValueError(f"config optim.betas={list(self.optim.betas)} must be in [0, 1)")
        if self.schedule.warmup_epochs > self.schedule.epochs:
            raise ValueError(f"config schedule.warmup_epochs={self.schedule.warmup_epochs} "
                             f"exceeds schedule.epochs={self.schedule.epochs}")
        return self



def teacher_names(cfg: Config) -> tuple[str, ...]:
    """``data.teachers`` as names: a run's resolved list (``resolve_data``), or, while it is
    still ``auto`` (no store read yet: synthetic batches, benches), the paper's three."""
    return PAPER_TEACHERS if cfg.data.teachers == AUTO else tuple(cfg.data.teachers)


# ---- loading and overriding ---------------------------------------------------------
def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``key=value`` overrides.

    Raises FileNotFoundError naming a missing file and ValueError naming a bad key/value.
    """
    return typed.load_config(Config(), path, overrides)


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """Apply dotted ``section.key=value`` strings (value parsed as YAML, then type-checked)."""
    return typed.apply_overrides(cfg, overrides)


def merge_dict(cfg: Config, data: Mapping[str, Any]) -> Config:
    """A new Config: ``cfg`` with the nested values of ``data``; strict and type-checked.

    A ``derived`` section is accepted only if it equals what the result derives (so a
    resolved dump loads back, but editing a derived value is refused).
    """
    return typed.merge_dict(cfg, data)
