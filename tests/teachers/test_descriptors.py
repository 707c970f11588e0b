"""The teacher descriptors (teachers/descriptors.py) are the one source of a teacher's facts: every
reader's list of teachers, mask ids and ratios, architecture and the store's record follow
them; the mask key ids are pinned; the registry refuses what its readers cannot handle."""
import dataclasses

import pytest

import teachers.descriptors as T
from data import views as V
from store.features import FeatureStore


def test_every_list_of_teachers_and_their_mask_keys_come_from_the_descriptors():
    import cli
    from demo.stages import TEACHERS as DEMO_TEACHERS
    from teachers.checkpoints import TEACHERS as CHECKPOINTS
    from train.config import TEACHER_NAMES, Config

    names = list(T.DESCRIPTORS)
    assert V.TEACHER_IDS == {n: d.key_id for n, d in T.DESCRIPTORS.items()}
    assert V.MASK_RATIOS == {n: d.mask_ratio for n, d in T.DESCRIPTORS.items()}
    assert list(TEACHER_NAMES) == names and list(CHECKPOINTS) == names     # one converter per descriptor
    teacher_option = next(p for p in cli.extract.params if p.name == "teacher")
    assert f"Which frozen teacher to run: {', '.join(names)}, or timm:NAME" in teacher_option.help
    from extract.config import ExtractConfig
    with pytest.raises(ValueError, match=r"config teacher='dinov2' is not one of \['mae', .* or timm:NAME"):
        ExtractConfig(teacher="dinov2").validate()
    from train.config import teacher_names
    assert Config().data.teachers == "auto" and teacher_names(Config()) == T.PAPER_TEACHERS == DEMO_TEACHERS
    # part of every stored mask's key: renumbering would silently change every store's masks
    assert V.TEACHER_IDS == {"mae": 0, "mocov3": 1, "ibot": 2, "dino": 3, "dinov2_b14": 4, "dinov2_b14_reg4": 5,
                             "dinov2_l14": 6, "dinov2_l14_reg4": 7}
    assert V.MASK_RATIOS == {"mae": 0.50, "mocov3": 0.40, "ibot": 0.30, "dino": 0.40, "dinov2_b14": 0.30,
                             "dinov2_b14_reg4": 0.30, "dinov2_l14": 0.30, "dinov2_l14_reg4": 0.30}


def test_the_store_records_each_teachers_geometry_from_its_descriptor(teacher_store):
    fs = FeatureStore.open(teacher_store)
    for name in T.PAPER_TEACHERS:
        d, config = T.descriptor(name), fs.teacher(name).config
        assert (config["resolution"], config["patch_size"], config["embed_dim"]) == (d.resolution, d.patch_size,
                                                                                     d.width)
        assert config["mask_ratio"] == d.mask_ratio and d.grid == V.GRID
        assert config["build"] == {"arch": d.arch, "model_kwargs": {"img_size": d.resolution, "depth": 1}, "seed": 0}
    with pytest.raises(KeyError, match="unknown teacher 'dinov2'; known: mae, mocov3, ibot, dino, dinov2_b14, "):
        T.descriptor("dinov2")


def test_every_teacher_is_on_the_students_grid_and_the_registry_refuses_a_shared_id_or_another_grid(monkeypatch):
    for d in T.DESCRIPTORS.values():     # the grid rule: resolution = 14 x patch, so patch p is the student's p
        assert d.grid == V.GRID and d.resolution == V.GRID * d.patch_size and d.model_kwargs == {"img_size": d.resolution}
    assert (T.descriptor("dinov2_b14").resolution, T.descriptor("dinov2_l14").width) == (196, 1024)
    mae = T.descriptor("mae")
    monkeypatch.setattr(T, "DESCRIPTORS", {"mae": mae, "copy": dataclasses.replace(mae, name="copy")})
    with pytest.raises(ValueError, match="teachers mae and copy share the mask key id 0"):
        T._check_registry()
    b14 = dataclasses.replace(mae, name="b14_at_224", key_id=9, patch_size=14)      # a 16 x 16 grid
    monkeypatch.setattr(T, "DESCRIPTORS", {"mae": mae, b14.name: b14})
    with pytest.raises(ValueError, match="teacher b14_at_224: 224 px with patch 14 is not the shared 14 x 14 grid"):
        T._check_registry()
    wide = dataclasses.replace(mae, name="wide", key_id=9, width=1024)                 # any width is read
    monkeypatch.setattr(T, "DESCRIPTORS", {"mae": mae, wide.name: wide})
    T._check_registry()


def test_verify_names_a_stored_teacher_off_the_shared_grid(teacher_store, prepared_data, tmp_path):
    import shutil

    from store.verify import verify_store
    from data.shards import ImageSet

    store = tmp_path / "store"
    shutil.copytree(teacher_store, store)
    assert verify_store(store, ImageSet.open(prepared_data), scan_values=False)[0] == []
    group = FeatureStore.open(store).teacher("mae").group
    group.attrs["config"] = dict(group.attrs["config"], resolution=196)          # patch 16 at 196 px: 12 x 12
    problems, _ = verify_store(store, ImageSet.open(prepared_data), scan_values=False)
    assert "mae: 196 px with patch 16 is not the shared 14 x 14 grid" in problems
