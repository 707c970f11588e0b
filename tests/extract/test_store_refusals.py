"""What extract, verify and train refuse about a store before any work: a teacher whose input
disagrees with the store's other teachers, and metadata that contradicts itself, each in one
line naming what disagrees."""
import json
import shutil
import time

import pytest

from extract import runner
from extract.config import ExtractConfig
from extract.runner import run_extraction
from store.verify import verify_store
from store.features import DataInfo, FeatureStore, StoreError, TeacherStore
from data.shards import ImageSet
from tests.conftest import one_error


def test_a_teacher_whose_input_disagrees_with_the_store_is_refused_before_any_work(prepared_data, tmp_path,
                                                                                   monkeypatch, tiny_teacher):
    data = ImageSet.open(prepared_data)
    store = tmp_path / "store"
    fs = FeatureStore.create_or_open(store, data=DataInfo.of(data), views=2, seed=0)
    fs.create_teacher("mocov3", dict(codec="fp16", n_visible=118, mask_ratio=0.4, embed_dim=768, pca_dim=0,
                                     input="source"))              # extracted with --view-pixels none

    def began(work):
        def refuse(*args, **kwargs):
            raise AssertionError(f"{work} began before the refusal")
        return refuse
    monkeypatch.setattr(runner, "compute_stats", began("the statistics pass"))
    monkeypatch.setattr(TeacherStore, "write_block", began("a block's write"))
    teacher = tiny_teacher("mae")
    with pytest.raises(StoreError) as refusal:
        run_extraction(ExtractConfig(store=store, views=2, seed=0, batch_size=4, decoder="pil", stats_images=13,
                                     view_pixels="jpeg", codec="fp16", device="cpu"), teacher=teacher, data=data,
                       progress=False)
    message = str(refusal.value)
    assert "\n" not in message and all(w in message for w in ("'mae'", "jpeg", "'mocov3'", "source")), message
    assert sorted(p.name for p in store.iterdir()) == ["mocov3", "zarr.json"]          # no mae, no pixels


def test_a_teacher_recorded_before_build_records_reopens_for_its_default_build_only(prepared_data, tmp_path):
    """A teacher group without ``build`` (an older store) reads as its descriptor's default build,
    seeded with the store's seed when untrained: extraction may resume it with that build, and is
    refused with any other."""
    from teachers.vit import default_build

    fs = FeatureStore.create_or_open(tmp_path / "store", data=DataInfo.of(ImageSet.open(prepared_data)), views=2,
                                     seed=3)
    older = dict(codec="fp16", n_visible=98, mask_ratio=0.5, embed_dim=768, pca_dim=0, input="source",
                 untrained=True)
    fs.create_teacher("mae", older)
    assert "build" not in fs.teacher("mae").config and fs.teacher("mae").build == default_build("mae", seed=3)
    fs.create_teacher("mae", dict(older, build=default_build("mae", seed=3)))
    with pytest.raises(StoreError, match="exists with another configuration") as refusal:
        fs.create_teacher("mae", dict(older, build=default_build("mae", seed=3, model_kwargs=dict(depth=1))))
    assert "build: store has" in str(refusal.value)


# (file changed, key path in its JSON, crafted value, file the refusal names)
CRAFTS = {
    "root claiming 10^7 views": ("zarr.json", ("attributes", "views"), 10 ** 7, "zarr.json"),
    "config embed_dim of 10^9": ("mae/zarr.json", ("attributes", "config", "embed_dim"), 10 ** 9,
                                 "mae/tokens/zarr.json"),
    "absurd token shape": ("mae/tokens/zarr.json", ("shape",), [2, 13, 99, 10 ** 9], "mae/tokens/zarr.json"),
}


@pytest.mark.parametrize("craft", CRAFTS)
def test_verify_and_train_refuse_crafted_metadata_in_one_line_naming_the_file(prepared_data, teacher_store,
                                                                               tmp_path, craft):
    file, keys, value, named = CRAFTS[craft]
    store = tmp_path / "store"
    shutil.copytree(teacher_store, store)
    meta = json.loads((store / file).read_text())
    node = meta
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    (store / file).write_text(json.dumps(meta))
    problems, _ = verify_store(store, ImageSet.open(prepared_data), progress=False)
    assert any(f"{store / named}:" in p and "\n" not in p for p in problems), problems
    start = time.perf_counter()
    one_error(["train", "--data", prepared_data, "--store", store, "--out", tmp_path / "run", "--steps", 1,
                "--batch-size", 8, "--device", "cpu"], store / named)
    assert time.perf_counter() - start < 30
