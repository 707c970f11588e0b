"""Every role id of the keyed hashes (``store.views.hash_keys``), in one place.

A role is one key of every hash that draws a quantity, so that two quantities never share a
stream of values. The ids are part of what the draws are: never renumber one that anything
stored depends on, and give a new quantity a new id. ``unique`` refuses two names for one id
when this module is imported.

  1-5    crop (area, ratio, top, left; 10 attempts), flip and teacher mask of the cached views,
         keyed by (seed, index, view); student mask, keyed by (seed, index, epoch); statistics
         sample, keyed by (seed, index) -- store/views.py; stored in every feature store;
  11-12  shard order and sample order of an epoch, keyed by (seed, epoch) -- train/order.py;
         not stored (a run's checkpoint records seed and step);
  21     packing order of ``prepare``, keyed by (seed, listing position) -- store/pack.py;
         stored: it fixes which image every sample index of a prepared set is;
  31-33  fresh views (online-fresh training): crop, flip and teacher mask, keyed by
         (seed, index, epoch) -- store/views.py; not stored. Until issue 12 these were 21-23,
         and the fresh crop shared 21 with the packing order; online-fresh batches drawn before
         the change differ from those drawn after it;
  41     the run's noise (torch's global generators: stochastic depth), keyed by (seed, rank) at
         the start of a run and by (seed, rank, step) when a resume cannot restore each rank's
         own state -- train/noise.py; not stored (checkpoints hold the generator states).
"""
from __future__ import annotations

from enum import IntEnum, unique


@unique
class Role(IntEnum):
    CROP = 1
    FLIP = 2
    TEACHER = 3
    STUDENT = 4
    STATS = 5
    SHARD_ORDER = 11
    SAMPLE_ORDER = 12
    PACK_ORDER = 21
    FRESH_CROP = 31
    FRESH_FLIP = 32
    FRESH_TEACHER = 33
    NOISE = 41
