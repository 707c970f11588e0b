"""Every byte of a store a reader trusts is checked: a flipped payload, index, scale or statistics
byte, a lost payload file, a damaged view tar or masks other than the keyed draw are named by
`verify` (teacher, slot, shard, file) and refused in one line by the training read path; a store
written before the checksums (format_version 2) still opens and `verify` says what it lacks."""
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from zarr.codecs import ZstdCodec

from cli import main
from store.verify import verify_store
from store import codecs
from store import features, teacherstore
from data import views as V
from store.features import DataInfo, FeatureStore, StoreError
from data.shards import ImageSet
from store.viewpixels import ViewPixels
from train.loader import CachedSource, Plan
from train.runstore import RunStore

VIEWS, WIDTH, TEACHER = 2, 8, "mae"
SLOT, SHARD = 1, 1                     # the damaged block; training epoch 1 reads slot 1


def _write(path, data, codec: str, *, views: int = VIEWS, view_pixels: bool = False) -> None:
    """A one-teacher store of ``data`` with the keyed crops and masks and seeded-noise tokens
    ``WIDTH`` wide, its statistics, and (``view_pixels``) raw view pixels, all through the writers."""
    fs = FeatureStore.create_or_open(path, data=DataInfo.of(data), views=views, seed=0)
    ratio = V.MASK_RATIOS[TEACHER]
    n = V.num_visible(ratio)
    ts = fs.create_teacher(TEACHER, dict(codec=codec, n_visible=n, mask_ratio=ratio, embed_dim=WIDTH,
                                         checkpoint_digest="test", untrained=True))
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((WIDTH, WIDTH)))
    ts.write_stats(rng.standard_normal(WIDTH), q.T, np.linspace(2, 1, WIDTH), 100,
                   indices=V.stats_sample(0, len(data), 4))
    vp = ViewPixels.create_or_open(fs, "raw") if view_pixels else None
    for slot in range(views):
        for k, (first, count) in enumerate(fs.shards):
            index = np.arange(first, first + count)
            view = V.view_of_slot(index, slot, views)
            boxes, flips = V.view_params(0, index, view, data.widths[index], data.heights[index])
            tokens = torch.from_numpy(rng.standard_normal((count, n + 1, WIDTH)).astype(np.float32))
            ts.write_block(slot, k, index=index, view=view, boxes=boxes, flips=flips,
                           visible=V.teacher_visible(0, index, view, TEACHER), payload=codecs.encode(codec, tokens))
            if vp is not None:
                vp.write_block(slot, k, index=index, pixels=np.zeros((count, 224, 224, 3), np.uint8))


@pytest.fixture(scope="module")
def stores(prepared_data, tmp_path_factory):
    root, data = tmp_path_factory.mktemp("checksums"), ImageSet.open(prepared_data)
    for codec in ("fp16", "int8"):
        _write(root / codec, data, codec, view_pixels=codec == "int8")
    return root


def _copy(stores, codec, tmp_path):
    shutil.copytree(stores / codec, tmp_path / "store")
    return tmp_path / "store"


def _block_file(store, key: str, slot: int = SLOT, shard: int = SHARD):
    """The one file of a block of array ``key`` (chunk key c/slot/shard/0...)."""
    extra = {"tokens": 2, "scale": 1, "visible": 1}[key]
    return store.joinpath(TEACHER, key, "c", str(slot), str(shard), *["0"] * extra)


def _flip(file, offset: int) -> None:
    raw = bytearray(file.read_bytes())
    raw[offset] ^= 0x10
    file.write_bytes(bytes(raw))


def _train_reads(store, data, epoch: int = SLOT, pixels: str = "source", views: int = VIEWS) -> None:
    """Every batch of ``epoch`` through the cached source's read path (``train/loader.py``)."""
    plan = Plan(data, seed=0, views=views, batch_size=4, window=2, streams=2)
    source = CachedSource(plan, RunStore.open(store, plan.data, seed=plan.seed, teachers=(TEACHER,), pixels=pixels),
                          decoder="pil")
    for _ in source.epoch(epoch):
        pass


def _refused_naming(store, data, file, **kw) -> str:
    """The one-line StoreError of the training read path, which names teacher, block and file."""
    with pytest.raises(StoreError) as e:
        _train_reads(store, data, **kw)
    message = str(e.value)
    assert "\n" not in message and str(file) in message
    return message


@pytest.mark.parametrize("codec, key, offset", [
    ("fp16", "tokens", 100),            # a float16 token of the first inner chunk
    ("fp16", "tokens", -10),            # the zarr shard's index (its own crc32c)
    ("int8", "tokens", 100),            # an int8 coefficient
    ("int8", "scale", 100),             # a float16 per-token scale
])
def test_a_flipped_payload_byte_is_named_by_verify_and_refused_by_train(stores, prepared_data, tmp_path,
                                                                         codec, key, offset):
    store, data = _copy(stores, codec, tmp_path), ImageSet.open(prepared_data)
    file = _block_file(store, key)
    _flip(file, offset)
    problems, _ = verify_store(store, data, progress=False)
    assert problems == [f"{file} fails its crc32c checksum: teacher 'mae', block (slot {SLOT}, shard {SHARD}) is "
                        "damaged; restore the file from a copy, or extract this teacher into a new store"]
    assert _refused_naming(store, data, file) == problems[0]


def test_a_deleted_payload_file_of_a_complete_block_is_named_by_verify_and_refused_by_train(
        stores, prepared_data, tmp_path):
    store, data = _copy(stores, "int8", tmp_path), ImageSet.open(prepared_data)
    file = _block_file(store, "tokens")
    file.unlink()                       # once read as zeros: all-zero targets
    for scan_values in (True, False):   # the files are listed even when the payload is not read
        problems, _ = verify_store(store, data, scan_values=scan_values, progress=False)
        assert problems == [f"{file} is missing: teacher 'mae', block (slot {SLOT}, shard {SHARD}) is damaged; "
                            "restore the file from a copy, or extract this teacher into a new store"]
    assert _refused_naming(store, data, file) == problems[0]
    with pytest.raises(StoreError, match="is missing"):
        FeatureStore.open(store).teacher(TEACHER).read_samples(SLOT, [0, 6])


@pytest.mark.parametrize("damage", ["value", "byte"])
def test_damaged_statistics_are_named_by_verify_and_refused_when_read(stores, prepared_data, tmp_path, damage):
    store, data = _copy(stores, "fp16", tmp_path), ImageSet.open(prepared_data)
    stats = FeatureStore.open(store).teacher(TEACHER).group["stats"]
    if damage == "value":               # a valid array with one value changed: only the digest sees it
        mean = stats["mean"][...]
        mean[3] = -mean[3]
        stats["mean"][...] = mean
        want = f"{store / TEACHER}/stats: teacher 'mae': the statistics"
    else:                               # a flipped byte of the stored file: its crc32c
        _flip(store / TEACHER / "stats" / "components" / "c" / "0" / "0", 20)
        want = f"{store / TEACHER}/stats/components fails its crc32c checksum: teacher 'mae'"
    problems, _ = verify_store(store, data, progress=False)
    assert len(problems) == 1 and problems[0].startswith(want)
    with pytest.raises(StoreError) as e:    # what training reads when it opens the store (train/sources.py)
        FeatureStore.open(store).teacher(TEACHER).stats
    assert str(e.value) == problems[0] and "\n" not in problems[0]


def test_a_damaged_view_tar_is_named_by_verify_and_refused_by_train(stores, prepared_data, tmp_path):
    store, data = _copy(stores, "int8", tmp_path), ImageSet.open(prepared_data)
    tar = store / "pixels" / f"slot-{SLOT}" / f"shard-{SHARD:06d}.tar"
    _flip(tar, 5000)
    problems, _ = verify_store(store, data, progress=False)
    assert len(problems) == 1 and f"{tar} differs from its completion record" in problems[0]
    message = _refused_naming(store, data, tar, pixels="views")
    assert message.startswith(f"{tar} differs from its completion record (crc32c): view block (slot {SLOT}, "
                              f"shard {SHARD}) is damaged; delete shard-{SHARD:06d}.json beside it")


def test_masks_other_than_the_keyed_draw_are_named_by_verify_and_refused_by_train(stores, prepared_data,
                                                                                   tmp_path):
    store, data = _copy(stores, "fp16", tmp_path), ImageSet.open(prepared_data)
    ts = FeatureStore.open(store).teacher(TEACHER)
    rows = slice(ts.root.shards[SHARD][0], sum(ts.root.shards[SHARD]))
    visible = ts.group["visible"][SLOT, rows]
    visible[0] = visible[1]             # valid bytes (its checksum rewritten), another mask
    ts.group["visible"][SLOT, rows] = visible
    file = _block_file(store, "visible")
    problems, _ = verify_store(store, data, progress=False)
    assert len(problems) == 1 and problems[0].startswith(f"{file}: teacher 'mae', block (slot {SLOT}, shard "
                                                         f"{SHARD}): stored masks differ from the masks of this seed")
    assert _refused_naming(store, data, file) == problems[0]


def test_a_version_2_store_without_checksums_opens_and_verify_notes_what_it_lacks(prepared_data, tmp_path,
                                                                                  monkeypatch):
    data = ImageSet.open(prepared_data)
    with monkeypatch.context() as m:    # written as format_version 2 code wrote stores
        m.setattr(features, "FORMAT_VERSION", 2)
        m.setattr(features, "PAYLOAD_COMPRESSORS", None)
        m.setattr(features, "SMALL_COMPRESSORS", (ZstdCodec(level=1),))
        m.setattr(teacherstore, "WRITE", {"write_empty_chunks": False})      # all-zero chunks skipped
        _write(tmp_path / "old", data, "fp16", views=1)
    ts = FeatureStore.open(tmp_path / "old").teacher(TEACHER)
    del ts.group["stats"].attrs["digest"]
    ts = FeatureStore.open(tmp_path / "old").teacher(TEACHER)
    assert not ts.checksummed and ts.root.group.attrs["format_version"] == 2
    # one view: every view number is 0, a chunk that writer skipped, and it reads as written
    assert not (tmp_path / "old" / TEACHER / "view" / "c" / "0" / "0").exists()
    assert ts.read_block(0, 0)["view"].tolist() == [0] * 5 and ts.stats["count"] == 100
    problems, summary = verify_store(tmp_path / "old", data, progress=False)
    assert problems == [] and summary["notes"] == [
        "mae: its arrays have no crc32c, its statistics no recorded digest (format_version 2 store): damaged "
        "bytes there go unnoticed; extract into a new store to have them"]
    r = CliRunner().invoke(main, ["verify", str(tmp_path / "old"), "--data", str(prepared_data)])
    assert r.exit_code == 0 and f"NOTE: {summary['notes'][0]}\n" in r.output
    _train_reads(tmp_path / "old", data, epoch=0, views=1)


def test_a_version_3_store_whose_arrays_lack_checksums_is_a_problem_for_verify(prepared_data, tmp_path,
                                                                               monkeypatch):
    data = ImageSet.open(prepared_data)
    with monkeypatch.context() as m:    # arrays as version 2 wrote them, in a store that says 3
        m.setattr(features, "PAYLOAD_COMPRESSORS", None)
        _write(tmp_path / "stripped", data, "fp16", views=1)
    problems, summary = verify_store(tmp_path / "stripped", data, progress=False)
    assert problems == ["mae: its arrays have no crc32c, which format_version 3 requires"] and summary["notes"] == []


def test_a_flipped_image_byte_is_named_by_verify_rehash_and_refused_by_train(stores, prepared_data, tmp_path):
    """The image shards: verify --rehash-data names the tar, and training from the images (the
    fp16 store holds no view pixels) refuses the damaged image by its crc32c, naming it."""
    from store.verify import verify_report

    copy = tmp_path / "data"
    shutil.copytree(prepared_data, copy)
    data = ImageSet.open(copy)
    tar = data.tar_path(SHARD)
    damaged = np.flatnonzero(data.shard_of == SHARD)              # each image of the shard: an epoch
    for i in damaged:                                             # leaves out a remainder of images
        _flip(tar, int(data.offsets[i]) + int(data.sizes[i]) // 2)
    lines, problems = verify_report(stores / "fp16", copy)
    assert problems == [] and f"images: the 3 shards of {copy} were not re-hashed (--rehash-data re-hashes them)" in lines
    _, problems = verify_report(stores / "fp16", copy, rehash_data=True)
    assert problems == [f"{tar}: its sha256 differs from the one in {copy / 'manifest.json'} (its bytes changed "
                        "after prepare)"]
    with pytest.raises(OSError) as e:
        _train_reads(stores / "fp16", data, epoch=0)
    assert any(str(e.value) == (f"ImageSet: image {i} ({data.source(i)}, in {tar}): its bytes differ from their crc32c "
                                f"in {copy / 'manifest.columns'} (the shard is damaged); restore it, or prepare the "
                                "source again") for i in damaged), str(e.value)


def test_a_full_disk_while_a_block_is_written_names_its_file_and_leaves_it_incomplete(prepared_data, tmp_path,
                                                                                     monkeypatch):
    import errno

    data = ImageSet.open(prepared_data)
    _write(tmp_path / "store", data, "fp16", views=1)
    ts = FeatureStore.open(tmp_path / "store").teacher(TEACHER)
    block = ts.read_block(0, 0)
    ts.group["complete"][0, 0] = 0                                  # to be written again

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(teacherstore, "fsync_tree", full)
    with pytest.raises(OSError) as e:
        ts.write_block(0, 0, payload={"tokens": block["tokens"]},
                       **{k: block[k] for k in ("index", "view", "boxes", "flips", "visible")})
    assert e.value.errno == errno.ENOSPC and str(e.value) == (
        f"[Errno 28] cannot write {ts.block_file('index', 0, 0)} (teacher 'mae', block (slot 0, shard 0)): No space "
        "left on device; the block stays incomplete, and a rerun of extract writes it again")
    assert not ts.is_complete(0, 0)
