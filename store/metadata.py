"""What a feature store's metadata may say, checked when it is opened (docs/format.md, "Checks
at open"): the root's attributes, a teacher's config, and each array's shape, dtype and chunks
against the ones its writer would create. Every check returns the problems it finds as short
strings (the caller names the file), and looks only at numbers, never allocating from them.
"""
from __future__ import annotations

from itertools import accumulate

import zarr

from store import codecs
from data.views import NUM_PATCHES

# Views per image a root may claim: each is a whole extraction of every teacher, so more is a
# damaged or crafted root (and slot loops over V x shards would run for minutes).
MAX_VIEWS = 1024


def _count(value, low: int, high: int | None = None) -> bool:
    """Whether ``value`` is an integer (not a bool) in low..high."""
    return (isinstance(value, int) and not isinstance(value, bool) and value >= low
            and (high is None or value <= high))


def root_problems(attrs: dict) -> list[str]:
    """The root's ``views`` (1..MAX_VIEWS), ``seed``, ``data_digest``, ``num_samples`` and
    ``shards``: [first, count] pairs that follow one another from 0, all of one count but the
    last, and hold ``num_samples`` samples in all."""
    out = []
    views, num, shards = attrs.get("views"), attrs.get("num_samples"), attrs.get("shards")
    if not _count(views, 1, MAX_VIEWS):
        out.append(f"views {views!r} is not a count in 1..{MAX_VIEWS}")
    if not _count(attrs.get("seed"), 0):
        out.append(f"seed {attrs.get('seed')!r} is not a non-negative integer")
    if not isinstance(attrs.get("data_digest"), str):
        out.append(f"data_digest {attrs.get('data_digest')!r} is not a string")
    if not _count(num, 1):
        out.append(f"num_samples {num!r} is not a positive count")
    if not (isinstance(shards, list) and shards and all(
            isinstance(s, (list, tuple)) and len(s) == 2 and _count(s[0], 0) and _count(s[1], 1) for s in shards)):
        return out + ["shards is not a list of [first, count] pairs of counts"]
    firsts, counts = [f for f, _ in shards], [c for _, c in shards]
    if firsts != [0, *accumulate(counts[:-1])]:
        out.append("shards do not follow one another from image 0")
    if len(set(counts[:-1])) > 1:
        out.append(f"image shards hold different counts {sorted(set(counts[:-1]))} (all must hold the same "
                   "but the last)")
    if _count(num, 1) and sum(counts) != num:
        out.append(f"shards hold {sum(counts)} samples, num_samples says {num}")
    return out


def config_problems(config: dict, *, name: str, views: int, seed: int, inputs: tuple[str, ...]) -> list[str]:
    """A teacher's config (its defaults filled in) against its group's ``name``, the root's
    ``views`` and ``seed``, and bounds on what sizes its arrays: ``codec`` one of the codecs,
    ``n_visible`` in 1..196, ``embed_dim`` >= 1, ``pca_dim`` in 1..embed_dim for the pca codec,
    ``input`` one of ``inputs``."""
    out = []
    for key, want in (("teacher", name), ("views", views), ("seed", seed)):
        if config.get(key) != want:
            out.append(f"{key} {config.get(key)!r} where the store has {want!r}")
    codec, width = config.get("codec"), config.get("embed_dim")
    if codec not in codecs.CODECS:
        out.append(f"codec {codec!r} is not one of {codecs.CODECS}")
    if not _count(config.get("n_visible"), 1, NUM_PATCHES):
        out.append(f"n_visible {config.get('n_visible')!r} is not a count in 1..{NUM_PATCHES}")
    if not _count(width, 1):
        out.append(f"embed_dim {width!r} is not a positive count")
    elif codec == "pca" and not _count(config.get("pca_dim"), 1, width):
        out.append(f"pca_dim {config.get('pca_dim')!r} is not a count in 1..embed_dim ({width})")
    if config.get("input") not in inputs:
        out.append(f"input {config.get('input')!r} is not one of {inputs}")
    return out


def array_problems(got: zarr.Array, want: zarr.Array, fields: tuple[str, ...]) -> list[str]:
    """Where the metadata of ``got`` (in the store) differs from ``want`` (the writer's layout) in
    ``fields`` (of shape, dtype, chunks, shards)."""
    return [f"{what} {getattr(got, what)} where the store's attributes and the teacher's config give "
            f"{getattr(want, what)}" for what in fields if getattr(got, what) != getattr(want, what)]
