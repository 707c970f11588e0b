"""Linear probe on the frozen CLS token (the MAE protocol: BatchNorm + Linear head, LARS): large
batches from micro-batches of frozen features, optional cached features, the backbone's work
shared over torchrun ranks, checkpoint per epoch and exact resume (docs/eval.md, "Linear
probe")."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as td
import torch.nn.functional as F
from torch import nn

from eval.config import LinearConfig
from core import dist
from core.precision import autocast, autocast_dtype
from core.progress import progress_bar

__all__ = ["LARS", "probe_head", "run_linear"]


class LARS(torch.optim.Optimizer):
    """LARS as in MAE's linear probe: SGD with momentum whose update for every
    parameter with more than one dimension is weight-decayed and rescaled by
    ``trust_coefficient * ||p|| / ||update||``; 1-D parameters get plain momentum SGD.
    Not timm's ``Lars``: its trust ratio divides by ``||grad|| + wd ||p||``, which differs from
    MAE's once ``weight_decay`` is set (docs/eval.md, "Optimisers and schedules").
    """

    def __init__(self, params, *, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    p_norm, u_norm = torch.norm(p), torch.norm(update)
                    one = torch.ones_like(p_norm)
                    q = torch.where(p_norm > 0.0,
                                    torch.where(u_norm > 0.0,
                                                group["trust_coefficient"] * p_norm / u_norm,
                                                one), one)
                    update = update.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])


def probe_head(dim: int, num_classes: int, *, seed: int = 0) -> nn.Sequential:
    """BatchNorm1d(dim, affine=False, eps=1e-6) + Linear(dim, num_classes).

    Input (B, dim) float32 features, output (B, num_classes) logits. Initialised from
    ``seed`` without touching the global generator.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6),
                             nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(head[1].weight, std=0.01)
        nn.init.zeros_(head[1].bias)
    return head


@torch.no_grad()
def _features(backbone: nn.Module, images: torch.Tensor, device: torch.device, amp: torch.dtype | None
              ) -> torch.Tensor:
    """images (B, 3, H, W) float32 -> CLS features (B, D) float32 (under autocast ``amp``: None is fp32)."""
    from eval.common import cls_features

    images = images.to(device, non_blocking=True)
    with autocast(device, amp):
        return cls_features(backbone, images).float()


def _chunk_features(backbone, dataset, order: torch.Tensor, *, count: int, micro_batch: int, dim: int,
                    device, num_workers: int, amp: torch.dtype | None = None,
                    desc: str | None = None) -> Iterator[torch.Tensor]:
    """Yield the CLS features (n, D) float32 of the chunks ``order[k * micro_batch:(k + 1) * micro_batch]``,
    k = 0 .. count - 1, in that order, on every rank.

    The chunks are exactly one process's micro-batches. Under torchrun rank r computes the chunks
    k = r, r + W, r + 2W, ... (W ranks) and each round of W chunks is all-gathered (padded to
    ``micro_batch`` rows), so every rank sees every chunk's features, computed from the same images
    in the same batch as in one process: the same numbers.
    """
    from eval.data import make_loader

    rank, world, n = dist.rank(), dist.world_size(), len(order)
    sizes = [min((k + 1) * micro_batch, n) - k * micro_batch for k in range(count)]
    mine = [order[k * micro_batch:k * micro_batch + sizes[k]] for k in range(rank, count, world)]
    subset = torch.utils.data.Subset(dataset, torch.cat(mine).tolist() if mine else [])
    batches = iter(make_loader(subset, batch_size=micro_batch, shuffle=False, num_workers=num_workers,
                               pin_memory=device.type == "cuda"))
    bar = progress_bar(total=count, desc=desc, unit="batch", leave=False, disable=desc is None)
    for first in range(0, count, world):
        own = _features(backbone, next(batches)[0], device, amp) if first + rank < count else None
        if world == 1:
            chunks = [own]
        else:
            sent = torch.zeros(micro_batch, dim, dtype=torch.float32, device=device)
            if own is not None:
                sent[:len(own)] = own
            chunks = [torch.empty_like(sent) for _ in range(world)]
            td.all_gather(chunks, sent)
        for k, feats in zip(range(first, min(first + world, count)), chunks):
            yield feats[:sizes[k]]
            bar.update(1)
    bar.close()


def _feature_table(backbone, dataset, *, device, micro_batch, dim, num_workers, amp, desc):
    """Features (N, D) float32 and labels (N,) int64 of the whole ``dataset`` in its order (split over ranks)."""
    n = len(dataset)
    dataset.set_epoch(0)
    feats = torch.cat(list(_chunk_features(backbone, dataset, torch.arange(n), count=-(-n // micro_batch),
                                           micro_batch=micro_batch, dim=dim, device=device,
                                           num_workers=num_workers, amp=amp, desc=desc)))
    return feats, torch.tensor(dataset.labels, dtype=torch.int64).to(device)   # a copy: labels may be read-only


def _epoch_batches(*, epoch: int, batch_size: int, micro_batch: int, steps: int, seed: int, dim: int,
                   backbone, train_set, cached, device, num_workers, amp=None) -> Iterator:
    """Yield ``steps`` batches (features (batch_size, D) float32, labels (batch_size,)).

    Without ``cached``: the epoch's order comes from (seed, epoch) and each image's augmentation
    from (seed, epoch, index), the same on every rank; its micro-batches are split over ranks
    (``_chunk_features``) and gathered back, so every rank sees one process's batches."""
    from core.keys import derive_seed
    from eval.data import make_loader

    if cached is not None:
        feats, labels = cached
        gen = torch.Generator().manual_seed(derive_seed(seed, epoch, 0x11))
        order = torch.randperm(feats.shape[0], generator=gen).to(feats.device)
        for s in range(steps):
            idx = order[s * batch_size:(s + 1) * batch_size]
            yield feats[idx], labels[idx]
        return
    train_set.set_epoch(epoch)  # keys each image's augmentation by (seed, epoch, index)
    n = len(train_set)          # the order a shuffling make_loader(seed, epoch) gives, from that loader itself
    order = next(iter(make_loader(range(n), batch_size=n, shuffle=True, seed=seed, epoch=epoch)))
    labels = torch.tensor(train_set.labels, dtype=torch.int64)[order].to(device)   # a copy: labels may be read-only
    chunks = _chunk_features(backbone, train_set, order, count=-(-steps * batch_size // micro_batch),
                             micro_batch=micro_batch, dim=dim, device=device, num_workers=num_workers, amp=amp)
    buf, have, done = [], 0, 0
    for f in chunks:
        buf.append(f)
        have += len(f)
        while have >= batch_size and done < steps:
            f = torch.cat(buf)
            yield f[:batch_size], labels[done * batch_size:(done + 1) * batch_size]
            buf, have, done = [f[batch_size:]], have - batch_size, done + 1


def run_linear(cfg: LinearConfig, *, out: Path, device: str = "auto", resume: bool = False) -> tuple[dict, dict]:
    """Train and evaluate the probe (``cfg``: eval/config.py) in the run folder ``out``.

    Returns (metrics, settings) for ``write_result``."""
    from core.run import StepMetrics, open_run
    from eval.common import checkpoint_digest, cosine_lr, input_size_of, load_backbone, resolve_device
    from eval.data import CROP_PCT, EvalImages, eval_transform, probe_train_transform
    from eval.knn import topk_accuracy

    digest = checkpoint_digest(Path(cfg.checkpoint))
    with open_run(out, config=cfg, resume=resume, movable=cfg.movable,
                  compare={"checkpoint_sha256": digest}, rank=dist.rank()) as run:
        dev = resolve_device(device)
        backbone = load_backbone(cfg.checkpoint, model=cfg.model, **cfg.timm_kwargs).to(dev).eval()
        backbone.requires_grad_(False)
        size = input_size_of(backbone)
        train_tf = eval_transform(size) if cfg.cache_features else probe_train_transform(size)
        train_set = EvalImages(cfg.train, transform=train_tf, seed=cfg.seed, task="eval linear")
        val_set = EvalImages(cfg.val, transform=eval_transform(size), classes=train_set.classes, task="eval linear")
        steps = len(train_set) // cfg.batch_size
        if steps == 0:
            raise ValueError(f"linear probe: --batch-size {cfg.batch_size} is larger than the train "
                             f"set ({len(train_set)} images in {cfg.train})")
        abs_lr = cfg.derived()["lr"]
        settings = {
            "protocol": "MAE linear probe: frozen backbone, CLS token, "
                        "BatchNorm1d(affine=False, eps=1e-6) + Linear",
            "model": cfg.model, "timm_kwargs": cfg.timm_kwargs, "input_size": size,
            "checkpoint_sha256": digest, "optimizer": cfg.optimizer, "momentum": 0.9, "epochs": cfg.epochs,
            "warmup_epochs": cfg.warmup_epochs, "batch_size": cfg.batch_size, "blr": cfg.blr, "lr": abs_lr,
            "weight_decay": cfg.weight_decay, "schedule": "linear warm-up + half-cycle cosine to 0",
            "seed": cfg.seed,
            "augment": ("NONE: center-crop features cached once (--cache-features; deviates from "
                        "the MAE protocol, which uses RandomResizedCrop + flip)") if cfg.cache_features
            else "RandomResizedCrop (bicubic) + horizontal flip (MAE)",
            "val_transform": f"resize {round(size / CROP_PCT)} bicubic, center crop {size}",
            "train": str(cfg.train), "val": str(cfg.val), "train_images": len(train_set),
            "val_images": len(val_set), "num_classes": len(train_set.classes),
            "steps_per_epoch": steps,
        }
        dim = int(backbone.num_features)
        head = probe_head(dim, len(train_set.classes), seed=cfg.seed).to(dev)
        if cfg.optimizer == "lars":
            opt = LARS(head.parameters(), lr=abs_lr, weight_decay=cfg.weight_decay)
        else:
            opt = torch.optim.SGD(head.parameters(), lr=abs_lr, momentum=0.9, weight_decay=cfg.weight_decay)
        start, history = 0, []
        if run.resumed:
            head.load_state_dict(run.state["head"])
            opt.load_state_dict(run.state["optimizer"])
            start, history = int(run.state["epoch"]), list(run.state["history"])

        amp = autocast_dtype(cfg.amp, dev)          # the frozen backbone's; the head trains in fp32
        table = dict(device=dev, micro_batch=cfg.micro_batch, dim=dim, num_workers=cfg.workers, amp=amp)
        val_f, val_l = _feature_table(backbone, val_set, **table, desc="val features")
        cached = None
        if cfg.cache_features and start < cfg.epochs:
            cached = _feature_table(backbone, train_set, **table, desc="train features (center crop)")
        bar = progress_bar(total=cfg.epochs * steps, initial=start * steps, desc="linear probe", unit="step")
        sums = StepMetrics(dev)
        for epoch in range(start, cfg.epochs):
            head.train()
            for s, (f, lab) in enumerate(_epoch_batches(
                    epoch=epoch, batch_size=cfg.batch_size, micro_batch=cfg.micro_batch, steps=steps,
                    seed=cfg.seed, dim=dim, backbone=backbone, train_set=train_set, cached=cached, device=dev,
                    num_workers=cfg.workers, amp=amp)):
                step_lr = cosine_lr(epoch * steps + s, steps_per_epoch=steps, epochs=cfg.epochs,
                                    warmup_epochs=cfg.warmup_epochs, base_lr=abs_lr)
                for group in opt.param_groups:
                    group["lr"] = step_lr
                loss = F.cross_entropy(head(f), lab)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sums.add(epoch * steps + s, {"loss": loss})
                bar.update(1)
            bad = sums.first_non_finite(dist.world_size())  # host sync once per epoch; all ranks agree
            if bad is not None:
                raise FloatingPointError(f"linear probe: non-finite loss at step {bad} (epoch {epoch})")
            loss_value = sums.reduce()["loss"]  # the epoch's mean
            acc = _evaluate(head, val_f, val_l, topk_accuracy)
            history.append({"epoch": epoch + 1, "loss": loss_value, **acc})
            bar.set_postfix(loss=f"{loss_value:.3f}", top1=f"{acc['top1']:.2f}")
            run.log({"step": (epoch + 1) * steps, **history[-1]})  # before the checkpoint: a resume trims it
            run.save({"head": head.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                      "step": (epoch + 1) * steps, "history": history})
        bar.close()
        final = _evaluate(head, val_f, val_l, topk_accuracy)
    metrics = {**final, "best_top1": max([h["top1"] for h in history] + [final["top1"]])}
    return metrics, settings


@torch.no_grad()
def _evaluate(head: nn.Module, feats: torch.Tensor, labels: torch.Tensor, accuracy) -> dict:
    """feats (N, D) float32, labels (N,) int64 -> top-1/top-5 percent (head in eval mode)."""
    head.eval()
    return accuracy(head(feats), labels)
