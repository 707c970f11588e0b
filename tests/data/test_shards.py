"""prepare / ImageSet: the packed-image format (data/shards.py, data/pack.py, data/imageset.py,
data/imagesource.py); the packing order at scale and WebDataset hubs: tests/data/test_pack.py."""
from __future__ import annotations

import io
import json
import pickle
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.imagesource import BadImage, PrepareError
from samples.photos import PHOTOS
from data.shards import ImageSet, pack_order, prepare


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _small_tree(photo_tree: Path, dst: Path, per_class: int = 2) -> Path:
    """A copy of the first ``per_class`` photos of each class of the photo tree."""
    for folder in sorted(photo_tree.iterdir()):
        (dst / folder.name).mkdir(parents=True)
        for f in sorted(folder.iterdir())[:per_class]:
            shutil.copy2(f, dst / folder.name / f.name)
    return dst


def _pil_info(data: bytes) -> tuple[int, int, str]:
    with Image.open(io.BytesIO(data)) as im:
        return im.width, im.height, im.mode


# --- the photo tree -----------------------------------------------------------------------
def test_photo_tree_holds_every_documented_mode_and_is_deterministic(photo_tree, tmp_path):
    seen = {}
    for cls, stem, _, mode, fmt, ext in PHOTOS:
        with Image.open(photo_tree / cls / f"{stem}.{ext}") as im:
            assert (im.format, im.mode) == (fmt, mode), stem
            assert max(im.size) <= 256
            seen[mode] = True
    assert {"RGB", "CMYK", "L", "P", "RGBA", "LA"} <= set(seen)
    from samples.photos import write_photo_tree

    again = write_photo_tree(tmp_path / "again", max_side=256)
    assert _files(again) == _files(photo_tree)


# --- round trips --------------------------------------------------------------------------
def test_prepared_samples_match_source_files_bytes_labels_and_sizes(photo_tree, prepared_data):
    ds = ImageSet.open(prepared_data)
    listed = sorted((cls, f"{stem}.{ext}") for cls, stem, _, _, _, ext in PHOTOS)  # sorted classes, then files
    expected = [listed[k] for k in pack_order(len(listed), seed=0)]  # written in the seeded order
    assert expected != listed and sorted(expected) == listed
    assert ds.meta["order"] == {"kind": "keyed-hash", "seed": 0, "candidates": 13}
    assert len(ds) == len(PHOTOS) == 13
    assert ds.classes == ["animals", "objects", "science"]
    assert [s["count"] for s in ds.shards] == [5, 5, 3]
    assert [s["first"] for s in ds.shards] == [0, 5, 10]
    for i, (cls, name) in enumerate(expected):
        src = photo_tree / cls / name
        assert ds.source(i) == f"{cls}/{name}"
        assert ds.read(i) == src.read_bytes()
        assert ds.classes[ds.labels[i]] == cls
        assert (int(ds.widths[i]), int(ds.heights[i]), ds.mode(i)) == _pil_info(src.read_bytes())
        assert ds.ext(i) == name.rsplit(".", 1)[1]
        assert ds.shard_of[i] == i // 5
    for arr in (ds.labels, ds.widths, ds.heights, ds.shard_of):
        assert arr.dtype == np.int64 and arr.shape == (13,)


def test_webdataset_library_reads_every_shard_with_labels(prepared_data):
    import webdataset as wds

    ds = ImageSet.open(prepared_data)
    urls = [str(ds.tar_path(s)) for s in range(len(ds.shards))]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(len(ds))]
    for i, sample in enumerate(samples):
        assert sample[ds.ext(i)] == ds.read(i)
        assert int(sample["cls"]) == ds.labels[i]


def test_dali_webdataset_reader_with_our_index_files_reads_and_decodes_every_sample(prepared_data):
    from nvidia.dali import fn, pipeline_def, types

    ds = ImageSet.open(prepared_data)
    tars = [str(ds.tar_path(s)) for s in range(len(ds.shards))]
    idx = [str(ds.index_path(s)) for s in range(len(ds.shards))]

    @pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def pipe():
        image, cls = fn.readers.webdataset(
            paths=tars, index_paths=idx, ext=["jpg;png", "cls"], missing_component_behavior="error",
            pad_last_batch=True, random_shuffle=False, name="reader")
        return image, cls, fn.decoders.image(image, device="cpu", output_type=types.RGB)

    p = pipe()
    p.build()
    assert p.epoch_size("reader") == len(ds)
    got = []
    while len(got) < len(ds):
        image, cls, decoded = p.run()
        for j in range(len(image)):
            got.append((np.array(image[j]).tobytes(), int(bytes(np.array(cls[j]))), np.array(decoded[j]).shape))
    for i in range(len(ds)):
        data, label, shape = got[i]
        assert data == ds.read(i)
        assert label == ds.labels[i]
        assert shape == (ds.heights[i], ds.widths[i], 3)  # CMYK, P, LA, RGBA all decode to RGB


def test_index_files_equal_what_dalis_wds2idx_tool_writes(prepared_data, tmp_path):
    from wds2idx import IndexCreator

    ds = ImageSet.open(prepared_data)
    for s in range(len(ds.shards)):
        with IndexCreator(str(ds.tar_path(s)), str(tmp_path / f"{s}.idx"), verbose=False) as creator:
            creator.create_index()
        assert (tmp_path / f"{s}.idx").read_text() == ds.index_path(s).read_text()


def test_packing_twice_gives_byte_identical_shards_and_manifest(photo_tree, prepared_data, tmp_path):
    again = prepare(photo_tree, tmp_path / "again", shard_size=5, progress=False, workers=2)
    ours, theirs = _files(tmp_path / "again"), _files(prepared_data)
    assert ours.pop("prepare.yaml") != theirs.pop("prepare.yaml")     # the record of the job: its OUT, workers
    assert ours == theirs
    assert again.digest == ImageSet.open(prepared_data).digest
    import tarfile

    for shard in range(len(again.shards)):
        with tarfile.open(again.tar_path(shard)) as tar:
            members = tar.getmembers()
        assert len(members) == 2 * again.shards[shard]["count"]
        for member in members:
            assert (member.mtime, member.uid, member.gid, member.uname, member.gname) == (0, 0, 0, "", "")
            index = int(member.name.split(".")[0])
            if not member.name.endswith(".cls"):  # the manifest's offset is the image data's
                assert (member.offset_data, member.size) == (again.offsets[index], again.sizes[index])


def test_read_is_thread_safe_and_survives_pickling(prepared_data):
    ds = ImageSet.open(prepared_data)
    want = [ds.read(i) for i in range(len(ds))]
    order = np.random.default_rng(0).permutation(np.tile(np.arange(len(ds)), 20))
    fresh = ImageSet.open(prepared_data)  # descriptors opened concurrently by the threads
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(fresh.read, order))
    assert all(got[k] == want[i] for k, i in enumerate(order))
    clone = pickle.loads(pickle.dumps(fresh))
    assert clone.read_many([12, 0, 7]) == [want[12], want[0], want[7]]
    with pytest.raises(IndexError, match="sample 13 out of range"):
        ds.read(13)


# --- bad input ----------------------------------------------------------------------------
@pytest.fixture
def bad_tree(photo_tree, tmp_path) -> Path:
    root = _small_tree(photo_tree, tmp_path / "bad")
    jpeg = (photo_tree / "animals" / "chelsea.jpg").read_bytes()
    (root / "objects" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "science" / "notes.jpg").write_text("this is not an image\n")
    return root


@pytest.mark.parametrize("bad_name", ["truncated.jpg", "notes.jpg"])
def test_a_bad_file_stops_prepare_and_the_error_names_it(bad_tree, tmp_path, bad_name):
    for other in ("truncated.jpg", "notes.jpg"):
        if other != bad_name:
            next(bad_tree.rglob(other)).unlink()
    with pytest.raises(BadImage, match=bad_name) as caught:
        prepare(bad_tree, tmp_path / "out", progress=False, workers=0)
    assert "--skip-bad" in str(caught.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_skip_bad_lists_rejects_with_reasons_and_packs_the_rest(bad_tree, tmp_path):
    ds = prepare(bad_tree, tmp_path / "out", shard_size=4, skip_bad=True, progress=False, workers=2)
    rejects = {r["source"]: r["reason"] for r in ds.rejects}
    assert set(rejects) == {"objects/truncated.jpg", "science/notes.jpg"}
    assert "truncated" in rejects["objects/truncated.jpg"]
    assert "not an image" in rejects["science/notes.jpg"]
    assert len(ds) == 6
    for i in range(len(ds)):
        assert ds.read(i) == (bad_tree / ds.source(i)).read_bytes()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


def _short_images(photo_tree: Path) -> dict[str, bytes]:
    """Images whose data stops early but which PIL's ``load()`` alone accepts (filling the rest)."""
    png = (photo_tree / "science" / "coins.png").read_bytes()       # 8-bit grey, one IDAT
    header = png[8:33]                                               # the IHDR chunk
    idat = next(png[p + 8:p + 8 + int.from_bytes(png[p:p + 4], "big")] for p in range(8, len(png))
                if png[p + 4:p + 8] == b"IDAT")
    rows = zlib.decompress(idat)
    return {
        "no_iend.png": png[:-12],                                    # cut before its last chunk
        "half_rows.png": png[:8] + header + _png_chunk(b"IDAT", zlib.compress(rows[:len(rows) // 2]))
        + _png_chunk(b"IEND", b""),                                  # a whole stream of half the rows
    }


@pytest.mark.parametrize("name", ["no_iend.png", "half_rows.png"])
def test_a_png_whose_data_stops_early_is_refused_by_prepare_naming_it(photo_tree, tmp_path, name):
    src = _small_tree(photo_tree, tmp_path / "src", per_class=1)
    (src / "science" / name).write_bytes(_short_images(photo_tree)[name])
    with pytest.raises(BadImage, match=rf"science/{name}: .*(truncated|broken).*--skip-bad"):
        prepare(src, tmp_path / "out", progress=False, workers=0)
    ds = prepare(src, tmp_path / "out", skip_bad=True, progress=False, workers=0)
    assert [r["source"] for r in ds.rejects] == [f"science/{name}"] and len(ds) == 3


def test_a_cut_jpeg_or_png_is_refused_even_where_pil_loads_truncated_images(photo_tree, tmp_path, monkeypatch):
    """Training scripts often set ``ImageFile.LOAD_TRUNCATED_IMAGES``; PIL then fills a cut
    file's missing rows with grey or black, which DALI refuses: prepare refuses them all the same."""
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    src = _small_tree(photo_tree, tmp_path / "src", per_class=1)
    for name in ("chelsea.jpg", "coins.png"):
        data = next(photo_tree.rglob(name)).read_bytes()
        (src / "objects" / f"cut_{name}").write_bytes(data[:len(data) * 2 // 3])
    ds = prepare(src, tmp_path / "out", skip_bad=True, progress=False, workers=0)
    reasons = {r["source"]: r["reason"] for r in ds.rejects}
    assert set(reasons) == {"objects/cut_chelsea.jpg", "objects/cut_coins.png"} and len(ds) == 3
    assert "truncated JPEG" in reasons["objects/cut_chelsea.jpg"]


# --- WebDataset input ---------------------------------------------------------------------
def _tree_to_webdataset(tree: Path, dst: Path, *, classes_file: bool) -> Path:
    import webdataset as wds

    dst.mkdir()
    classes = sorted(p.name for p in tree.iterdir())
    files = [(label, f) for label, c in enumerate(classes) for f in sorted((tree / c).iterdir())]
    for part in range(2):
        with wds.TarWriter(str(dst / f"train-{part:04d}.tar")) as sink:
            for k, (label, f) in enumerate(files[part * 7:(part + 1) * 7]):
                sink.write({"__key__": f"{f.parent.name}_{f.stem}", f.suffix[1:]: f.read_bytes(), "cls": label})
    if classes_file:
        (dst / "classes.txt").write_text("".join(c + "\n" for c in classes))
    return dst


@pytest.mark.parametrize("classes_file", [True, False])
def test_webdataset_input_gives_the_same_samples_as_the_tree(photo_tree, prepared_data, tmp_path, classes_file):
    src = _tree_to_webdataset(photo_tree, tmp_path / "wds", classes_file=classes_file)
    ds = prepare(src, tmp_path / "out", shard_size=5, progress=False, workers=0)
    tree = ImageSet.open(prepared_data)
    assert len(ds) == len(tree)
    assert ds.classes == (tree.classes if classes_file else ["0", "1", "2"])
    assert np.array_equal(ds.labels, tree.labels)
    assert np.array_equal(ds.widths, tree.widths) and np.array_equal(ds.heights, tree.heights)
    assert ds.read_many(range(len(ds))) == tree.read_many(range(len(tree)))
    assert ds.source(0).startswith("train-0000.tar:animals_")


def test_webdataset_sample_without_label_is_rejected_or_stops_when_labels_are_required(photo_tree, tmp_path):
    import webdataset as wds

    src = tmp_path / "wds"
    src.mkdir()
    data = (photo_tree / "animals" / "chelsea.jpg").read_bytes()
    with wds.TarWriter(str(src / "a.tar")) as sink:
        sink.write({"__key__": "good", "jpg": data, "cls": 1})
        sink.write({"__key__": "nolabel", "jpg": data})
    with pytest.raises(BadImage, match="nolabel.jpg.*no 'cls' member"):
        prepare(src, tmp_path / "out", labels="classes", progress=False, workers=0)
    ds = prepare(src, tmp_path / "out", labels="classes", skip_bad=True, progress=False, workers=0)
    assert len(ds) == 1 and ds.classes == ["0", "1"] and ds.labels.tolist() == [1]
    assert ds.rejects == [{"source": "a.tar:nolabel.jpg", "reason": "sample has no 'cls' member (label)"}]


# --- finished, changed and half-written outputs -------------------------------------------
def test_rerun_on_finished_out_does_nothing_and_says_so(photo_tree, tmp_path):
    src = _small_tree(photo_tree, tmp_path / "src")
    prepare(src, tmp_path / "out", shard_size=2, progress=False, workers=0)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")}
    said = []
    ds = prepare(src, tmp_path / "out", shard_size=2, progress=False, workers=0, echo=said.append)
    assert len(said) == 1 and "nothing to do" in said[0]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")} == stamps
    assert len(ds) == 6
    with pytest.raises(PrepareError, match="shard_size=2, not 3"):
        prepare(src, tmp_path / "out", shard_size=3, progress=False, workers=0)


def test_changed_source_is_refused_naming_the_change(photo_tree, tmp_path):
    src = _small_tree(photo_tree, tmp_path / "src")
    prepare(src, tmp_path / "out", progress=False, workers=0)
    shutil.copy2(photo_tree / "objects" / "logo_rgba.png", src / "objects" / "extra.png")
    with pytest.raises(PrepareError, match="different source.*new in SRC: objects/extra.png"):
        prepare(src, tmp_path / "out", progress=False, workers=0)
    (src / "objects" / "extra.png").unlink()
    (src / "animals" / "chelsea.jpg").write_bytes((photo_tree / "objects" / "coffee.jpg").read_bytes())
    with pytest.raises(PrepareError, match="sizes or modification times differ"):
        prepare(src, tmp_path / "out", progress=False, workers=0)


def test_half_written_out_is_never_opened_and_is_redone(photo_tree, tmp_path):
    src = _small_tree(photo_tree, tmp_path / "src")
    prepare(src, tmp_path / "out", shard_size=4, progress=False, workers=0)
    before = _files(tmp_path / "out")
    (tmp_path / "out" / "manifest.json").unlink()
    (tmp_path / "out" / "shards" / "shard-000001.tar").write_bytes(b"half")
    (tmp_path / "out" / "shards" / "shard-000002.tar.tmp").write_bytes(b"half")
    with pytest.raises(FileNotFoundError, match="not a finished prepare"):
        ImageSet.open(tmp_path / "out")
    said = []
    prepare(src, tmp_path / "out", shard_size=4, progress=False, workers=0, echo=said.append)
    assert "starting over" in said[0] and "nothing to do" not in " ".join(said)
    assert _files(tmp_path / "out") == before


def test_open_refuses_other_format_versions_and_damaged_shards(prepared_data, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(prepared_data, copy)
    meta = json.loads((copy / "manifest.json").read_text())
    meta["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version 99, this code reads version 2"):
        ImageSet.open(copy)
    meta["format_version"] = 1  # the class-sorted version: refused, saying why and what to do
    (copy / "manifest.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version 1: its samples are in source order.*prepare SRC NEW_OUT"):
        ImageSet.open(copy)
    meta["format_version"] = 2
    (copy / "manifest.json").write_text(json.dumps(meta))
    with open(copy / "shards" / "shard-000001.tar", "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match="shard-000001.tar is missing or not"):
        ImageSet.open(copy)


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def test_open_refuses_a_flipped_label_byte_and_an_edited_digest_naming_the_file(prepared_data, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(prepared_data, copy)
    meta = json.loads((copy / "manifest.json").read_text())
    label = next(c for c in meta["columns"]["layout"] if c["name"] == "label")
    _flip_byte(copy / "manifest.columns", label["offset"])          # sample 0's label
    with pytest.raises(ValueError, match=r"manifest.columns does not match the sha256 in its manifest.json"):
        ImageSet.open(copy)
    _flip_byte(copy / "manifest.columns", label["offset"])
    meta["digest"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"manifest.json: its digest is not the one of its contents"):
        ImageSet.open(copy)


# --- command line -------------------------------------------------------------------------
def test_cli_prepare_help_shows_defaults_and_bad_file_fails_naming_it(bad_tree, tmp_path):
    from click.testing import CliRunner

    from cli import main

    runner = CliRunner()
    shown = runner.invoke(main, ["prepare", "--help"])
    assert shown.exit_code == 0 and "default: 256" in shown.output and "--skip-bad" in shown.output
    failed = runner.invoke(main, ["prepare", str(bad_tree), str(tmp_path / "out"), "--no-progress", "--workers", "0"])
    assert failed.exit_code == 1, failed.output
    assert "Error: " in failed.output and ("notes.jpg" in failed.output or "truncated.jpg" in failed.output)
    assert isinstance(failed.exception, SystemExit)  # a clean message, not a traceback
    ok = runner.invoke(main, ["prepare", str(bad_tree), str(tmp_path / "out"), "--skip-bad", "--shard-size", "3",
                              "--no-progress", "--workers", "0"])
    assert ok.exit_code == 0, ok.output
    assert "packed 6 samples" in ok.output and "2 files left out" in ok.output
    assert len(ImageSet.open(tmp_path / "out").shards) == 2


def test_exif_orientation_is_recorded_and_size_is_as_stored(photo_tree, tmp_path):
    src = _small_tree(photo_tree, tmp_path / "src", per_class=1)
    with Image.open(photo_tree / "objects" / "coffee.jpg") as im:
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 CW to display"
        im.save(src / "objects" / "rotated.jpg", exif=exif.tobytes())
        stored = im.size
    ds = prepare(src, tmp_path / "out", progress=False, workers=0)
    i = [ds.source(k) for k in range(len(ds))].index("objects/rotated.jpg")
    assert ds.orientations[i] == 6 and (ds.widths[i], ds.heights[i]) == stored
    assert ds.orientations.tolist().count(0) == len(ds) - 1


def test_source_with_neither_class_folders_images_nor_tars_is_refused(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_bytes(b"x")
    with pytest.raises(PrepareError, match="no class folders .*no image files .*no \\*.tar"):
        prepare(tmp_path / "src", tmp_path / "out", progress=False)


def test_verify_rehash_data_names_a_flipped_shard_byte_and_any_verify_a_flipped_table_byte(
        prepared_data, teacher_store, tmp_path):
    from click.testing import CliRunner

    from cli import main

    copy = tmp_path / "data"
    shutil.copytree(prepared_data, copy)
    ds = ImageSet.open(copy)
    _flip_byte(ds.tar_path(1), int(ds.offsets[7]) + 100)           # inside image 7, in shard 1
    runner = CliRunner()
    args = ["verify", str(teacher_store), "--data", str(copy), "--no-values"]
    quick = runner.invoke(main, args)
    assert quick.exit_code == 0 and "shards of" in quick.output and "were not re-hashed (--rehash-data" in quick.output
    full = runner.invoke(main, args + ["--rehash-data"])
    assert full.exit_code == 1, full.output
    problems = [line for line in full.output.splitlines() if line.startswith("PROBLEM:")]
    assert len(problems) == 1 and f"{ds.tar_path(1)}: its sha256 differs" in problems[0], full.output
    _flip_byte(ds.tar_path(1), int(ds.offsets[7]) + 100)
    label = next(c for c in ds.meta["columns"]["layout"] if c["name"] == "label")
    _flip_byte(copy / "manifest.columns", label["offset"] + 8 * 5)  # sample 5's label
    table = runner.invoke(main, args)
    assert table.exit_code == 1 and isinstance(table.exception, SystemExit), table.output
    assert "Error: " in table.output and f"{copy / 'manifest.columns'} does not match" in table.output
