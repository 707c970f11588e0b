"""Images without labels: ``prepare`` packs a folder of images without class folders and WebDataset
samples without ``cls`` as an unlabeled set (``ImageSet.labeled`` false, labels -1, no classes), a
class-folder tree stays labeled, a set mixing both is refused naming the sample, the distillation
chain (extract, verify, train, export, inspect) runs on it, and the evaluations that need labels
refuse it in one line naming the folder."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.shards import ImageSet, PrepareError, prepare
from tests.conftest import one_error

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _image(seed: int, fmt: str = "JPEG") -> bytes:
    """A small noise image (48 x 40 RGB) encoded as ``fmt``."""
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def _flat_folder(root: Path, count: int = 6) -> Path:
    """``root`` holding ``count`` images directly (JPEG and PNG) and a non-image file."""
    root.mkdir(parents=True)
    for k in range(count):
        fmt, ext = ("PNG", "png") if k % 3 == 2 else ("JPEG", "jpg")
        (root / f"img{k}.{ext}").write_bytes(_image(k, fmt))
    (root / "notes.txt").write_text("not an image, skipped")
    return root


def _write_tar(path: Path, samples: list[dict]) -> None:
    """A WebDataset tar: per sample, members ``{key}.{ext}`` in order."""
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _img2dataset_sample(k: int, **extra: bytes) -> dict:
    """img2dataset's layout: __key__, jpg, json and txt (a caption), no cls."""
    return {"__key__": f"{k:09d}", "jpg": _image(k),
            "json": json.dumps({"url": f"http://x/{k}.jpg", "caption": "a photo"}).encode(), "txt": b"a photo",
            **extra}


@pytest.fixture(scope="module")
def unlabeled(tmp_path_factory) -> Path:
    """A flat folder of 6 images prepared (shards of 4)."""
    root = tmp_path_factory.mktemp("unlabeled")
    prepare(_flat_folder(root / "flat"), root / "data", shard_size=4, progress=False, workers=0)
    return root / "data"


def test_a_flat_folder_is_prepared_unlabeled_without_cls_members(unlabeled):
    ds = ImageSet.open(unlabeled)
    assert not ds.labeled and ds.classes == [] and ds.meta["labeled"] is False
    assert len(ds) == 6 and ds.labels.tolist() == [-1] * 6            # notes.txt is not an image: skipped
    assert sorted(ds.source(i) for i in range(len(ds))) == [f"img{k}.{'png' if k % 3 == 2 else 'jpg'}"
                                                             for k in range(6)]
    assert ds.meta["source"]["kind"] == "images" and "unlabeled" in repr(ds)
    with tarfile.open(ds.tar_path(0)) as tar:
        assert not [n for n in tar.getnames() if n.endswith(".cls")]
    assert " cls " not in ds.index_path(0).read_text()


def test_a_class_folder_tree_stays_labeled_and_labels_none_drops_its_labels(prepared_data, photo_tree, tmp_path):
    tree = ImageSet.open(prepared_data)
    assert tree.labeled and tree.meta["labeled"] is True and tree.classes == ["animals", "objects", "science"]
    ds = prepare(photo_tree, tmp_path / "out", shard_size=5, labels="none", progress=False, workers=0)
    assert not ds.labeled and len(ds) == len(tree) and set(ds.labels.tolist()) == {-1}
    assert {ds.source(i) for i in range(len(ds))} == {tree.source(i) for i in range(len(tree))}   # nested: all
    with pytest.raises(PrepareError, match=f"{tmp_path / 'out'} was prepared without labels.*with labels"):
        prepare(photo_tree, tmp_path / "out", shard_size=5, progress=False, workers=0)   # auto: the classes


def test_images_beside_sub_folders_are_refused_under_auto_and_taken_by_labels_none(tmp_path):
    src = _flat_folder(tmp_path / "src", count=2)
    (src / "more").mkdir()
    (src / "more" / "deep.png").write_bytes(_image(9, "PNG"))
    with pytest.raises(PrepareError, match="both image files.*labels=none.*labels=classes"):
        prepare(src, tmp_path / "out", progress=False, workers=0)
    ds = prepare(src, tmp_path / "out", labels="none", progress=False, workers=0)
    assert not ds.labeled and sorted(ds.source(i) for i in range(len(ds))) == ["img0.jpg", "img1.jpg",
                                                                                "more/deep.png"]
    with pytest.raises(PrepareError, match="no class folders, and labels=classes"):
        prepare(_flat_folder(tmp_path / "flat", count=1), tmp_path / "out2", labels="classes", progress=False)


def test_img2dataset_shards_without_cls_are_prepared_unlabeled(tmp_path):
    src = tmp_path / "wds"
    src.mkdir()
    _write_tar(src / "00000.tar", [_img2dataset_sample(k) for k in range(3)])
    _write_tar(src / "00001.tar", [_img2dataset_sample(k) for k in range(3, 5)])
    ds = prepare(src, tmp_path / "out", progress=False, workers=0)
    assert not ds.labeled and ds.classes == [] and len(ds) == 5 and set(ds.labels.tolist()) == {-1}
    assert {ds.source(i) for i in range(len(ds))} == {f"0000{k // 3}.tar:{k:09d}.jpg" for k in range(5)}
    assert ds.read_many(range(len(ds)))[0] in {_image(k) for k in range(5)}


def test_shards_mixing_samples_with_and_without_cls_are_refused_naming_the_tar_and_sample(tmp_path):
    src = tmp_path / "wds"
    src.mkdir()
    _write_tar(src / "a.tar", [_img2dataset_sample(0, cls=b"1"), _img2dataset_sample(1, cls=b"0")])
    _write_tar(src / "b.tar", [_img2dataset_sample(2, cls=b"0"), _img2dataset_sample(3)])
    line = one_error(["prepare", src, tmp_path / "out", "--no-progress", "--workers", "0"],
                     f"{src}/b.tar:000000003.jpg", f"{src}/a.tar:000000000.jpg", "labels=none")
    assert "has no 'cls' member" in line
    assert not (tmp_path / "out" / "manifest.json").exists()
    ds = prepare(src, tmp_path / "out", labels="none", progress=False, workers=0)       # every cls ignored
    assert not ds.labeled and len(ds) == 4


@pytest.fixture(scope="module")
def unlabeled_store(unlabeled, tiny_teacher, tmp_path_factory) -> Path:
    """A store of one tiny teacher (mae), 2 views, over the unlabeled set."""
    from extract.config import ExtractConfig
    from extract.runner import run_extraction

    store = tmp_path_factory.mktemp("unlabeled_store") / "store"
    run_extraction(ExtractConfig(store=store, views=2, seed=0, batch_size=6, decoder="pil", stats_images=6,
                                 codec="fp16", view_pixels="none", device="cpu"),
                   teacher=tiny_teacher("mae"), data=ImageSet.open(unlabeled), progress=False)
    return store


def _train_config(unlabeled: Path, store: Path):
    from train.config import load_config

    return load_config(None, [
        f"data.images={unlabeled}", f"data.store={store}", "data.views=2", "data.decoder=pil",
        "data.num_workers=0", "data.shuffle_window=2", "train.batch_size=3", "schedule.epochs=1",
        "schedule.warmup_epochs=0", "model.depth=1", "decoder.depth=1"])


def test_extract_verify_inspect_train_and_export_run_on_an_unlabeled_set(unlabeled, unlabeled_store, tmp_path):
    from store.inspect import load_sample
    from store.verify import verify_report
    from train.export import export_run
    from train.loop import train

    data = ImageSet.open(unlabeled)
    lines, problems = verify_report(unlabeled_store, unlabeled)
    assert problems == [] and lines[0].startswith("mae: 4/4 blocks complete")
    sample = load_sample(unlabeled_store, data, index=5, view=1)
    assert sample.label == -1 and sample.source == data.source(5)
    summary = train(_train_config(unlabeled, unlabeled_store), out_dir=tmp_path / "run", max_steps=2, progress=False)
    assert summary["steps"] == 2 and np.isfinite(summary["last"]["loss"])
    student = export_run(tmp_path / "run", tmp_path / "student.safetensors")
    assert Path(student).is_file()

    # an evaluation that needs labels refuses the set, naming it, before it reads an image
    one_error(["eval", "knn", "--checkpoint", student, "--model-arg", "depth=1", "--train", unlabeled,
               "--val", unlabeled, "--workers", "0", "--out", tmp_path / "knn"],
              "eval knn needs labels", f"{unlabeled} was prepared without labels",
              "a folder of images without class folders")


def test_a_sweep_trains_its_learners_on_an_unlabeled_set(unlabeled, unlabeled_store, tmp_path):
    from train.loop import train
    from train.sweep import parse_variant

    sweep = train(_train_config(unlabeled, unlabeled_store), out_dir=tmp_path / "sweep", max_steps=1, progress=False,
                  variants=[parse_variant("uniform:gate.mode=uniform"), parse_variant("slow:optim.base_lr=1e-5")])
    assert {name: (s["status"], s["steps"]) for name, s in sweep["learners"].items()} == \
        {"uniform": ("done", 1), "slow": ("done", 1)}


def test_the_label_protocols_refuse_an_unlabeled_set_naming_its_folder(unlabeled, prepared_data):
    from eval.data import EvalImages

    for task in ("eval knn", "eval linear", "eval finetune"):
        with pytest.raises(ValueError, match=f"^{task} needs labels; {unlabeled} was prepared without labels"):
            EvalImages(unlabeled, task=task)
    with pytest.raises(ValueError, match=f"{unlabeled} was prepared without labels"):   # as val of a labeled train
        EvalImages(unlabeled, classes=EvalImages(prepared_data).classes, task="eval knn")


def test_an_edited_labeled_key_is_refused_on_open(unlabeled, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(unlabeled, copy)
    meta = json.loads((copy / "manifest.json").read_text())
    meta["labeled"] = True
    (copy / "manifest.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="labeled=True but lists 0 classes"):
        ImageSet.open(copy)
