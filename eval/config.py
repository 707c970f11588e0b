"""The typed configs of the five evaluation protocols (``KnnConfig``, ``LinearConfig``,
``FinetuneConfig``, ``DetectionConfig``, ``SegmentationConfig``; ``core.config.TypedConfig``), each
default written once: every field's metadata makes its command-line option (core/options.py), and a
config's docstring is its command's ``--help`` text. The protocols take their config; the result
JSON and the run folder's config.yaml record it resolved."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from core.config import TypedConfig, check_nonneg, check_positive
from core.options import option
from core.precision import AMP

__all__ = ["KnnConfig", "LinearConfig", "FinetuneConfig", "DetectionConfig", "SegmentationConfig",
           "CONFIGS", "parse_model_args"]


def parse_model_args(items) -> dict[str, Any]:
    """``["img_size=32", "patch_size=8"]`` -> ``{"img_size": 32, "patch_size": 8}``.

    Values are read as YAML scalars/lists (``0.1``, ``true``, ``[1, 2]``).
    """
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"model argument {item!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _amp_option():
    """The ``amp`` field of the protocols that autocast (k-NN runs fp32): one default, one help."""
    return option("bf16", "Autocast on CUDA: bf16 (A100/H100), fp16 (V100/T4; a training step takes a gradient scaler) "
                          "or none (fp32); the CPU runs fp32.")


@dataclass
class BackboneConfig(TypedConfig):
    """What every protocol evaluates: a timm backbone and its weights."""

    checkpoint: str = option("", "Backbone weights (.safetensors or .pth/.pt): a timm state dict, a run's last.pt "
                                 "or a snapshot (RUN/snapshots/).",
                             required=True, path="file")
    model: str = option("vit_tiny_patch16_224", "timm model name the checkpoint belongs to.")
    model_args: tuple[str, ...] = option((), "Extra timm.create_model argument, repeatable (e.g. img_size=32).",
                                         flag="--model-arg", metavar="KEY=VALUE")
    workers: int = option(8, "DataLoader worker processes.")

    task: ClassVar[str] = ""
    # Keys a resume may change: the checkpoint's path (its sha256 is compared instead) and
    # the worker count (results do not depend on it).
    movable: ClassVar[tuple[str, ...]] = ("checkpoint", "workers")

    @property
    def timm_kwargs(self) -> dict[str, Any]:
        return parse_model_args(self.model_args)

    def validate(self):
        if not self.checkpoint:
            raise ValueError("config checkpoint is required (the backbone's weights, --checkpoint)")
        self.timm_kwargs  # noqa: B018 (refuses a malformed KEY=VALUE)
        check_nonneg(self, ["workers"])
        return self


@dataclass
class _Splits(BackboneConfig):
    """An image-classification protocol's data: a train split and a val split."""

    train: str = option("", "Train split: a folder packed by `prepare` or an ImageFolder tree.",
                        required=True, path="dir")
    val: str = option("", "Val split, same layouts; its classes must be among the train classes.",
                      required=True, path="dir")

    def validate(self):
        super().validate()
        for key in ("train", "val"):
            if not getattr(self, key):
                raise ValueError(f"config {key} is required (--{key})")
        return self


@dataclass
class KnnConfig(_Splits):
    """Weighted k-NN (DINO protocol) on L2-normalised CLS features; top-1/top-5."""

    task: ClassVar[str] = "knn"
    batch_size: int = option(256, "Images per forward batch.")
    k: int = option(20, "Neighbours that vote.")
    temperature: float = option(0.07, "Vote weight exp(sim / T).")
    max_elements: int = option(1 << 26, "Bound on the query-block x memory similarity matrix (entries).")

    def validate(self):
        super().validate()
        check_positive(self, ["batch_size", "k", "temperature", "max_elements"])
        return self


@dataclass
class LinearConfig(_Splits):
    """Linear probe (MAE protocol): frozen backbone, BatchNorm(affine=False) + Linear on the CLS
    token; top-1."""

    task: ClassVar[str] = "linear"
    derived_inputs: ClassVar[tuple[str, ...]] = ("blr", "lr", "batch_size")
    epochs: int = option(90, "Training epochs (MAE: 90).")
    warmup_epochs: float = option(10.0, "Linear warm-up epochs (MAE: 10).")
    batch_size: int = option(16384, "Images per optimiser step (MAE: 16384); gathered from micro-batches.")
    micro_batch: int = option(256, "Images per backbone forward (memory only; the step sees --batch-size).")
    blr: float = option(0.1, "Base lr; lr = blr * batch-size / 256.")
    lr: float | None = option(None, "Absolute lr, overrides --blr.")
    weight_decay: float = option(0.0, "Weight decay (MAE: 0).")
    optimizer: Literal["lars", "sgd"] = option("lars", "LARS as in MAE, or SGD with momentum 0.9.")
    cache_features: bool = option(False, "Train on center-crop features extracted once: fast, but without the "
                                         "protocol's RandomResizedCrop+flip (recorded in the result).")
    amp: Literal[AMP] = _amp_option()
    seed: int = option(0, "Seed of head init, order and augmentation.")

    def derived(self) -> dict[str, Any]:
        return {"lr": self.lr if self.lr is not None else self.blr * self.batch_size / 256}

    def validate(self):
        super().validate()
        check_positive(self, ["epochs", "batch_size", "micro_batch", "blr"])
        check_nonneg(self, ["warmup_epochs", "weight_decay", "seed"])
        return self


@dataclass
class FinetuneConfig(_Splits):
    """End-to-end fine-tuning (MAE/DeiT recipe: layer decay, RandAugment, mixup/cutmix, label
    smoothing, drop path, AdamW, cosine); top-1/top-5."""

    task: ClassVar[str] = "finetune"
    derived_inputs: ClassVar[tuple[str, ...]] = ("blr", "lr", "batch_size")
    epochs: int = option(100, "Epochs (ViT-Tiny choice; MAE ViT-B: 100).")
    warmup_epochs: float = option(5.0, "Linear warm-up epochs.")
    batch_size: int = option(1024, "Images per optimiser step.")
    accum_iter: int = option(1, "Gradient accumulation: micro-batch = batch-size / accum-iter.")
    blr: float = option(5e-4, "Base lr; lr = blr * batch-size / 256.")
    lr: float | None = option(None, "Absolute lr, overrides --blr.")
    min_lr: float = option(1e-6, "Floor of the cosine schedule.")
    weight_decay: float = option(0.05, "AdamW weight decay.")
    layer_decay: float = option(0.75, "Layer-wise lr decay (MAE: 0.65 ViT-B, 0.75 ViT-L/H).")
    drop_path: float = option(0.1, "Stochastic depth rate.")
    smoothing: float = option(0.1, "Label smoothing.")
    mixup: float = option(0.8, "Mixup alpha (0 disables).")
    cutmix: float = option(1.0, "CutMix alpha (0 disables).")
    mixup_switch_prob: float = option(0.5, "Probability of cutmix instead of mixup when both are on.")
    auto_augment: str = option("rand-m9-mstd0.5-inc1", "timm RandAugment spec.")
    reprob: float = option(0.25, "Random erasing probability.")
    eval_every: int = option(1, "Evaluate on val every N epochs.")
    amp: Literal[AMP] = _amp_option()
    seed: int = option(0, "Seed of head init, order, augmentation.")

    def derived(self) -> dict[str, Any]:
        return {"lr": self.lr if self.lr is not None else self.blr * self.batch_size / 256}

    def validate(self):
        super().validate()
        check_positive(self, ["epochs", "batch_size", "accum_iter", "blr", "eval_every"])
        check_nonneg(self, ["warmup_epochs", "min_lr", "weight_decay", "layer_decay", "drop_path", "smoothing",
                            "mixup", "cutmix", "reprob", "seed"])
        if self.batch_size % self.accum_iter:
            raise ValueError(f"fine-tune: --batch-size {self.batch_size} is not a multiple of "
                             f"--accum-iter {self.accum_iter}")
        micro = self.batch_size // self.accum_iter
        if (self.mixup > 0 or self.cutmix > 0) and micro % 2:
            raise ValueError(f"fine-tune: mixup/cutmix needs an even micro-batch, got {micro} "
                             f"(--batch-size / --accum-iter)")
        return self


@dataclass
class _Dense(BackboneConfig):
    """A dense protocol's data: one folder holding both splits (a positional argument)."""

    data: str = option("", "The dataset folder.", argument=True, path="dir")
    amp: Literal[AMP] = _amp_option()

    def validate(self):
        super().validate()
        if not self.data:
            raise ValueError("config data is required (DATA)")
        check_positive(self, ["batch_size", "image_size"])
        check_nonneg(self, ["weight_decay", "layer_decay", "drop_path", "warmup", "seed"])
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"config max_images={self.max_images} must be >= 1")
        if self.image_size % 32:
            raise ValueError(f"{self.task} image size must be a multiple of 32, got {self.image_size}")
        return self


@dataclass
class DetectionConfig(_Dense):
    """COCO detection + instance segmentation: Mask R-CNN on a ViTDet simple feature pyramid,
    trained on DATA's train split, box AP and mask AP on its val split (COCOeval).

    DATA: annotations/instances_{train,val}2017.json + {train,val}2017/ (official COCO
    2017), or annotations/instances_{train,val}.json + {train,val}/."""

    task: ClassVar[str] = "detection"
    epochs: int = option(100, "Training epochs (ViTDet: 100).")
    image_size: int = option(1024, "LSJ crop and test size, a multiple of 32 (ViTDet: 1024).")
    batch_size: int = option(64, "Images per optimiser step (ViTDet: 64).")
    lr: float = option(1e-4, "AdamW lr for the whole batch (ViTDet: 1e-4 at 64).")
    weight_decay: float = option(0.1, "AdamW weight decay.")
    layer_decay: float = option(0.7, "Layer-wise lr decay of the ViT.")
    drop_path: float = option(0.1, "Stochastic depth rate of the ViT.")
    warmup: int = option(250, "Linear warm-up steps.")
    heads: Literal["vitdet", "light"] = option(
        "vitdet", "vitdet: conv heads with LayerNorm; light: torchvision Mask R-CNN v1 heads (CPU runs).")
    roi_batch: int = option(512, "Sampled RoIs per training image.")
    scale_range: tuple[float, float] = option((0.1, 2.0), "Large-scale jitter: resize to r * image-size, "
                                                          "r ~ U(MIN, MAX).", metavar="MIN MAX")
    max_images: int | None = option(None, "Use only the first N images (by id) of each split (short runs).")
    seed: int = option(0, "Seed of sample order and augmentation.")

    def validate(self):
        super().validate()
        check_positive(self, ["epochs", "roi_batch"])
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"config scale_range={list(self.scale_range)} must be 0 < MIN <= MAX")
        return self


@dataclass
class SegmentationConfig(_Dense):
    """ADE20K semantic segmentation: UperNet on a ViTDet simple feature pyramid, trained on
    DATA's training split; mIoU and pixel accuracy on its validation split (slide inference).

    DATA: images/{training,validation}/*.jpg + annotations/{training,validation}/*.png
    (ADEChallengeData2016); label 0 is ignored, k -> k-1."""

    task: ClassVar[str] = "segmentation"
    iters: int = option(160_000, "Training iterations (BEiT/MAE: 160k).")
    image_size: int = option(512, "Crop and slide-window size, a multiple of 32.")
    batch_size: int = option(16, "Crops per optimiser step.")
    lr: float = option(1e-4, "AdamW lr.")
    weight_decay: float = option(0.05, "AdamW weight decay.")
    layer_decay: float = option(0.65, "Layer-wise lr decay of the ViT.")
    drop_path: float = option(0.1, "Stochastic depth rate of the ViT.")
    warmup: int = option(1500, "Linear warm-up iterations (then poly decay).")
    channels: int = option(512, "UperNet channels (FCN aux head: half).")
    aux_weight: float = option(0.4, "FCN auxiliary loss weight (0: no aux head).")
    num_classes: int = option(150, "Classes after reduce_zero_label (ADE20K: 150).")
    max_images: int | None = option(None, "Use only the first N images (by name) of each split (short runs).")
    checkpoint_every: int = option(2000, "Checkpoint every N iterations.")
    seed: int = option(0, "Seed of head init, order, augmentation, drop path.")

    def validate(self):
        super().validate()
        check_positive(self, ["iters", "channels", "num_classes", "checkpoint_every"])
        check_nonneg(self, ["aux_weight"])
        return self


CONFIGS = {cls.task: cls for cls in (KnnConfig, LinearConfig, FinetuneConfig, DetectionConfig,
                                     SegmentationConfig)}
