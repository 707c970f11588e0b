"""`verify`: check a feature store against its data, block by block.

Reports (and returns as a list of problem strings): incomplete blocks; index, view, box,
flip and mask disagreement with a fresh draw from store/views.py for DATA; configuration
that differs between teachers where it must agree; statistics missing, or drawn from
another sample than ``views.stats_sample``; non-finite values; and, where the store holds
view pixels (store/viewpixels.py), view blocks that are incomplete, whose tar or index
differs from its completion record (sha256), whose members are not the block's images in
order, or that belong to other data.
"""
from __future__ import annotations

import numpy as np

from store import codecs
from store import views as V
from store.features import CONFIG_DEFAULTS, DataInfo, FeatureStore, StoreError
from store.progress import progress_bar
from store.teachers import on_shared_grid
from store.viewpixels import ViewPixels

# Keys that every teacher of one store must share.
# Must agree between teachers; widths and patch sizes may differ, each teacher's grid must be the
# shared one (store/teachers.py's grid rule).
SHARED_KEYS = ("seed", "views", "input")


def verify_store(store_path, data, *, teachers: list[str] | None = None, scan_values: bool = True,
                 progress: bool = True) -> tuple[list[str], dict]:
    """Returns (problems, summary). No problem means the store is complete and consistent."""
    problems: list[str] = []
    try:
        fs = FeatureStore.open(store_path, data=DataInfo.of(data))
    except StoreError as e:
        return [str(e)], {}
    names = teachers or fs.teachers
    if not names:
        return [f"{store_path}: the store holds no teacher"], {}
    summary = {"teachers": {}, "num_samples": fs.num_samples, "views": fs.views, "seed": fs.seed}
    configs = {}
    for name in names:
        try:
            ts = fs.teacher(name)
        except StoreError as e:
            problems.append(str(e))
            continue
        configs[name] = dict(CONFIG_DEFAULTS, **ts.config)
        missing = ts.missing()
        done = ts.complete_matrix()
        summary["teachers"][name] = dict(blocks=int(done.size), complete=int(done.sum()),
                                         codec=ts.codec, untrained=ts.config.get("untrained"))
        if missing:
            problems.append(f"{name}: {len(missing)} of {done.size} blocks incomplete "
                            f"(first: slot {missing[0][0]}, shard {missing[0][1]})")
        if not ts.has_stats:
            problems.append(f"{name}: adapter statistics missing")
        else:
            if not np.isfinite(ts.stats["components"]).all():
                problems.append(f"{name}: adapter statistics are not finite")
            problems.extend(_check_stats_sample(ts))
        blocks = [(s, k) for s in range(fs.views) for k in range(len(fs.shards)) if done[s, k]]
        for slot, shard in progress_bar(blocks, desc=f"verify {name}", unit="block", progress=progress):
            problems.extend(_check_block(ts, data, slot, shard, scan_values=scan_values))
    problems.extend(_check_view_pixels(fs, summary, progress=progress))
    for name, c in configs.items():
        if "patch_size" in c and not on_shared_grid(c["patch_size"], c.get("resolution")):
            problems.append(f"{name}: {c.get('resolution')} px with patch {c['patch_size']} is not the "
                            f"shared {V.GRID} x {V.GRID} grid")
    for key in SHARED_KEYS:
        values = {n: c.get(key) for n, c in configs.items()}
        if len(set(map(repr, values.values()))) > 1:
            problems.append(f"teachers disagree on {key}: {values}")
    return problems, summary


def _check_view_pixels(fs, summary: dict, *, progress: bool) -> list[str]:
    """Every view block of the store's pixels, if it holds any (``ViewPixels.check_block``)."""
    try:
        vp = ViewPixels.open(fs)
    except StoreError as e:
        return [str(e)]
    if vp is None:
        return []
    blocks = [(s, k) for s in range(fs.views) for k in range(len(fs.shards))]
    out = []
    for slot, shard in progress_bar(blocks, desc="verify pixels", unit="block", progress=progress):
        out.extend(vp.check_block(slot, shard))
    summary["pixels"] = dict(form=vp.form, blocks=len(blocks), complete=int(vp.complete_matrix().sum()))
    return out


def _check_stats_sample(ts) -> list[str]:
    """The recorded statistics sample must be ``views.stats_sample`` of its size; statistics
    copied from another store (``origin``) must be those it recorded (their basis digest)."""
    got, origin = ts.stats["indices"], ts.stats.get("origin")
    if origin:
        if codecs.basis_digest(ts.stats) != origin.get("basis"):
            return [f"{ts.path}/stats: differ from those copied from {origin.get('store')} (basis digest)"]
        return []
    where = f"{ts.path}/stats/indices"
    if got is None:
        return [f"{where}: missing (statistics written before their sample was recorded; "
                "extract this teacher into a new store)"]
    want = V.stats_sample(ts.root.seed, ts.root.num_samples, max(1, len(got)))
    if not np.array_equal(got, want):
        return [f"{where}: the {len(got)} recorded images are not the keyed statistics sample "
                f"of seed {ts.root.seed} (views.stats_sample)"]
    return []


def _check_block(ts, data, slot: int, shard: int, *, scan_values: bool) -> list[str]:
    where = f"{ts.name} slot {slot} shard {shard}"
    keys = ["index", "view", "boxes", "flips", "visible"] + (ts.payload_keys if scan_values else [])
    rows = ts._rows(shard)
    b = {k: ts.group[k][slot, rows] for k in keys}
    out = []
    index = np.arange(rows.start, rows.stop)
    if not np.array_equal(b["index"], index):
        return [f"{where}: sample ids do not match the data's indices"]
    view = V.view_of_slot(index, slot, ts.root.views)
    if not np.array_equal(b["view"], view):
        out.append(f"{where}: view numbers differ from (slot + index) mod V")
    boxes, flips = V.view_params(ts.root.seed, index, view, data.widths[index], data.heights[index])
    if not (np.array_equal(b["boxes"], boxes) and np.array_equal(b["flips"], flips)):
        out.append(f"{where}: stored crops/flips differ from the views of this data and seed")
    visible = V.teacher_visible(ts.root.seed, index, view, ts.name, mask_ratio=ts.config["mask_ratio"])
    if not np.array_equal(b["visible"], visible):
        out.append(f"{where}: stored masks differ from the masks of this seed")
    if scan_values:
        for k in ts.payload_keys:
            if b[k].dtype.kind == "f" and not np.isfinite(b[k]).all():
                out.append(f"{where}: non-finite values in {k}")
    return out
