"""The one definition of a view: crop box, flip and patch masks, cached and fresh, and the
statistics sample (docs/method.md, "Views and masks"). Every draw is a hash of its keys (seed,
image index, view or epoch, role[, teacher]; roles in core/keys.py), so it does not depend on
batch order, worker count, world size or machine; vectorised numpy on ``uint64``."""
from __future__ import annotations

import math

import numpy as np

from core.keys import Role, hash_keys, uniform
from teachers.descriptors import DESCRIPTORS, STUDENT_GRID, descriptor

GRID = STUDENT_GRID            # the shared grid of the student and every teacher (teachers/descriptors.py)
NUM_PATCHES = GRID * GRID      # 196 patches
STUDENT_VISIBLE = NUM_PATCHES // 4   # 49: 25% visible
CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10

# Per described teacher (teachers/descriptors.py): the id that keys its masks, the fraction of
# patches masked; ``teacher_id`` and the mask draws also know timm teachers (``descriptor``).
TEACHER_IDS = {name: d.key_id for name, d in DESCRIPTORS.items()}
MASK_RATIOS = {name: d.mask_ratio for name, d in DESCRIPTORS.items()}


def _as_index(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers, got {x.dtype}")
    return x.astype(np.int64)


def view_params(seed: int, indices, views, widths, heights, *,
                scale=CROP_SCALE, ratio=CROP_RATIO) -> tuple[np.ndarray, np.ndarray]:
    """RandomResizedCrop box and horizontal flip of view ``v`` of image ``i``.

    Args:
        seed: int, the run's root seed.
        indices: (B,) int, global image indices.
        views: (B,) int (or a scalar), view numbers.
        widths, heights: (B,) int, original image sizes in pixels.
    Returns:
        boxes: (B, 4) int64 ``[x, y, w, h]`` in original pixels (0 <= x, x + w <= W).
        flips: (B,) bool.

    The algorithm is torchvision's RandomResizedCrop.get_params (10 attempts of a
    random area in ``scale`` and log-uniform aspect ratio in ``ratio``, else a centre
    crop clamped to the ratio bounds), with every draw taken from the hash of
    (seed, index, view, role, attempt) instead of a global generator.
    """
    idx = _as_index(indices, "indices")
    view = np.broadcast_to(_as_index(views, "views"), idx.shape)
    return _crop_and_flip(seed, idx, view, widths, heights, roles=(Role.CROP, Role.FLIP),
                          scale=scale, ratio=ratio)


def fresh_view_params(seed: int, indices, epoch, widths, heights, *,
                      scale=CROP_SCALE, ratio=CROP_RATIO) -> tuple[np.ndarray, np.ndarray]:
    """The fresh view of image ``i`` at ``epoch`` (online-fresh training): the same
    RandomResizedCrop and flip as :func:`view_params`, keyed by (seed, index, epoch) under
    their own roles, so no epoch repeats another's crop.

    Args: indices (B,) int; epoch int or (B,) int; widths, heights (B,) int.
    Returns: boxes (B, 4) int64 ``[x, y, w, h]``, flips (B,) bool.
    """
    idx = _as_index(indices, "indices")
    ep = np.broadcast_to(_as_index(epoch, "epoch"), idx.shape)
    return _crop_and_flip(seed, idx, ep, widths, heights, roles=(Role.FRESH_CROP, Role.FRESH_FLIP),
                          scale=scale, ratio=ratio)


def _crop_and_flip(seed: int, idx: np.ndarray, key: np.ndarray, widths, heights, *, roles: tuple[int, int],
                   scale, ratio) -> tuple[np.ndarray, np.ndarray]:
    """Crop boxes (B, 4) and flips (B,) drawn from hashes of (seed, idx, key, role, ...)."""
    crop_role, flip_role = roles
    W = np.broadcast_to(np.asarray(widths, dtype=np.int64), idx.shape)
    H = np.broadcast_to(np.asarray(heights, dtype=np.int64), idx.shape)
    if idx.size and (W.min() < 1 or H.min() < 1):
        raise ValueError("image sizes must be positive")
    base = (seed, idx[:, None], key[:, None], crop_role)
    attempt = np.arange(CROP_ATTEMPTS, dtype=np.int64)[None, :] * 4
    u_area, u_ratio, u_top, u_left = (uniform(*base, attempt + j) for j in range(4))

    area = (W * H).astype(np.float64)[:, None]
    target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u_ratio)
    w = np.rint(np.sqrt(target * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    ok = (w > 0) & (h > 0) & (w <= W[:, None]) & (h <= H[:, None])
    top = np.floor(u_top * (H[:, None] - h + 1)).astype(np.int64)
    left = np.floor(u_left * (W[:, None] - w + 1)).astype(np.int64)

    first = np.argmax(ok, axis=1)
    rows = np.arange(idx.size)
    bw, bh = w[rows, first], h[rows, first]
    bx, by = left[rows, first], top[rows, first]

    # Fallback: centre crop with the aspect ratio clamped to the bounds.
    none_ok = ~ok.any(axis=1)
    if none_ok.any():
        Wf, Hf = W[none_ok], H[none_ok]
        in_ratio = Wf / Hf
        fw = np.where(in_ratio < ratio[0], Wf,
                      np.where(in_ratio > ratio[1], np.rint(Hf * ratio[1]).astype(np.int64), Wf))
        fh = np.where(in_ratio < ratio[0], np.rint(Wf / ratio[0]).astype(np.int64),
                      np.where(in_ratio > ratio[1], Hf, Hf))
        bw[none_ok], bh[none_ok] = fw, fh
        bx[none_ok], by[none_ok] = (Wf - fw) // 2, (Hf - fh) // 2

    boxes = np.stack([bx, by, bw, bh], axis=1).astype(np.int64)
    flips = uniform(seed, idx, key, flip_role) < 0.5
    return boxes, flips


def _random_subset(h: np.ndarray, n: int) -> np.ndarray:
    """Rows of uint64 hashes (B, P) -> (B, n) int64: the n smallest, ascending ids."""
    order = np.argsort(h, axis=1, kind="stable")[:, :n]
    return np.sort(order, axis=1).astype(np.int64)


def num_visible(mask_ratio: float, num_patches: int = NUM_PATCHES) -> int:
    """round((1 - r) * P): 98 / 118 / 137 of 196 for r = 0.5 / 0.4 / 0.3."""
    return int(round((1.0 - mask_ratio) * num_patches))


def teacher_id(teacher) -> int:
    if isinstance(teacher, (int, np.integer)):
        return int(teacher)
    return descriptor(teacher).key_id


def teacher_visible(seed: int, indices, views, teacher, *, mask_ratio: float | None = None,
                    num_patches: int = NUM_PATCHES) -> np.ndarray:
    """Visible patch ids of ``teacher`` for (image, view).

    Args:
        indices: (B,) int; views: (B,) int or scalar; teacher: name or id.
        mask_ratio: fraction masked; defaults to the teacher's descriptor's.
    Returns: (B, n_k) int64 ascending in [0, num_patches), n_k = num_visible(mask_ratio).
    """
    idx = _as_index(indices, "indices")
    view = np.broadcast_to(_as_index(views, "views"), idx.shape)
    return _teacher_subset(seed, idx, view, Role.TEACHER, teacher, mask_ratio, num_patches)


def fresh_teacher_visible(seed: int, indices, epoch, teacher, *, mask_ratio: float | None = None,
                          num_patches: int = NUM_PATCHES) -> np.ndarray:
    """Visible patch ids of ``teacher`` on the fresh view of (image, epoch), keyed by
    (seed, index, epoch) under their own role: (B, n_k) int64 ascending."""
    idx = _as_index(indices, "indices")
    ep = np.broadcast_to(_as_index(epoch, "epoch"), idx.shape)
    return _teacher_subset(seed, idx, ep, Role.FRESH_TEACHER, teacher, mask_ratio, num_patches)


def _teacher_subset(seed: int, idx: np.ndarray, key: np.ndarray, role: int, teacher, mask_ratio,
                    num_patches: int) -> np.ndarray:
    tid = teacher_id(teacher)
    if mask_ratio is None:
        if not isinstance(teacher, str):
            raise ValueError("mask_ratio is required when the teacher is given by id")
        mask_ratio = descriptor(teacher).mask_ratio
    patch = np.arange(num_patches, dtype=np.int64)[None, :]
    h = hash_keys(seed, idx[:, None], key[:, None], role, tid, patch)
    return _random_subset(h, num_visible(mask_ratio, num_patches))


def student_visible(seed: int, indices, epoch: int, *, n_visible: int = STUDENT_VISIBLE,
                    num_patches: int = NUM_PATCHES) -> np.ndarray:
    """The student's visible patch ids for (image, epoch): (B, n_visible) int64 ascending."""
    idx = _as_index(indices, "indices")
    ep = np.broadcast_to(_as_index(epoch, "epoch"), idx.shape)
    if not 0 < n_visible <= num_patches:
        raise ValueError(f"n_visible must be in (0, {num_patches}], got {n_visible}")
    patch = np.arange(num_patches, dtype=np.int64)[None, :]
    h = hash_keys(seed, idx[:, None], ep[:, None], Role.STUDENT, patch)
    return _random_subset(h, n_visible)


def epoch_view(indices, epoch: int, num_views: int) -> np.ndarray:
    """View used for image i at epoch e: (e + i) mod V. (B,) int64."""
    return (_as_index(indices, "indices") + int(epoch)) % int(num_views)


def slot_of(indices, views, num_views: int) -> np.ndarray:
    """Storage slot of (i, v): s = (v - i) mod V, so epoch e reads slot e mod V only."""
    return (_as_index(views, "views") - _as_index(indices, "indices")) % int(num_views)


def view_of_slot(indices, slot: int, num_views: int) -> np.ndarray:
    """Inverse of ``slot_of``: the view of image i held in slot s, (s + i) mod V."""
    return (_as_index(indices, "indices") + int(slot)) % int(num_views)


def stats_sample(seed: int, num_samples: int, count: int) -> np.ndarray:
    """The images whose slot-0 tokens give a teacher's statistics (adapters, ``pca`` codec).

    Returns (min(count, num_samples),) int64, ascending: the ``count`` indices of smallest
    hash(seed, index, role), ties broken by the smaller index. That is a uniform sample
    without replacement of the whole set, whatever order the images are stored in (a
    class-sorted set gives as many classes as i.i.d. sampling), the same for every teacher
    and rank, and a larger ``count`` only adds indices (the sample of n is a prefix, by
    hash, of the sample of n + 1).
    """
    n, count = int(num_samples), int(count)
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if count >= n:
        return np.arange(n, dtype=np.int64)
    h = hash_keys(seed, np.arange(n, dtype=np.int64), Role.STATS)
    threshold = np.partition(h, count - 1)[count - 1]
    below = np.flatnonzero(h < threshold)
    tied = np.flatnonzero(h == threshold)[: count - below.size]
    return np.sort(np.concatenate([below, tied])).astype(np.int64)
