"""Views and masks: determinism across processes and batch orders, bounds, exact sizes, uniformity."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data import views as V

ROOT = Path(__file__).resolve().parents[2]
SIZES_W = np.array([500, 640, 333, 1024, 224, 97, 4000, 17])
SIZES_H = np.array([375, 480, 500, 200, 224, 600, 30, 17])


def _draw(seed, idx, view, widths, heights):
    boxes, flips = V.view_params(seed, idx, view, widths, heights)
    masks = {t: V.teacher_visible(seed, idx, view, t) for t in ("mae", "mocov3", "ibot")}
    student = V.student_visible(seed, idx, epoch=3)
    return boxes, flips, masks, student


def test_same_keys_give_identical_views_in_any_batch_order():
    idx = np.arange(1000, 1200)
    w = np.resize(SIZES_W, idx.size)
    h = np.resize(SIZES_H, idx.size)
    view = idx % 4
    a = _draw(7, idx, view, w, h)
    perm = np.random.default_rng(0).permutation(idx.size)
    b = _draw(7, idx[perm], view[perm], w[perm], h[perm])
    np.testing.assert_array_equal(a[0][perm], b[0])
    np.testing.assert_array_equal(a[1][perm], b[1])
    for t in a[2]:
        np.testing.assert_array_equal(a[2][t][perm], b[2][t])
    np.testing.assert_array_equal(a[3][perm], b[3])
    # one sample alone gives the same as inside a batch
    one = _draw(7, idx[5:6], view[5:6], w[5:6], h[5:6])
    np.testing.assert_array_equal(one[0][0], a[0][5])
    np.testing.assert_array_equal(one[2]["ibot"][0], a[2]["ibot"][5])


def test_views_are_identical_in_a_separate_process():
    """The stored views and masks, and the fresh ones of online-fresh training."""
    code = (
        "import json, numpy as np; from data import views as V;"
        "idx=np.arange(0,64)*9973; b,f=V.view_params(11, idx, idx%3, 640, 480);"
        "m=V.teacher_visible(11, idx, idx%3, 'mocov3'); s=V.student_visible(11, idx, 5);"
        "fb,ff=V.fresh_view_params(11, idx, 5, idx%640+1, idx%480+1); fm=V.fresh_teacher_visible(11, idx, 5, 'ibot');"
        "print(json.dumps([b.tolist(), f.tolist(), m.tolist(), s.tolist(), fb.tolist(), ff.tolist(), fm.tolist()]))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    b, f, m, s, fb, ff, fm = json.loads(out)
    idx = np.arange(0, 64) * 9973
    boxes, flips = V.view_params(11, idx, idx % 3, 640, 480)
    assert boxes.tolist() == b and flips.tolist() == f
    assert V.teacher_visible(11, idx, idx % 3, "mocov3").tolist() == m
    assert V.student_visible(11, idx, 5).tolist() == s
    boxes, flips = V.fresh_view_params(11, idx, 5, idx % 640 + 1, idx % 480 + 1)
    assert boxes.tolist() == fb and flips.tolist() == ff
    assert V.fresh_teacher_visible(11, idx, 5, "ibot").tolist() == fm


def test_different_seed_view_epoch_or_teacher_change_the_draw():
    idx = np.arange(50)
    a = V.teacher_visible(0, idx, 0, "mae")
    assert not np.array_equal(a, V.teacher_visible(1, idx, 0, "mae"))
    assert not np.array_equal(a, V.teacher_visible(0, idx, 1, "mae"))
    # same ratio, different teacher id -> independent masks
    assert not np.array_equal(V.teacher_visible(0, idx, 0, "mocov3"),
                              V.teacher_visible(0, idx, 0, "dino"))
    assert not np.array_equal(V.student_visible(0, idx, 0), V.student_visible(0, idx, 1))
    b0, _ = V.view_params(0, idx, 0, 640, 480)
    b1, _ = V.view_params(0, idx, 1, 640, 480)
    assert (b0 != b1).any(axis=1).mean() > 0.9


def test_boxes_respect_image_scale_and_ratio_bounds():
    idx = np.arange(20000)
    w = np.resize(SIZES_W, idx.size)
    h = np.resize(SIZES_H, idx.size)
    boxes, flips = V.view_params(3, idx, idx % 4, w, h)
    x, y, bw, bh = boxes.T
    assert (x >= 0).all() and (y >= 0).all() and (bw >= 1).all() and (bh >= 1).all()
    assert (x + bw <= w).all() and (y + bh <= h).all()
    # rounding to whole pixels moves area and ratio by at most a pixel's worth
    area = bw * bh / (w * h)
    ratio = bw / bh
    tol_area = (bw + bh + 1) / (w * h)
    in_bounds = ((area >= 0.2 - tol_area) & (area <= 1 + tol_area)
                 & (ratio >= 0.75 * (1 - 2 / bh)) & (ratio <= 4 / 3 * (1 + 2 / bw)))
    # images whose own aspect ratio is inside the bounds practically always get a random crop
    square_ish = (w / h >= 3 / 4) & (w / h <= 4 / 3)
    assert in_bounds[square_ish].all()
    # the others may fall back to a centred crop clamped to the ratio bounds
    fallback = ~in_bounds
    assert (~square_ish[fallback]).all()
    assert np.array_equal(x[fallback], (w[fallback] - bw[fallback]) // 2)
    assert np.array_equal(y[fallback], (h[fallback] - bh[fallback]) // 2)
    assert ((bw[fallback] == w[fallback]) | (bh[fallback] == h[fallback])).all()
    r = ratio[fallback]
    assert ((r > 0.74) & (r < 1.34)).all()
    assert abs(flips.mean() - 0.5) < 0.02


def test_mask_sizes_are_exact_sorted_and_unique():
    idx = np.arange(300)
    expected = {"mae": 98, "mocov3": 118, "ibot": 137}
    for t, n in expected.items():
        m = V.teacher_visible(5, idx, idx % 4, t)
        assert m.shape == (300, n)
        assert (np.diff(m, axis=1) > 0).all()
        assert m.min() >= 0 and m.max() < 196
    s = V.student_visible(5, idx, 0)
    assert s.shape == (300, 49) and (np.diff(s, axis=1) > 0).all()


@pytest.mark.parametrize("teacher", ["mae", "ibot"])
def test_every_patch_is_chosen_about_equally_often(teacher):
    n = 20000
    idx = np.arange(n)
    m = V.teacher_visible(2, idx, 0, teacher)
    counts = np.bincount(m.ravel(), minlength=196)
    p = m.shape[1] / 196
    expected = n * p
    sd = np.sqrt(n * p * (1 - p))
    assert np.abs(counts - expected).max() < 5 * sd
    s = V.student_visible(2, idx, 9)
    counts = np.bincount(s.ravel(), minlength=196)
    p = 49 / 196
    assert np.abs(counts - n * p).max() < 5 * np.sqrt(n * p * (1 - p))


def test_epoch_view_and_slots_are_inverse():
    idx = np.arange(37)
    for e in range(9):
        v = V.epoch_view(idx, e, 4)
        s = V.slot_of(idx, v, 4)
        assert (s == e % 4).all()
        np.testing.assert_array_equal(V.view_of_slot(idx, e % 4, 4), v)


def test_bad_keys_are_refused():
    with pytest.raises(TypeError):
        V.view_params(0, np.array([0.5]), 0, 10, 10)
    with pytest.raises(ValueError):
        V.hash_keys(np.array([-1]))
    with pytest.raises(KeyError, match="unknown teacher"):
        V.teacher_visible(0, np.arange(3), 0, "clip")


def _imagenet_class_sorted_labels(num_classes=1000, num_samples=1_281_167):
    """Labels of a class-sorted listing of ImageNet's shape: (N,) int, class c in one run."""
    sizes = np.full(num_classes, num_samples // num_classes)
    sizes[: num_samples % num_classes] += 1
    return np.repeat(np.arange(num_classes), sizes), sizes


def _expected_distinct_classes(sizes, n):
    """E[#classes] in n draws without replacement: sum_c 1 - C(N - n_c, n) / C(N, n)."""
    from math import lgamma
    N = int(sizes.sum())

    def log_comb(a, b):
        return lgamma(a + 1) - lgamma(b + 1) - lgamma(a - b + 1)
    return sum(1 - np.exp(log_comb(N - int(c), n) - log_comb(N, n)) for c in sizes)


def test_stats_sample_of_a_class_sorted_imagenet_covers_as_many_classes_as_iid_sampling():
    labels, sizes = _imagenet_class_sorted_labels()
    expected = _expected_distinct_classes(sizes, 1024)
    assert 630 < expected < 650                          # ~641 classes in 1024 i.i.d. draws
    assert len(np.unique(labels[:1024])) == 1            # the first 1024 images: one class
    for seed in (0, 1):
        sample = V.stats_sample(seed, len(labels), 1024)
        assert sample.shape == (1024,) and sample.dtype == np.int64
        assert (np.diff(sample) > 0).all() and 0 <= sample[0] and sample[-1] < len(labels)
        assert len(np.unique(labels[sample])) >= 0.9 * expected


def test_stats_sample_is_keyed_nested_and_takes_everything_when_small():
    a = V.stats_sample(0, 10_000, 64)
    np.testing.assert_array_equal(a, V.stats_sample(0, 10_000, 64))
    assert not np.array_equal(a, V.stats_sample(1, 10_000, 64))
    assert np.isin(a, V.stats_sample(0, 10_000, 65)).all()            # a larger sample only adds
    np.testing.assert_array_equal(V.stats_sample(0, 13, 1024), np.arange(13))
    with pytest.raises(ValueError, match="count"):
        V.stats_sample(0, 13, 0)
