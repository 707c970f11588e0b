"""prepare / ImageSet at scale and from WebDataset hubs: the seeded packing order gives
class-mixed shards (data/pack.py), an ImageSet of 100 shards reads under a descriptor limit
(data/imageset.py), shard patterns and class names of WebDataset sources (data/imagesource.py).
The round trips, bad input and reruns: tests/data/test_shards.py."""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.imagesource import BadImage, PrepareError
from data.shards import ImageSet, pack_order, prepare


# --- packing order: class-mixed shards ----------------------------------------------------
def _tiny_jpeg(value: int) -> bytes:
    """An 8x8 RGB JPEG of a flat colour derived from ``value`` (distinct values, distinct bytes)."""
    colour = ((value * 37) % 256, (value * 91) % 256, (value * 53) % 256)
    out = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _expected_classes_iid(class_sizes: np.ndarray, draws: int) -> float:
    """E[distinct classes] among ``draws`` samples drawn uniformly (i.i.d.) from the set."""
    p = class_sizes / class_sizes.sum()
    return float(np.sum(1.0 - (1.0 - p) ** draws))


@pytest.fixture(scope="module")
def sorted_tree_set(tmp_path_factory) -> tuple[Path, ImageSet]:
    """A class-sorted ImageFolder of 200 classes x 8 tiny JPEGs, packed in shards of 16 (100 shards)."""
    root = tmp_path_factory.mktemp("sorted_tree")
    for c in range(200):
        (root / "src" / f"n{c:08d}").mkdir(parents=True)
        for j in range(8):
            (root / "src" / f"n{c:08d}" / f"img_{j}.jpg").write_bytes(_tiny_jpeg(8 * c + j))
    return root / "src", prepare(root / "src", root / "out", shard_size=16, progress=False, workers=0)


def test_shards_of_a_class_sorted_folder_are_class_mixed(sorted_tree_set):
    src, ds = sorted_tree_set
    assert len(ds) == 1600 and len(ds.shards) == 100
    per_shard = [len(set(ds.labels[s["first"]:s["first"] + s["count"]].tolist())) for s in ds.shards]
    iid = _expected_classes_iid(np.full(200, 8), 16)  # ~15.4 (16 draws of 200 classes)
    assert per_shard[0] >= 12, per_shard[0]          # in listing order it would hold 2 classes
    assert np.mean(per_shard) >= 0.9 * iid, (np.mean(per_shard), iid)
    # every file exactly once, under its folder's label
    assert sorted(ds.source(i) for i in range(len(ds))) == sorted(
        str(p.relative_to(src)) for p in src.rglob("*.jpg"))
    assert all(ds.classes[ds.labels[i]] == ds.source(i).split("/")[0] for i in range(0, len(ds), 7))


def test_seed_changes_the_order_only_and_is_checked_on_rerun(photo_tree, prepared_data, tmp_path):
    base = ImageSet.open(prepared_data)
    other = prepare(photo_tree, tmp_path / "seed1", shard_size=5, seed=1, progress=False, workers=0)
    assert other.meta["order"]["seed"] == 1 and other.digest != base.digest
    pairs = lambda ds: [(ds.source(i), int(ds.labels[i]), ds.read(i)) for i in range(len(ds))]  # noqa: E731
    assert pairs(other) != pairs(base) and sorted(pairs(other)) == sorted(pairs(base))
    with pytest.raises(PrepareError, match="seed=1, not 0. Use --seed 1"):
        prepare(photo_tree, tmp_path / "seed1", shard_size=5, progress=False, workers=0)


def test_global_batches_on_a_class_sorted_imagenet_listing_hold_iid_many_classes():
    """1000 classes in ILSVRC-2012 train proportions (895 x 1300 images, 105 smaller; 1,281,167
    in all) listed class by class, packed in shards of 256, read in the training order
    (train/loader.py Plan, default data settings, global batch 4096): no model, no images."""
    from types import SimpleNamespace

    from train.config import DataConfig
    from data.order import auto_streams
    from train.loader import Plan

    sizes = np.full(1000, 1300)
    sizes[895:] -= 179
    sizes[-1] -= 18833 - 105 * 179
    assert sizes.sum() == 1_281_167 and sizes.min() >= 732
    listing_labels = np.repeat(np.arange(1000), sizes)  # class-sorted, as an ImageFolder lists it
    iid = _expected_classes_iid(sizes, 4096)            # ~983
    defaults = DataConfig()

    def classes_per_batch(labels: np.ndarray, steps: int = 24) -> np.ndarray:
        n = len(labels)
        shards = SimpleNamespace(shards=[{"first": a, "count": min(256, n - a)} for a in range(0, n, 256)])
        # the defaults as a run resolves them: V = 4 (docs/method.md), data.streams=auto
        streams = auto_streams([(s["first"], s["count"]) for s in shards.shards], global_batch=4096)
        plan = Plan(shards, seed=defaults.seed, views=4, batch_size=4096, window=defaults.shuffle_window,
                    streams=streams)
        counts = []
        for step, _, index in plan.batch_indices(0):
            counts.append(len(np.unique(labels[index])))
            if step + 1 == steps:
                break
        return np.array(counts)

    packed = classes_per_batch(listing_labels[pack_order(len(listing_labels), seed=0)])
    assert packed.min() >= 0.9 * iid, (packed.min(), iid)
    unshuffled = classes_per_batch(listing_labels)    # the listing order (format version 1): ~38
    assert unshuffled.max() < 0.1 * iid, unshuffled.max()


# --- open descriptors ---------------------------------------------------------------------
def test_every_shard_of_a_100_shard_set_reads_under_a_limit_of_64_open_files(sorted_tree_set):
    import hashlib
    import subprocess
    import sys

    _, ds = sorted_tree_set
    order = np.concatenate([np.arange(len(ds)), np.arange(len(ds))[::-1]])  # every shard, twice
    want = hashlib.sha256(b"".join(ds.read(i) for i in order)).hexdigest()
    script = f"""
import hashlib, resource, sys
import numpy as np
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from data.shards import MAX_OPEN, ImageSet
ds = ImageSet.open({str(ds.root)!r})
order = np.concatenate([np.arange(len(ds)), np.arange(len(ds))[::-1]])
print(hashlib.sha256(b"".join(ds.read(i) for i in order)).hexdigest(), ds.open_files, MAX_OPEN)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    got, open_files, max_open = done.stdout.split()
    assert got == want
    assert 0 < int(open_files) <= int(max_open) < 64


def test_descriptors_are_bounded_and_never_closed_under_a_concurrent_read(prepared_data):
    ds = ImageSet.open(prepared_data)
    want = [ds.read(i) for i in range(len(ds))]
    order = np.random.default_rng(1).permutation(np.tile(np.arange(len(ds)), 40))
    one = ImageSet.open(prepared_data, max_open=1)  # 3 shards through one slot: constant eviction
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(one.read, order))
    assert all(got[k] == want[i] for k, i in enumerate(order))
    assert one.open_files == 1
    one.close()
    assert one.open_files == 0 and one.read(12) == want[12]


# --- WebDataset sources: a shard pattern, class names -------------------------------------
def _hub_folder(dst: Path, *, json_meta: str | None) -> Path:
    """The hub layout: imagenet1k-train-000{0,1}.tar (4 classes x 3 samples) and
    imagenet1k-validation-0000.tar (4 samples) side by side; ``json_meta``: what each
    sample's json holds (None: no json member)."""
    import webdataset as wds

    dst.mkdir()
    wnids = ["n01440764", "n01443537", "n01484850", "n01491361"]
    names = ["tench", "goldfish", "great white shark", "tiger shark"]
    parts = {"imagenet1k-train-0000.tar": range(0, 6), "imagenet1k-train-0001.tar": range(6, 12),
             "imagenet1k-validation-0000.tar": range(100, 104)}
    for tar, values in parts.items():
        with wds.TarWriter(str(dst / tar)) as sink:
            for v in values:
                label = v % 4
                sample = {"__key__": f"{wnids[label]}_{v}", "jpg": _tiny_jpeg(v), "cls": label}
                if json_meta == "class_name":
                    sample["json"] = {"label": label, "class_name": names[label]}
                elif json_meta == "filename":
                    sample["json"] = {"label": label, "filename": f"{wnids[label]}/{wnids[label]}_{v}.JPEG"}
                sink.write(sample)
    return dst


@pytest.mark.parametrize("names_from", ["classes.txt", "json class_name", "json filename", "labels"])
def test_pattern_packs_only_the_train_tars_and_class_names_come_from_the_source(tmp_path, names_from):
    from click.testing import CliRunner

    from cli import main

    src = _hub_folder(tmp_path / "hub", json_meta={"json class_name": "class_name",
                                                   "json filename": "filename"}.get(names_from))
    if names_from == "classes.txt":
        (src / "classes.txt").write_text("tench\ngoldfish\nwhite shark\ntiger shark\n")
    done = CliRunner().invoke(main, ["prepare", str(src), str(tmp_path / "out"), "--pattern", "imagenet1k-train-*.tar",
                                     "--shard-size", "5", "--no-progress", "--workers", "0"])
    assert done.exit_code == 0, done.output
    ds = ImageSet.open(tmp_path / "out")
    sources = [ds.source(i) for i in range(len(ds))]
    assert len(ds) == 12 and all(s.startswith("imagenet1k-train-000") for s in sources)
    assert sorted(int(s.split("_")[1].split(".")[0]) for s in sources) == list(range(12))
    assert ds.meta["source"]["pattern"] == "imagenet1k-train-*.tar"
    assert ds.classes == {"classes.txt": ["tench", "goldfish", "white shark", "tiger shark"],
                          "json class_name": ["tench", "goldfish", "great white shark", "tiger shark"],
                          "json filename": ["n01440764", "n01443537", "n01484850", "n01491361"],
                          "labels": ["0", "1", "2", "3"]}[names_from]
    for i in range(len(ds)):
        v = int(sources[i].split("_")[1].split(".")[0])
        assert ds.labels[i] == v % 4 and ds.read(i) == _tiny_jpeg(v)


def test_patterns_that_name_missing_or_no_tars_and_conflicting_json_names_are_refused(tmp_path):
    src = _hub_folder(tmp_path / "hub", json_meta="class_name")
    everything = prepare(src, tmp_path / "all", progress=False, workers=0)  # no pattern: every tar
    assert len(everything) == 16
    braces = prepare(src, tmp_path / "braces", pattern="imagenet1k-{train-0001,validation-0000}.tar",
                     progress=False, workers=0)
    assert len(braces) == 10
    with pytest.raises(PrepareError, match="names tars that are not in .*imagenet1k-train-0002.tar"):
        prepare(src, tmp_path / "out", pattern="imagenet1k-train-{0000..0002}.tar", progress=False)
    with pytest.raises(PrepareError, match="no \\*.tar in .* matches --pattern 'train-\\*.tar'"):
        prepare(src, tmp_path / "out", pattern="train-*.tar", progress=False)
    with pytest.raises(PrepareError, match="tars chosen by --pattern None then, 'imagenet1k-train-\\*.tar' now"):
        prepare(src, tmp_path / "all", pattern="imagenet1k-train-*.tar", progress=False)
    import webdataset as wds

    with wds.TarWriter(str(src / "imagenet1k-train-0002.tar")) as sink:
        sink.write({"__key__": "odd", "jpg": _tiny_jpeg(0), "cls": 0, "json": {"class_name": "carp"}})
    with pytest.raises(PrepareError, match="imagenet1k-train-0002.tar:odd.jpg names label 0 'carp'.*'tench'"):
        prepare(src, tmp_path / "out", progress=False)


def test_a_truncated_tar_stops_prepare_naming_it(tmp_path):
    src = _hub_folder(tmp_path / "hub", json_meta=None)
    tar = src / "imagenet1k-train-0001.tar"
    tar.write_bytes(tar.read_bytes()[:2000])
    with pytest.raises(BadImage, match="imagenet1k-train-0001.tar: damaged tar file"):
        prepare(src, tmp_path / "out", skip_bad=True, progress=False)
