"""Held-out stores read with a training store's adapters: they must hold the same teacher weights
(checkpoint digests), and the sweep report says how many held-out images it scored; a run trained
on fewer views than its store holds reloads."""
import numpy as np
import pytest

from extract.config import ExtractConfig
from extract.runner import run_extraction
from store.features import FeatureStore, StoreError
from data.shards import ImageSet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _extract(store, data, teacher, **kw):
    cfg = dict(store=store, views=2, seed=0, batch_size=8, decoder="pil", stats_images=13, codec="fp16",
               view_pixels="none", device="cpu")
    return run_extraction(ExtractConfig(**{**cfg, **kw}), teacher=teacher, data=data, progress=False)


@pytest.fixture(scope="module")
def two_mae_stores(prepared_data, tmp_path_factory, tiny_teacher):
    """Two fp16 stores (2 views) of the same images by tiny ``mae`` teachers of other random weights."""
    root = tmp_path_factory.mktemp("heldout")
    data = ImageSet.open(prepared_data)
    _extract(root / "a", data, tiny_teacher("mae", seed=0))
    _extract(root / "b", data, tiny_teacher("mae", seed=1))
    return root / "a", root / "b"


def test_a_held_out_store_of_other_teacher_weights_is_refused_naming_the_teacher(two_mae_stores, prepared_data):
    from train.diagnostics import load_samples
    from train.sweep import check_heldout

    a, b = two_mae_stores
    digests = [FeatureStore.open(s).teacher("mae").config["checkpoint_digest"] for s in (a, b)]
    assert digests[0] != digests[1]
    for call in (lambda: check_heldout(b, prepared_data, train=FeatureStore.open(a), teachers=["mae"]),
                 lambda: load_samples(b, ImageSet.open(prepared_data), indices=[0], teachers=["mae"],
                                      adapters_from=a)):
        with pytest.raises(StoreError, match=rf"{b}/mae: teacher mae has checkpoint digest {digests[1][:12]}, "
                                             rf"but {a}/mae was extracted from {digests[0][:12]}") as info:
            call()
        assert "\n" not in str(info.value)
    # the same weights pass (full tokens need no common basis)
    check_heldout(a, prepared_data, train=FeatureStore.open(a), teachers=["mae"])


def test_stats_from_a_store_of_other_teacher_weights_is_refused_before_any_block(two_mae_stores, prepared_data,
                                                                                 tmp_path, tiny_teacher):
    a, _ = two_mae_stores
    with pytest.raises(StoreError, match=r"--stats-from .*/a: its teacher mae was extracted from checkpoint "
                                         r"digest [0-9a-f]{12}, this one is [0-9a-f]{12}"):
        _extract(tmp_path / "held", ImageSet.open(prepared_data), tiny_teacher("mae", seed=1), codec="adapter",
                 stats_from=a)
    held = tmp_path / "held"
    assert not (held / "mae").exists() or FeatureStore.open(held).teacher("mae").complete_matrix().sum() == 0


def test_the_held_out_columns_score_every_held_out_image_and_say_how_many(two_mae_stores, prepared_data, tmp_path):
    """The learner trains on 1 of the store's 2 views, which its reload (load_run) accepts."""
    from train.config import load_config
    from train.diagnostics import load_run
    from train.loop import train
    from train.sweep import check_heldout, heldout_columns, parse_variant

    a, _ = two_mae_stores
    overrides = {"data.images": prepared_data, "data.store": a, "data.views": 1, "data.decoder": "pil",
                 "data.num_workers": 1, "data.shuffle_window": 2, "data.teachers": "[mae]", "train.batch_size": 4,
                 "model.depth": 1, "schedule.epochs": 1, "schedule.warmup_epochs": 0}
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    variants = [parse_variant("base:")]
    train(cfg, out_dir=tmp_path / "sweep", max_steps=1, progress=False, variants=variants)
    assert load_run(tmp_path / "sweep" / "base")[0].data.views == 1
    n = len(ImageSet.open(prepared_data))
    train_store = FeatureStore.open(a)
    held, images = check_heldout(a, prepared_data, train=train_store, teachers=["mae"])
    cols = heldout_columns(tmp_path / "sweep", variants, {"base": "done"}, store=held, data=images,
                           train_store=train_store, batch=5)
    assert cols["base"]["heldout_images"] == n
    assert np.isfinite(cols["base"]["heldout_total"])
    few = heldout_columns(tmp_path / "sweep", variants, {"base": "done"}, store=held, data=images,
                          train_store=train_store, images=4)
    assert few["base"]["heldout_images"] == 4 and few["base"]["heldout_total"] != cols["base"]["heldout_total"]


def test_the_documented_ablations_run_on_the_default_store_and_the_vit_s_one_names_the_stores_it_needs(
        prepared_data, tmp_path, tiny_teacher):
    """docs/ablations.yaml on a store of extract's default codec (adapter: 192 coefficients); the
    ViT-S learner of docs/ablations-vit-small.yaml is refused there naming options that serve it."""
    from pathlib import Path

    from train.config import apply_overrides, load_config
    from train.runstore import RunStore
    from train.sweep import load_sweep

    docs = Path(__file__).resolve().parents[2] / "docs"
    _extract(tmp_path / "store", ImageSet.open(prepared_data), tiny_teacher("mae"), codec="adapter")
    store = RunStore.open(tmp_path / "store", ImageSet.open(prepared_data), seed=0, teachers=["mae"])
    for v in load_sweep(docs / "ablations.yaml"):
        store.check_learners([apply_overrides(load_config(None, []), list(v.overrides))])
    (small,) = load_sweep(docs / "ablations-vit-small.yaml")
    with pytest.raises(StoreError, match=r"keeps 192 principal coefficients per token, fewer than the adapters' "
                                         r"width 384 \(model.embed_dim\); train this student on a store extracted "
                                         r"with --codec fp16 or int8, or --codec pca --pca-dim 384 or more"):
        store.check_learners([apply_overrides(load_config(None, []), list(small.overrides))])
