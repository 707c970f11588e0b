"""Extraction end to end: cached tokens equal a fresh teacher forward, a SIGKILLed run
resumes to the same store (its view pixels too), two torchrun node launchers (one rank each,
a c10d rendezvous) write the same store as one process, verify.

Every teacher is tiny (tests/conftest.py ``tiny_teacher``; ``tiny_cli`` and ``tiny_random_init``
for the command line): what is tested is what extraction does with a teacher's tokens."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from cli import main

from extract.config import ExtractConfig
from extract.runner import Extractor, run_extraction
from store.verify import verify_store
from store.features import FeatureStore
from store.viewpixels import ViewPixels
from data.shards import ImageSet
from tests.two_nodes import run_two_nodes

ROOT = Path(__file__).resolve().parents[2]
VIEWS = 2
# fp32 CPU kernels sum in an order that depends on the thread count, and torchrun gives each
# rank one thread: every run compared here uses one thread, so stores are bit-identical.
pytestmark = pytest.mark.usefixtures("one_torch_thread")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _extract_args(data, store, *extra, view_pixels="none"):
    return ["extract", "--teacher", "mae", "--data", str(data), "--store", str(store), "--random-init",
            "--views", str(VIEWS), "--batch-size", "2", "--decoder", "pil", "--device", "cpu", "--codec", "fp16",
            "--view-pixels", view_pixels, *extra]


def _arrays(store, teacher="mae"):
    g = zarr.open_group(str(Path(store) / teacher), mode="r")
    return {k: g[k][...] for k in ("index", "view", "boxes", "flips", "visible", "tokens", "complete")}


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return tiny_teacher("mae")       # what ``extract --random-init`` builds under tiny_cli / tiny_random_init


def _reference(data, store, teacher, view_pixels="none"):
    """One uninterrupted single-process, single-thread run (the PIL decoder, as the CLI runs below)."""
    run_extraction(ExtractConfig(store=store, views=VIEWS, seed=0, batch_size=2, decoder="pil", codec="fp16",
                                 view_pixels=view_pixels, device="cpu"), teacher=teacher,
                   data=ImageSet.open(data), progress=False)
    return store


@pytest.fixture(scope="module")
def reference_store(prepared_data, tmp_path_factory, teacher, one_torch_thread):
    return _reference(prepared_data, tmp_path_factory.mktemp("ref") / "store", teacher)


def test_cached_fp16_tokens_equal_a_fresh_forward(prepared_data, reference_store, teacher):
    """Bit-exact (after the fp16 cast) for the same batch composition and thread count."""
    ds = ImageSet.open(prepared_data)
    ts = FeatureStore.open(reference_store).teacher("mae")
    ex = Extractor(teacher, ds, seed=0, views=VIEWS, batch_size=2, device="cpu", decoder="pil")
    for idx in (np.array([0, 1]), np.array([12])):      # batches exactly as extraction made them
        for slot in range(VIEWS):
            got = ts.read_samples(slot, idx)
            vb = ex.view_batch(idx, ds.read_many(idx), slot)
            np.testing.assert_array_equal(got["boxes"], vb.boxes)
            np.testing.assert_array_equal(got["visible"], vb.visible)
            fresh = ex.tokens(vb)
            torch.testing.assert_close(ts.decode(got), fresh.half().float(), rtol=0, atol=0)


@pytest.mark.parametrize("codec,min_cos,max_rel", [("int8", 0.9999, 0.01), ("pca", None, None)])
def test_other_codecs_are_faithful(prepared_data, reference_store, teacher, tmp_path, codec, min_cos, max_rel):
    ds = ImageSet.open(prepared_data)
    summary = run_extraction(ExtractConfig(store=tmp_path / "s", views=VIEWS, seed=0, batch_size=4, decoder="pil",
                                           codec=codec, pca_dim=256, view_pixels="none", device="cpu"),
                             teacher=teacher, data=ds, progress=False)
    assert summary["stats"] == "teacher pass before the blocks"     # one rule for every codec
    ts = FeatureStore.open(tmp_path / "s").teacher("mae")
    ref = FeatureStore.open(reference_store).teacher("mae")
    idx = np.arange(len(ds))
    a = ts.decode(ts.read_samples(0, idx)).flatten(0, 1)
    b = ref.decode(ref.read_samples(0, idx)).flatten(0, 1)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    rel = (a - b).norm() / b.norm()
    if codec == "int8":
        assert cos.min() > min_cos and rel < max_rel
    else:
        # the pca codec keeps the top 256 directions: exact on that subspace up to fp16
        basis = torch.from_numpy(ts.pca["basis"]).float()
        mean = torch.from_numpy(ts.pca["mean"]).float()
        proj = (b - mean) @ basis.T @ basis + mean
        torch.testing.assert_close(a, proj, atol=2e-2, rtol=2e-2)


def _covariance(st) -> np.ndarray:
    return st["components"].T.astype(np.float64) * st["eigenvalues"] @ st["components"].astype(np.float64)


def test_statistics_of_every_codec_are_a_teacher_pass_over_the_keyed_sample(prepared_data, reference_store, teacher):
    """One rule: the unrounded tokens of a teacher pass over ``views.stats_sample``, before the
    blocks, whatever the codec; so an fp16 store's statistics are exactly a fresh pass's (not
    its own fp16-rounded tokens', ~2e-4 away), and those of a pca or adapter store."""
    from extract.runner import compute_stats
    from data import views as V
    ts = FeatureStore.open(reference_store).teacher("mae")
    np.testing.assert_array_equal(ts.stats["indices"], V.stats_sample(0, 13, 1024))    # all 13 images
    ex = Extractor(teacher, ImageSet.open(prepared_data), seed=0, views=VIEWS, batch_size=2, device="cpu",
                   decoder="pil")
    fresh = compute_stats(ex, num_images=1024)
    assert fresh["count"] == ts.stats["count"] == 13 * (1 + V.num_visible(V.MASK_RATIOS["mae"]))
    scale = np.abs(fresh["mean"]).max()        # the fp16 tokens' statistics are ~2e-4 (relative) away
    np.testing.assert_allclose(ts.stats["mean"], fresh["mean"], rtol=0, atol=1e-6 * scale)
    a, b = _covariance(ts.stats), _covariance(fresh)
    assert np.linalg.norm(a - b) < 1e-6 * np.linalg.norm(b)
    # a sample of 4 of the 13: not the first 4
    four = compute_stats(ex, num_images=4)
    np.testing.assert_array_equal(four["indices"], V.stats_sample(0, 13, 4))
    assert not np.array_equal(four["indices"], np.arange(4))
    assert np.linalg.norm(_covariance(four) - _covariance(fresh)) > 0


def test_sigkill_then_resume_gives_identical_store(one_image_shards, teacher, tmp_path, sigkill_when, tiny_cli,
                                                  tiny_random_init):
    """Killed among 26 blocks of one image each (the tokens' writer: a tiny teacher writes a block in
    ~30 ms, so the 24 left after the kill's condition are ~10 polls of it), resumed in process."""
    store, reference = tmp_path / "store", _reference(one_image_shards, tmp_path / "reference", teacher)

    def two_blocks_done():
        return ((store / "mae" / "complete" / "zarr.json").exists()
                and FeatureStore.open(store).teacher("mae").complete_matrix().sum() >= 2)

    sigkill_when(tiny_cli(*_extract_args(one_image_shards, store)), two_blocks_done, env=ENV, cwd=ROOT)
    partial = FeatureStore.open(store).teacher("mae").complete_matrix()
    done = int((partial > 0).sum())
    print(f"killed with {done} of {partial.size} blocks complete")
    assert 0 < partial.sum() < partial.size
    out = CliRunner().invoke(main, _extract_args(one_image_shards, store))
    assert out.exit_code == 0, (out.output, out.exception)
    assert f"mae: {partial.size - done} blocks written, {done} already complete" in out.output
    got, want = _arrays(store), _arrays(reference)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    problems, _ = verify_store(store, ImageSet.open(one_image_shards), progress=False)
    assert problems == []


def _view_files(store):
    return {p.relative_to(store): p.read_bytes() for p in sorted((store / "pixels").rglob("*")) if p.is_file()}


def test_sigkill_then_resume_with_view_pixels_gives_an_identical_store(one_image_shards, teacher, tmp_path,
                                                                   sigkill_when, tiny_cli, tiny_random_init):
    """Killed among 26 view blocks (the view tars' writer, as above), resumed in process."""
    store = tmp_path / "store"
    reference = _reference(one_image_shards, tmp_path / "reference", teacher, view_pixels="jpeg")

    def two_view_blocks_done():
        return len(list((store / "pixels").glob("slot-*/*.json"))) >= 2

    args = _extract_args(one_image_shards, store, view_pixels="jpeg")
    sigkill_when(tiny_cli(*args), two_view_blocks_done, env=ENV, cwd=ROOT)
    partial = ViewPixels.open(FeatureStore.open(store)).complete_matrix()
    done = int(((partial > 0) & (FeatureStore.open(store).teacher("mae").complete_matrix() > 0)).sum())
    print(f"killed with {partial.sum()} of {partial.size} view blocks complete ({done} with their tokens)")
    assert 0 < partial.sum() < partial.size
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, (out.output, out.exception)
    assert f"mae: {partial.size - done} blocks written, {done} already complete" in out.output
    got, want = _view_files(store), _view_files(reference)
    assert sorted(got) == sorted(want) and len(want) == 1 + 3 * 26     # zarr.json + (tar, idx, record) x 26
    for name in want:
        assert got[name] == want[name], name
    got, want = _arrays(store), _arrays(reference)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert verify_store(store, ImageSet.open(one_image_shards), progress=False)[0] == []


def test_two_torchrun_nodes_of_one_rank_write_the_same_store_as_one_process(prepared_data, reference_store,
                                                                            tmp_path, tiny_cli):
    store = tmp_path / "store"
    nodes = run_two_nodes(["--no-python", *tiny_cli(*_extract_args(prepared_data, store))], logs=tmp_path / "logs",
                          cwd=ROOT, env=ENV, timeout=300)
    assert [code for code, _ in nodes] == [0, 0], "\n".join(out[-3000:] for _, out in nodes)
    # rank 0 wrote the blocks of image shards 0 and 2 of 3 (2 views each): a world of two
    assert sum("mae: 4 blocks written, 0 already complete" in out for _, out in nodes) == 1
    got, want = _arrays(store), _arrays(reference_store)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_verify_reports_incomplete_and_mismatched_stores(prepared_data, photo_tree, reference_store, tmp_path):
    ds = ImageSet.open(prepared_data)
    assert verify_store(reference_store, ds, progress=False)[0] == []
    # an incomplete block
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(reference_store, broken)
    FeatureStore.open(broken).teacher("mae").group["complete"][1, 0] = 0
    problems, _ = verify_store(broken, ds, progress=False)
    assert any("1 of" in p and "incomplete" in p for p in problems)
    # a tampered mask
    shutil.rmtree(broken)
    shutil.copytree(reference_store, broken)
    g = FeatureStore.open(broken).teacher("mae").group
    vis = g["visible"][0, 0:5]
    vis[0, 0] += 1
    g["visible"][0, 0:5] = vis
    problems, _ = verify_store(broken, ds, progress=False)
    assert any("stored masks differ" in p for p in problems)
    # statistics recorded from another sample than the keyed one
    shutil.rmtree(broken)
    shutil.copytree(reference_store, broken)
    ts = FeatureStore.open(broken).teacher("mae")
    st = ts.stats
    ts.write_stats(st["mean"], st["components"], st["eigenvalues"], st["count"], indices=np.arange(13)[::-1])
    problems, _ = verify_store(broken, ds, progress=False)
    assert any("stats/indices" in p and "not the keyed statistics sample" in p for p in problems)
    # other data
    from data.shards import prepare
    other = prepare(photo_tree, tmp_path / "other", shard_size=4, progress=False)
    problems, _ = verify_store(reference_store, other, progress=False)
    assert problems and "does not match" in problems[0]
    # the CLI exits non-zero
    r = CliRunner().invoke(main, ["verify", str(reference_store), "--data", str(tmp_path / "other")])
    assert r.exit_code == 1 and "PROBLEM" in r.stderr


def test_estimate_prints_bytes_and_hours(prepared_data, tmp_path, tiny_random_init):
    r = CliRunner().invoke(main, _extract_args(prepared_data, tmp_path / "s", "--estimate"))
    assert r.exit_code == 0, (r.output, r.exception)
    assert "GiB" in r.stdout and " h on 1 rank" in r.stdout
    assert not (tmp_path / "s").exists()


def test_estimated_bytes_match_the_finished_store_within_5_percent(prepared_data, teacher_store, tiny_teacher):
    """The store's tokens are uncompressed and its statistics a fixed size (measured: mae
    +2.7% on a ViT-B, the zstd'ed statistics and small arrays; the old zstd-ratio estimate was -41%)."""
    model, teacher = tiny_teacher("mae"), "mae"        # the shared store's teacher
    assert (model.name, model.untrained) == (teacher, True)
    from extract.estimate import estimate_run
    data = ImageSet.open(prepared_data)
    ex = Extractor(model, data, seed=0, views=2, batch_size=2, device="cpu", decoder="pil", num_threads=1)
    e = estimate_run(ex, codec="fp16", pca_dim=256, num_images=len(data), views=2, batches=1, stats_images=4,
                     view_pixels="none")
    on_disk = sum(f.stat().st_size for f in (Path(teacher_store) / teacher).rglob("*") if f.is_file())
    print(f"{teacher}: estimated {e['total_bytes']} B, store {on_disk} B, "
          f"{e['total_bytes'] / on_disk - 1:+.2%}")
    assert abs(e["total_bytes"] / on_disk - 1) < 0.05
    assert "zstd_ratio" not in e and e["measured_images"] == 2


class _PixelTeacher(torch.nn.Module):
    """A stand-in for a ViT with the Teacher call signature: tokens are pixel means, so the
    test checks batching and order, not a network."""
    name = "mae"

    def forward(self, images, visible):
        cells = images.unfold(2, 16, 16).unfold(3, 16, 16).mean((-1, -2)).flatten(2).transpose(1, 2)  # (B, 196, 3)
        patch = torch.gather(cells, 1, visible[..., None].expand(-1, -1, 3)).repeat(1, 1, 256)
        return {"cls": images.mean((2, 3)).repeat(1, 256), "patch": patch}


def test_one_producer_over_all_blocks_cuts_batches_per_block(prepared_data):
    """Extractor.stream runs one decode thread over every block of the rank, yet each batch
    holds consecutive images of one block cut from the block's start (what makes the store
    independent of the block order and of resumes), with the same tokens as block by block."""
    ds = ImageSet.open(prepared_data)
    ex = Extractor(_PixelTeacher(), ds, seed=0, views=VIEWS, batch_size=2, device="cpu", decoder="pil")
    blocks = [(np.arange(5, 10), 1), (np.arange(0, 5), 0), (np.arange(10, 13), 1)]
    got = list(ex.stream(blocks))
    assert [(k, vb.index.tolist(), last) for k, vb, _, last in got] == [
        (0, [5, 6], False), (0, [7, 8], False), (0, [9], True), (1, [0, 1], False), (1, [2, 3], False),
        (1, [4], True), (2, [10, 11], False), (2, [12], True)]
    for k, (index, slot) in enumerate(blocks):
        alone = torch.cat([tok for _, tok in ex.batches(index, slot)])
        streamed = torch.cat([tok for j, _, tok, _ in got if j == k])
        torch.testing.assert_close(streamed, alone, rtol=0, atol=0)
        views = np.concatenate([vb.view for j, vb, _, _ in got if j == k])
        np.testing.assert_array_equal(views, (index + slot) % VIEWS)
    assert all(vb.images is None for _, vb, _, _ in got)       # handed to the device, not kept
