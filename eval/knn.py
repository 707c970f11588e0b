"""Weighted k-NN classification on frozen CLS features (the DINO protocol), the similarities
computed for blocks of queries under a fixed element budget (docs/eval.md, "k-NN")."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from eval.config import KnnConfig
from core.progress import progress_bar

__all__ = ["extract_features", "knn_scores", "knn_accuracy", "topk_accuracy", "run_knn"]


@torch.inference_mode()
def extract_features(model: nn.Module, loader, *, device: torch.device,
                     desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised CLS features of every image the loader yields, in order.

    Returns feats (N, D) float32 on the CPU (computed in fp32) and labels (N,) int64.
    """
    from eval.common import cls_features

    model = model.to(device).eval()
    feats, labels = [], []
    for images, target in progress_bar(loader, desc=desc, unit="batch", leave=False):
        f = cls_features(model, images.to(device, non_blocking=True).float()).float()
        feats.append(F.normalize(f, dim=1).cpu())
        labels.append(torch.as_tensor(target, dtype=torch.int64))
    if not feats:
        raise ValueError(f"{desc}: the loader yielded no images")
    return torch.cat(feats), torch.cat(labels)


@torch.inference_mode()
def knn_scores(memory: torch.Tensor, memory_labels: torch.Tensor, queries: torch.Tensor, *,
               num_classes: int, k: int = 20, temperature: float = 0.07,
               max_elements: int = 1 << 26) -> torch.Tensor:
    """Class votes of the k nearest memory features for every query.

    memory: (N, D) float, L2-normalised; memory_labels: (N,) int64 in [0, num_classes);
    queries: (Q, D) float, L2-normalised, on the same device as memory.
    Each of the k most similar memory entries (cosine) adds exp(sim / temperature) to
    its class. Queries are processed in blocks of max(1, max_elements // N) rows, so
    the similarity matrix never exceeds ``max_elements`` entries.
    Returns scores (Q, num_classes) float32.
    """
    n = memory.shape[0]
    if n == 0:
        raise ValueError("k-NN: the memory (train) set is empty")
    if memory.shape[1] != queries.shape[1]:
        raise ValueError(f"k-NN: memory width {memory.shape[1]} != query width {queries.shape[1]}")
    if k < 1:
        raise ValueError(f"k-NN: k must be >= 1, got {k}")
    if int(memory_labels.min()) < 0 or int(memory_labels.max()) >= num_classes:
        raise ValueError(f"k-NN: memory labels outside [0, {num_classes})")
    k = min(k, n)
    block = max(1, max_elements // n)
    memory = memory.float()
    memory_labels = memory_labels.to(memory.device)
    out = torch.empty(queries.shape[0], num_classes, dtype=torch.float32)
    for start in range(0, queries.shape[0], block):
        q = queries[start:start + block].float()
        sim = q @ memory.T                                     # (b, N)
        top_sim, top_idx = sim.topk(k, dim=1)                  # (b, k)
        weight = (top_sim / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes, device=memory.device)
        votes.scatter_add_(1, memory_labels[top_idx], weight)
        out[start:start + q.shape[0]] = votes.cpu()
    return out


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor,
                  ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Percent of rows whose label is among the top-k scores.

    scores: (Q, C) float; labels: (Q,) int64. Keys ``top{k}``; k is capped at C.
    """
    if scores.shape[0] == 0:
        raise ValueError("accuracy of an empty set")
    labels = labels.to(scores.device)
    order = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices   # (Q, kmax)
    hit = order == labels[:, None]
    return {f"top{k}": 100.0 * hit[:, :k].any(dim=1).float().mean().item() for k in ks}


def knn_accuracy(memory: torch.Tensor, memory_labels: torch.Tensor, queries: torch.Tensor,
                 query_labels: torch.Tensor, *, num_classes: int, k: int = 20,
                 temperature: float = 0.07, max_elements: int = 1 << 26) -> dict[str, float]:
    """Top-1 and top-5 (percent) of the weighted k-NN vote; shapes as ``knn_scores``,
    query_labels (Q,) int64."""
    scores = knn_scores(memory, memory_labels, queries, num_classes=num_classes, k=k,
                        temperature=temperature, max_elements=max_elements)
    return topk_accuracy(scores, query_labels)


def run_knn(cfg: KnnConfig, *, device: str = "auto") -> tuple[dict[str, float], dict[str, Any]]:
    """The whole protocol (``cfg``: eval/config.py): load, extract train and val features, vote.

    Returns (metrics, settings) for ``write_result``.
    """
    from eval.common import input_size_of, load_backbone, resolve_device
    from eval.data import CROP_PCT, EvalImages, eval_transform, make_loader

    dev = resolve_device(device)
    net = load_backbone(cfg.checkpoint, model=cfg.model, **cfg.timm_kwargs)
    size = input_size_of(net)
    tf = eval_transform(size)
    train_set = EvalImages(cfg.train, transform=tf, task="eval knn")
    val_set = EvalImages(cfg.val, transform=tf, classes=train_set.classes, task="eval knn")
    loader = lambda ds: make_loader(ds, batch_size=cfg.batch_size, shuffle=False,  # noqa: E731
                                    num_workers=cfg.workers, pin_memory=dev.type == "cuda")
    mem, mem_labels = extract_features(net, loader(train_set), device=dev, desc="train features")
    qry, qry_labels = extract_features(net, loader(val_set), device=dev, desc="val features")
    metrics = knn_accuracy(mem.to(dev), mem_labels, qry.to(dev), qry_labels,
                           num_classes=len(train_set.classes), k=cfg.k, temperature=cfg.temperature,
                           max_elements=cfg.max_elements)
    settings = {
        "protocol": "DINO weighted k-NN on L2-normalised CLS features (fp32), cosine",
        "k": cfg.k, "k_effective": min(cfg.k, len(train_set)), "temperature": cfg.temperature,
        "model": cfg.model, "timm_kwargs": cfg.timm_kwargs, "input_size": size,
        "transform": f"resize {int(round(size / CROP_PCT))} bicubic, center crop {size}, "
                     f"ImageNet mean/std",
        "train": str(cfg.train), "val": str(cfg.val), "train_images": len(train_set),
        "val_images": len(val_set), "num_classes": len(train_set.classes),
        "feature_dim": int(mem.shape[1]), "device": str(dev),
    }
    return metrics, settings
