"""The feature store: block round trips per codec, completion semantics, refusals, and a
second zarr v3 implementation (tensorstore) reading the same arrays."""
import numpy as np
import pytest
import torch

from store import codecs
from store.features import DataInfo, FeatureStore, StoreError

V, N, S = 2, 11, 4          # shards of 4, 4, 3
N_VIS = 5                   # tiny mask so blocks are small


def _data(digest="d0"):
    shards = [[f, min(S, N - f)] for f in range(0, N, S)]
    return DataInfo(digest=digest, num_samples=N, shards=shards)


def _config(codec="fp16", **kw):
    return dict(codec=codec, n_visible=N_VIS, mask_ratio=0.5, checkpoint_digest="abc",
                untrained=True, pca_dim=4, **kw)


def _block(ts, slot, shard, rng):
    first, count = ts.root.shards[shard]
    idx = np.arange(first, first + count)
    tokens = torch.from_numpy(rng.standard_normal((count, N_VIS + 1, 768)).astype(np.float32))
    payload = codecs.encode(ts.codec, tokens, pca=ts.pca)
    ts.write_block(slot, shard, index=idx, view=(idx + slot) % V,
                   boxes=np.tile([1, 2, 3, 4], (count, 1)), flips=idx % 2 == 1,
                   visible=np.tile(np.arange(N_VIS), (count, 1)), payload=payload)
    return tokens


def _with_stats(ts, rng):
    mean = rng.standard_normal(768).astype(np.float32)
    q, _ = np.linalg.qr(rng.standard_normal((768, 768)))
    ts.write_stats(mean, q.T.astype(np.float32), np.linspace(2, 1, 768), count=100,
                   indices=np.arange(4))


@pytest.mark.parametrize("codec", ["fp16", "int8", "pca"])
def test_written_blocks_read_back_and_decode(tmp_path, codec):
    rng = np.random.default_rng(0)
    fs = FeatureStore.create_or_open(tmp_path / "s", data=_data(), views=V, seed=3)
    ts = fs.create_teacher("mae", _config(codec))
    _with_stats(ts, rng)
    written = {}
    for slot in range(V):
        for shard in range(3):
            written[slot, shard] = _block(ts, slot, shard, rng)
    assert ts.complete_matrix().all() and ts.missing() == []
    reopened = FeatureStore.open(tmp_path / "s", data=_data(), views=V, seed=3).teacher("mae")
    for (slot, shard), tokens in written.items():
        b = reopened.read_block(slot, shard)
        first, count = fs.shards[shard]
        np.testing.assert_array_equal(b["index"], np.arange(first, first + count))
        np.testing.assert_array_equal(b["flips"], b["index"] % 2 == 1)
        got = reopened.decode({k: b[k] for k in reopened.payload_keys})
        if codec == "fp16":
            torch.testing.assert_close(got, tokens.half().float())
        elif codec == "int8":
            rel = (got - tokens).norm() / tokens.norm()
            assert rel < 0.01
        else:  # pca on a random basis keeps only the projection onto 4 directions
            basis = torch.from_numpy(reopened.pca["basis"]).float()
            mean = torch.from_numpy(reopened.pca["mean"]).float()
            want = (tokens - mean) @ basis.T @ basis + mean
            torch.testing.assert_close(got, want, atol=2e-2, rtol=1e-2)
    some = reopened.read_samples(1, [0, 5, 10])
    np.testing.assert_array_equal(some["index"], [0, 5, 10])


def test_unfinished_block_does_not_exist_for_readers(tmp_path):
    rng = np.random.default_rng(1)
    fs = FeatureStore.create_or_open(tmp_path / "s", data=_data(), views=V, seed=0)
    ts = fs.create_teacher("ibot", _config())
    _block(ts, 0, 1, rng)
    # a block whose arrays were written but whose completion record was not
    ts.group["tokens"][1, 0:4] = np.ones((4, N_VIS + 1, 768), np.float16)
    assert ts.is_complete(0, 1) and not ts.is_complete(1, 0)
    assert (1, 0) in ts.missing() and len(ts.missing()) == V * 3 - 1
    with pytest.raises(StoreError, match=r"block \(slot 1, shard 0\) is not complete"):
        ts.read_block(1, 0)
    with pytest.raises(StoreError, match="5 of 6 blocks are incomplete"):
        ts.require_complete()


def test_mismatched_data_views_seed_or_config_are_refused(tmp_path):
    fs = FeatureStore.create_or_open(tmp_path / "s", data=_data(), views=V, seed=0)
    fs.create_teacher("mae", _config())
    with pytest.raises(StoreError, match="data_digest: store has 'd0', expected 'other'"):
        FeatureStore.open(tmp_path / "s", data=_data("other"))
    with pytest.raises(StoreError, match="views: store has 2, expected 4"):
        FeatureStore.open(tmp_path / "s", views=4)
    with pytest.raises(StoreError, match="seed"):
        FeatureStore.create_or_open(tmp_path / "s", data=_data(), views=V, seed=1)
    with pytest.raises(StoreError, match="codec: store has 'fp16', expected 'int8'"):
        fs.create_teacher("mae", _config("int8"))
    with pytest.raises(StoreError, match="no teacher 'ibot'"):
        fs.teacher("ibot")
    with pytest.raises(StoreError, match="no feature store here"):
        FeatureStore.open(tmp_path / "nothing")


def test_block_with_wrong_indices_is_refused(tmp_path):
    fs = FeatureStore.create_or_open(tmp_path / "s", data=_data(), views=V, seed=0)
    ts = fs.create_teacher("mae", _config())
    with pytest.raises(StoreError, match="must hold images 4..7 in order"):
        ts.write_block(0, 1, index=np.array([4, 5, 7, 6]), view=np.zeros(4), boxes=np.zeros((4, 4)),
                       flips=np.zeros(4, bool), visible=np.zeros((4, N_VIS)),
                       payload={"tokens": np.zeros((4, N_VIS + 1, 768), np.float16)})


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_tensorstore_reads_the_same_arrays(tmp_path, codec):
    ts_lib = pytest.importorskip("tensorstore")
    rng = np.random.default_rng(2)
    fs = FeatureStore.create_or_open(tmp_path / "s", data=_data(), views=V, seed=0)
    t = fs.create_teacher("mocov3", _config(codec))
    for shard in range(3):
        _block(t, 0, shard, rng)
    for key in ("index", "boxes", "flips", "visible", *t.payload_keys):
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "s" / "mocov3" / key)}}
        other = ts_lib.open(spec, read=True).result().read().result()
        np.testing.assert_array_equal(other, t.group[key][...], err_msg=key)
