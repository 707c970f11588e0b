"""The adapter-space codec (store/codecs.py ``adapter``): int8 top-192 principal coefficients.

Measured against the fp16 tokens of the shared store on the same batches: what the frozen
adapters output, and the loss and gradients of one student step. Also the refusals that
keep it safe: trainable adapters need full tokens.
"""
import numpy as np
import pytest
import torch

from extract.estimate import bytes_per_sample
from extract.config import ExtractConfig
from extract.runner import run_extraction
from store import codecs
from data import views as V
from store.features import FeatureStore, StoreError
from data.shards import ImageSet
from train.adapters import TeacherAdapter
from train.config import load_config
from train.loader import Plan
from train.sources import build_source
from train.objective import build_objective

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TEACHERS = ("mae", "mocov3", "ibot")
STORED = ("mae",)        # one teacher extracted keeps the module short; bytes are counted for all three


@pytest.fixture(scope="module")
def adapter_store(prepared_data, tmp_path_factory, tiny_teacher):
    """The shared store's MAE teacher again (same random init, views, seed), adapter codec,
    statistics from all 13 images as the fp16 store's."""
    store = tmp_path_factory.mktemp("adapter") / "store"
    data = ImageSet.open(prepared_data)
    for name in STORED:
        summary = run_extraction(ExtractConfig(store=store, views=2, seed=0, batch_size=4, decoder="pil",
                                               codec="adapter", stats_images=13, view_pixels="none", device="cpu"),
                                 teacher=tiny_teacher(name), data=data, progress=False)
        assert summary["stats"] == "teacher pass before the blocks"
    return store


def _cfg(data, store, **kw):
    base = {"data.images": data, "data.store": store, "data.views": 2, "data.shuffle_window": 2,
            "data.decoder": "pil", "data.num_workers": 1, "data.streams": 2, "train.batch_size": 4,
            "schedule.epochs": 4, "schedule.warmup_epochs": 1, "data.teachers": f"[{','.join(STORED)}]"}
    base.update(kw)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def test_adapter_codec_stores_192_int8_coefficients_and_a_scale_per_token(adapter_store, prepared_data):
    ts = FeatureStore.open(adapter_store).teacher("mae")
    T = ts.n_visible + 1
    assert ts.config["codec"] == "adapter" and ts.config["pca_dim"] == codecs.ADAPTER_DIM
    got = ts.read_samples(0, np.arange(3))
    assert got["coeffs"].dtype == np.int8 and got["coeffs"].shape == (3, T, codecs.ADAPTER_DIM)
    assert got["scale"].dtype == np.float16 and got["scale"].shape == (3, T)
    assert (np.abs(got["coeffs"]).max(axis=-1) == 127).all()   # every token uses the full int8 range
    sizes = {}
    for name in TEACHERS:
        n_visible = V.num_visible(V.MASK_RATIOS[name])
        sizes[name] = bytes_per_sample("adapter", n_visible)
        assert sizes[name] < 0.13 * bytes_per_sample("fp16", n_visible)   # (192 + 2) / (768 * 2) + masks
    # the figure: about 68 KB per (image, view) for the three teachers against 534 KB
    total = sum(sizes.values())
    assert 66_000 < total < 72_000, total


def test_frozen_adapter_outputs_match_the_fp16_tokens(adapter_store, teacher_store, prepared_data):
    """A(decoded coefficients) vs A(fp16 tokens) with one adapter (the adapter store's statistics)."""
    n = len(ImageSet.open(prepared_data))
    worst, means = {}, {}
    for name in STORED:
        ts = FeatureStore.open(adapter_store).teacher(name)
        ref = FeatureStore.open(teacher_store).teacher(name)
        adapter = TeacherAdapter(in_dim=ts.width, name=name)
        adapter.init_from_pca(ts.stats["mean"], ts.stats["components"])
        for slot in (0, 1):
            a = adapter(ts.decode(ts.read_samples(slot, np.arange(n))).flatten(0, 1))
            b = adapter(ref.decode(ref.read_samples(slot, np.arange(n))).flatten(0, 1))
            cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
            worst[name] = min(worst.get(name, 1.0), float(cos.min()))
            means[name] = float(cos.mean())
    print(f"cosine after the frozen adapter, worst token: {worst}; mean: {means}")
    assert min(worst.values()) > 0.999 and min(means.values()) > 0.9999


def test_one_step_on_adapter_coefficients_matches_fp16_tokens(adapter_store, teacher_store, prepared_data,
                                                              step_difference):
    """Loss and gradients of the same batch, same objective (the adapter store's statistics),
    from the fp16 tokens and from the adapter-space coefficients."""
    data = ImageSet.open(prepared_data)
    plan = Plan(data, seed=0, views=2, batch_size=4, window=2, streams=2)
    fp16, _ = build_source(_cfg(prepared_data, teacher_store), plan, online=False, device="cpu")
    coded, stats = build_source(_cfg(prepared_data, adapter_store), plan, online=False, device="cpu")
    for epoch in (0, 1):
        _, bf = next(iter(fp16.epoch(epoch)))
        _, bc = next(iter(coded.epoch(epoch)))
        bf, bc = fp16.materialize(bf, "cpu"), coded.materialize(bc, "cpu")
        torch.testing.assert_close(bf["images"], bc["images"], rtol=0, atol=0)
        torch.manual_seed(0)
        lf, rel_loss, rel_grad = step_difference(build_objective(_cfg(prepared_data, adapter_store), stats), bf, bc)
        print(f"adapter codec epoch {epoch}: loss {lf:.6f}, relative loss diff {rel_loss:.2e}, "
              f"relative gradient diff {rel_grad:.2e}")
        assert rel_loss <= 1e-3 and rel_grad <= 1e-2


def test_trainable_adapters_refuse_the_adapter_codec_in_one_line(adapter_store, prepared_data):
    plan = Plan(ImageSet.open(prepared_data), seed=0, views=2, batch_size=4, window=2, streams=2)
    cfg = _cfg(prepared_data, adapter_store, **{"adapters.mode": "trainable"})
    with pytest.raises(StoreError, match=r"codec adapter keeps only 192 .*adapters.mode=trainable") as info:
        build_source(cfg, plan, online=False, device="cpu")
    assert "\n" not in str(info.value) and str(adapter_store) in str(info.value)


def test_random_adapters_refuse_a_coefficient_store_in_one_line(adapter_store, prepared_data):
    plan = Plan(ImageSet.open(prepared_data), seed=0, views=2, batch_size=4, window=2, streams=2)
    with pytest.raises(StoreError, match=r"codec adapter stores coefficients .* adapters.init=random") as info:
        build_source(_cfg(prepared_data, adapter_store, **{"adapters.init": "random"}), plan, online=False,
                     device="cpu")
    assert "\n" not in str(info.value) and str(adapter_store) in str(info.value)


@pytest.mark.parametrize("codec", ["adapter", "pca"])
def test_a_coefficient_codec_refuses_statistics_of_fewer_tokens_than_coefficients(prepared_data, tmp_path,
                                                                                 adapter_store, codec, tiny_teacher):
    """One image's tokens span fewer directions than the codec keeps: the extraction refuses
    before any block (nothing written but the store's skeleton), naming the teacher and the
    counts; a store whose recorded statistics are that thin is refused by training."""
    data = ImageSet.open(prepared_data)
    store = tmp_path / "thin"
    with pytest.raises(codecs.CodecError) as info:
        run_extraction(ExtractConfig(store=store, views=1, seed=0, batch_size=4, decoder="pil", codec=codec,
                                     stats_images=1, view_pixels="none", device="cpu"),
                       teacher=tiny_teacher("mae"), data=data, progress=False)
    dim = codecs.stored_dim(codec)
    assert str(info.value) == (f"{store / 'mae'}: teacher mae: codec {codec} keeps {dim} coefficients per token "
                               f"but its statistics come from only 99 tokens (at least {dim + 1} are needed); "
                               "sample more images (extract --stats-images, on a larger set) or use --codec "
                               "fp16 or int8")
    ts = FeatureStore.open(store).teacher("mae")
    assert not ts.has_stats and not ts.complete_matrix().any()
    # 13 images' tokens (1287) are enough; a store that records fewer (an older extraction) is refused
    assert codecs.statistics_problem(codec, 13 * 99) is None
    import shutil
    old = tmp_path / "old"
    shutil.copytree(adapter_store, old)
    attrs = FeatureStore.open(old).teacher("mae").group["stats"].attrs
    attrs["count"] = 150
    del attrs["digest"]                 # that extraction recorded none (format_version 2)
    plan = Plan(data, seed=0, views=2, batch_size=4, window=2, streams=2)
    with pytest.raises(StoreError, match="codec adapter keeps 192 coefficients per token but its statistics "
                                         "come from only 150 tokens"):
        build_source(_cfg(prepared_data, old), plan, online=False, device="cpu")


def test_encode_decode_round_trip_is_exact_on_the_adapter_subspace():
    """Synthetic tokens with a known spectrum: decoding gives mean + c @ basis with c within one
    quantisation step (per token, per whitened coordinate) of the true coefficients."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(768, 768, generator=g, dtype=torch.float64))[0].T.float()
    sqrt_eig = torch.logspace(1, -2, 768).float()              # 10 .. 0.01: a steep spectrum
    mean = torch.randn(768, generator=g)
    c_all = torch.randn(5, 7, 768, generator=g) * sqrt_eig
    tokens = mean + c_all @ basis
    dim = codecs.ADAPTER_DIM
    pca = {"mean": mean.numpy(), "basis": basis[:dim].numpy(), "sqrt_eig": sqrt_eig[:dim].numpy()}
    arrays = codecs.encode("adapter", tokens, pca=pca)
    assert set(arrays) == set(codecs.payload_arrays("adapter", (7, 768)))
    back = codecs.decode("adapter", arrays, pca=pca)
    c_back = (back - mean) @ basis[:dim].T
    step = torch.from_numpy(arrays["scale"]).float()[..., None] * sqrt_eig[:dim]
    assert ((c_back - c_all[..., :dim]).abs() <= 0.5 * step * 1.01 + 1e-4).all()
    # whitening: the smallest kept direction is resolved as finely as the largest, relatively
    rel = ((c_back - c_all[..., :dim]).abs() / sqrt_eig[:dim]).amax(dim=(0, 1))
    assert rel[-1] < 0.05 and rel[0] < 0.05
    with pytest.raises(ValueError, match="adapter codec needs the teacher's statistics"):
        codecs.encode("adapter", tokens)


def test_estimate_counts_the_adapter_codec_bytes():
    n = V.num_visible(V.MASK_RATIOS["mae"])
    assert bytes_per_sample("adapter", n) - bytes_per_sample("fp16", n) == (n + 1) * (192 + 2 - 768 * 2)


def test_a_store_read_with_another_stores_adapters_must_hold_their_basis(adapter_store, prepared_data, tmp_path,
                                                                         tiny_teacher):
    """A held-out store evaluated with the training store's adapters: on its own statistics'
    basis it is refused in one line; extracted with ``stats_from`` it holds the same
    coefficients as the training store (same images here), and verify accepts the copy."""
    from store.verify import verify_store
    from train.diagnostics import load_samples

    data = ImageSet.open(prepared_data)

    def extract(store, **kw):
        return run_extraction(ExtractConfig(store=store, seed=0, batch_size=4, decoder="pil", codec="adapter",
                                            view_pixels="none", device="cpu", **kw),
                              teacher=tiny_teacher("mae"), data=data, progress=False)

    extract(tmp_path / "own", views=1, stats_images=7)
    with pytest.raises(StoreError, match=r"own/mae: codec adapter holds coefficients on its own statistics' "
                                         r"basis, not on that of .*adapter.*/store/mae, whose adapters read it") as info:
        load_samples(tmp_path / "own", data, indices=[0], teachers=["mae"], adapters_from=adapter_store)
    assert "\n" not in str(info.value)
    summary = extract(tmp_path / "copied", views=2, stats_images=7, stats_from=adapter_store)
    assert summary["stats"] == f"copied from {adapter_store}"
    got, want = (FeatureStore.open(s).teacher("mae") for s in (tmp_path / "copied", adapter_store))
    assert codecs.basis_digest(got.stats) == codecs.basis_digest(want.stats)
    assert got.stats["origin"]["store"] == str(adapter_store)
    for key in ("coeffs", "scale"):
        np.testing.assert_array_equal(got.read_samples(0, np.arange(13))[key], want.read_samples(0, np.arange(13))[key])
    samples = load_samples(tmp_path / "copied", data, indices=[0, 1], teachers=["mae"], adapters_from=adapter_store)
    assert len(samples) == 2
    assert verify_store(tmp_path / "copied", data, progress=False)[0] == []


def test_the_extract_command_takes_the_statistics_of_another_store_with_stats_from(adapter_store, prepared_data,
                                                                                    tmp_path, tiny_random_init):
    from click.testing import CliRunner

    from cli import main
    held = tmp_path / "held"
    result = CliRunner().invoke(main, ["extract", "--teacher", "mae", "--data", str(prepared_data), "--store",
                                       str(held), "--random-init", "--views", "1", "--codec", "adapter", "--decoder",
                                       "pil", "--device", "cpu", "--max-blocks", "1", "--stats-from",
                                       str(adapter_store)])
    assert result.exit_code == 0, (result.output, result.exception)
    got, want = (FeatureStore.open(s).teacher("mae") for s in (held, adapter_store))
    assert codecs.basis_digest(got.stats) == codecs.basis_digest(want.stats)
    assert got.stats["origin"]["store"] == str(adapter_store)
