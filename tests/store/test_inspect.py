"""`inspect`: the panel shows exactly the stored crop and masks; bad indices, views and a store
from other data fail with messages that say what is wrong."""
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from data import views as V
from data.decode import pil_view
from store.features import StoreError
from store.inspect import load_sample, mask_image
from data.shards import ImageSet, prepare
from train.plots import render_panel


def test_sample_holds_the_stored_crop_and_the_masks_drawn_by_views(prepared_data, teacher_store):
    data = ImageSet.open(prepared_data)
    s = load_sample(teacher_store, data, index=7, view=1, with_tokens=True)
    box, flip = V.view_params(0, np.array([7]), np.array([1]), data.widths[[7]], data.heights[[7]])
    assert s.box.tolist() == box[0].tolist() and s.flip == bool(flip[0])
    np.testing.assert_array_equal(s.crop, pil_view(data.read(7), box[0], bool(flip[0])))
    assert list(s.teacher_visible) == ["mae", "mocov3", "ibot"]
    for name, vis in s.teacher_visible.items():
        np.testing.assert_array_equal(vis, V.teacher_visible(0, [7], [1], name)[0])
        assert s.tokens[name].shape == (1 + len(vis), 768)
    assert s.slot == (1 - 7) % 2 and s.epoch == s.slot          # the first epoch that trains on view 1
    assert int(V.epoch_view(np.array([7]), s.epoch, 2)[0]) == 1
    np.testing.assert_array_equal(s.student_visible, V.student_visible(0, [7], s.epoch)[0])


def test_mask_image_dims_exactly_the_hidden_patches():
    crop = np.full((224, 224, 3), 200, dtype=np.uint8)
    visible = np.array([0, 15, 195])
    out = mask_image(crop, visible)
    changed = (out != crop).any(-1)                                  # (224, 224)
    per_patch = changed.reshape(14, 16, 14, 16).all(axis=(1, 3)).reshape(-1)
    untouched = ~changed.reshape(14, 16, 14, 16).any(axis=(1, 3)).reshape(-1)
    assert set(np.nonzero(untouched)[0]) == {0, 15, 195}
    assert per_patch.sum() == 196 - 3


def test_panel_with_gate_weights_adds_a_row(prepared_data, teacher_store, tmp_path):
    data = ImageSet.open(prepared_data)
    s = load_sample(teacher_store, data, index=2, view=0)
    weights = {}
    for name, vis in s.teacher_visible.items():
        w = np.full(196, np.nan)
        w[vis] = 1 / 3
        weights[name] = w
    one = Image.open(render_panel(s, tmp_path / "one.png"))
    two = Image.open(render_panel(s, tmp_path / "two.png", weights=weights))
    assert one.width == two.width and two.height > 1.7 * one.height
    assert np.asarray(one.convert("L")).std() > 10                  # a picture, not a blank canvas


def test_bad_index_or_view_fails_naming_the_valid_range(prepared_data, teacher_store):
    data = ImageSet.open(prepared_data)
    with pytest.raises(IndexError, match=r"index 13 is out of range: .* holds images 0\.\.12"):
        load_sample(teacher_store, data, index=13)
    with pytest.raises(IndexError, match=r"view 2 is out of range: .* holds views 0\.\.1"):
        load_sample(teacher_store, data, index=0, view=2)
    result = CliRunner().invoke(_cli(), ["inspect", str(teacher_store), "--data", str(prepared_data),
                                         "--index", "-1"])
    assert result.exit_code != 0 and "index -1 is out of range" in result.output


def test_store_of_other_data_is_refused_naming_both(photo_tree, teacher_store, tmp_path):
    other = prepare(photo_tree, tmp_path / "other", shard_size=4, progress=False, workers=0)
    with pytest.raises(StoreError, match=r"(?s)does not match.*data_digest.*pass the --data it was made from"):
        load_sample(teacher_store, other, index=0)
    result = CliRunner().invoke(_cli(), ["inspect", str(teacher_store), "--data", str(tmp_path / "other"),
                                         "--index", "0", "--out", str(tmp_path / "x.png")])
    assert result.exit_code != 0 and "does not match" in result.output
    assert not (tmp_path / "x.png").exists()


def test_cli_inspect_writes_the_panel(prepared_data, teacher_store, tmp_path):
    out = tmp_path / "panel.png"
    result = CliRunner().invoke(_cli(), ["inspect", str(teacher_store), "--data", str(prepared_data),
                                         "--index", "4", "--view", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size[0] > 500


def _cli():
    from cli import main
    return main


def test_a_sample_of_teachers_that_ran_on_the_stored_jpeg_views_shows_those_views(prepared_data, tmp_path,
                                                                                  tiny_teacher):
    """The default store's teachers see the JPEG view, not the source crop (they differ by a
    few levels): inspect, the held-out losses and CKA read the view, as training does."""
    import torch

    from extract.config import ExtractConfig
    from extract.runner import run_extraction
    from data.decode import normalize_uint8
    from data.decode.stored import pil_stored_views
    from store.features import FeatureStore
    from store.viewpixels import ViewPixels
    from train.diagnostics import sample_batch

    data = ImageSet.open(prepared_data)
    store = tmp_path / "store"
    run_extraction(ExtractConfig(store=store, views=2, seed=0, batch_size=8, decoder="pil", stats_images=13,
                                 view_pixels="jpeg", codec="fp16", device="cpu"),
                   teacher=tiny_teacher("mae"), data=data, progress=False)
    s = load_sample(store, data, index=7, view=1)
    fs = FeatureStore.open(store)
    _, datas = ViewPixels.open(fs).read_block(s.slot, 1)                  # image 7 is in shard 1 (5..9)
    np.testing.assert_array_equal(s.crop, pil_stored_views([datas[7 - 5]], normalize=False)[0].numpy())
    assert np.abs(s.crop.astype(int) - pil_view(data.read(7), s.box, s.flip).astype(int)).max() > 0
    batch = sample_batch([s], [], device="cpu")
    torch.testing.assert_close(batch["images"], normalize_uint8(torch.from_numpy(s.crop[None])))
