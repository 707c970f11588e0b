"""``verify``: check a feature store against its data, block by block, reading every file of every
complete block; returns the problems as strings (what is checked: docs/running.md, section 3).
What an older format version leaves unprotected is a note, not a problem."""
from __future__ import annotations

import numpy as np

from store import codecs
from data import views as V
from store.features import CONFIG_DEFAULTS, CHECKSUMS_VERSION, DataInfo, FeatureStore, StoreError
from core.progress import progress_bar
from teachers.descriptors import on_shared_grid
from store.viewpixels import ViewPixels

# Keys that every teacher of one store must share.
# Must agree between teachers; widths and patch sizes may differ, each teacher's grid must be the
# shared one (teachers/descriptors.py's grid rule).
SHARED_KEYS = ("seed", "views", "input")


def verify_report(store_path, data_path, *, teachers: list[str] | None = None, scan_values: bool = True,
                  rehash_data: bool = False) -> tuple[list[str], list[str]]:
    """The ``verify`` command's (report lines, problems) for the store and the images at
    ``data_path``: ``verify_store``'s, and with ``rehash_data`` every image shard and the sample
    table re-hashed against the manifest (``ImageSet.verify``), else a line saying they were not."""
    from data.shards import ImageSet

    images = ImageSet.open(data_path)
    problems, summary = verify_store(store_path, images, teachers=teachers, scan_values=scan_values)
    lines = [f"{name}: {t['complete']}/{t['blocks']} blocks complete, codec {t['codec']}, "
             f"{'untrained' if t['untrained'] else 'trained'} teacher" for name, t in summary.get("teachers", {}).items()]
    lines += [f"NOTE: {note}" for note in summary.get("notes", [])]
    if rehash_data:
        problems += images.verify(progress=True)
    else:
        lines.append(f"images: the {len(images.shards)} shards of {data_path} were not re-hashed "
                     "(--rehash-data re-hashes them)")
    return lines, problems


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
    summary = {"teachers": {}, "num_samples": fs.num_samples, "views": fs.views, "seed": fs.seed, "notes": []}
    version = fs.group.attrs.get("format_version")
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
        unprotected = _unprotected(ts)
        if unprotected and version >= CHECKSUMS_VERSION:
            problems.append(f"{name}: {unprotected}, which format_version {version} requires")
        elif unprotected:
            summary["notes"].append(f"{name}: {unprotected} (format_version {version} store): damaged bytes there "
                                    "go unnoticed; extract into a new store to have them")
        if not ts.has_stats:
            problems.append(f"{name}: adapter statistics missing")
        else:
            try:
                if not np.isfinite(ts.stats["components"]).all():
                    problems.append(f"{name}: adapter statistics are not finite")
                problems.extend(_check_stats_sample(ts))
            except StoreError as e:
                problems.append(str(e))
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


def _unprotected(ts) -> str | None:
    """What of a teacher's bytes has no checksum (None: all of it has): arrays written by
    format_version 1-2 code, statistics without their recorded digest."""
    missing = [] if ts.checksummed else ["its arrays have no crc32c"]
    if ts.has_stats and "digest" not in ts.group["stats"].attrs:
        missing.append("its statistics no recorded digest")
    return ", ".join(missing) or None


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
    """Every file of the block (its payload with ``scan_values``) read, so checked, then its values."""
    where = f"{ts.name} slot {slot} shard {shard}"
    try:
        b = ts.read_block(slot, shard, payload=scan_values)
    except StoreError as e:
        return [str(e)]
    out = []
    index = b["index"]
    view = V.view_of_slot(index, slot, ts.root.views)
    if not np.array_equal(b["view"], view):
        out.append(f"{where}: view numbers differ from (slot + index) mod V")
    boxes, flips = V.view_params(ts.root.seed, index, view, data.widths[index], data.heights[index])
    if not (np.array_equal(b["boxes"], boxes) and np.array_equal(b["flips"], flips)):
        out.append(f"{where}: stored crops/flips differ from the views of this data and seed")
    try:
        ts.check_masks(slot, shard, b)
    except StoreError as e:
        out.append(str(e))
    if scan_values:
        for k in ts.payload_keys:
            if b[k].dtype.kind == "f" and not np.isfinite(b[k]).all():
                out.append(f"{where}: non-finite values in {k}")
    return out
