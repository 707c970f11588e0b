"""Opening a store checks its metadata against itself before anything is read or allocated:
crafted root attributes, array shapes, dtypes and chunks, and teacher configs that contradict
the arrays are refused in one line naming the file."""
import json
import time

import numpy as np
import pytest

from store.features import DataInfo, FeatureStore, StoreError

V, N, S, C = 2, 11, 4, 32
CONFIG = dict(codec="int8", n_visible=5, mask_ratio=0.5, checkpoint_digest="abc", untrained=True, pca_dim=0,
              embed_dim=C, input="source")


@pytest.fixture
def store(tmp_path):
    """A store of 11 images in shards of 4, 2 views, teacher ``mae`` (int8, 32 wide) with statistics."""
    path = tmp_path / "store"
    data = DataInfo(digest="d0", num_samples=N, shards=[[f, min(S, N - f)] for f in range(0, N, S)])
    ts = FeatureStore.create_or_open(path, data=data, views=V, seed=0).create_teacher("mae", CONFIG)
    ts.write_stats(np.zeros(C, np.float32), np.eye(C, dtype=np.float32), np.ones(C, np.float32), count=100,
                   indices=np.arange(4))
    return path


def _set(*keys, value):
    """A change of the zarr.json at ``keys`` to ``value``."""
    def change(meta):
        for k in keys[:-1]:
            meta = meta[k]
        meta[keys[-1]] = value
    return change


# (file changed, change, file the refusal names)
CRAFTS = {
    "root views": ("zarr.json", _set("attributes", "views", value=10 ** 7), "zarr.json"),
    "root views zero": ("zarr.json", _set("attributes", "views", value=0), "zarr.json"),
    "root samples": ("zarr.json", _set("attributes", "num_samples", value=10 ** 12), "zarr.json"),
    "root shards": ("zarr.json", _set("attributes", "shards", 1, value=[5, 4]), "zarr.json"),
    "tokens width": ("mae/tokens/zarr.json", _set("shape", value=[V, N, 6, 10 ** 9]), "mae/tokens/zarr.json"),
    "tokens samples": ("mae/tokens/zarr.json", _set("shape", value=[V, 10 ** 12, 6, C]), "mae/tokens/zarr.json"),
    "tokens shards": ("mae/tokens/zarr.json", _set("chunk_grid", "configuration", "chunk_shape", value=[1, N, 6, C]),
                      "mae/tokens/zarr.json"),
    "visible dtype": ("mae/visible/zarr.json", _set("data_type", value="int64"), "mae/visible/zarr.json"),
    "complete shape": ("mae/complete/zarr.json", _set("shape", value=[10 ** 6, 10 ** 6]), "mae/complete/zarr.json"),
    "components shape": ("mae/stats/components/zarr.json", _set("shape", value=[10 ** 6, 10 ** 6]),
                         "mae/stats/components/zarr.json"),
    "config embed_dim": ("mae/zarr.json", _set("attributes", "config", "embed_dim", value=10 ** 9),
                         "mae/tokens/zarr.json"),
    "config n_visible": ("mae/zarr.json", _set("attributes", "config", "n_visible", value=10 ** 9), "mae/zarr.json"),
    "config codec": ("mae/zarr.json", _set("attributes", "config", "codec", value="zip"), "mae/zarr.json"),
    "config views": ("mae/zarr.json", _set("attributes", "config", "views", value=3), "mae/zarr.json"),
}


@pytest.mark.parametrize("craft", CRAFTS)
def test_crafted_metadata_is_refused_at_open_in_one_line_naming_the_file(store, craft):
    file, change, named = CRAFTS[craft]
    meta = json.loads((store / file).read_text())
    change(meta)
    (store / file).write_text(json.dumps(meta))
    start = time.perf_counter()
    with pytest.raises(StoreError) as refusal:
        FeatureStore.open(store).teacher("mae")
    message = str(refusal.value)
    assert "\n" not in message and f"{store / named}:" in message, message
    assert time.perf_counter() - start < 2
