"""eval/ade.py photometric distortion against mmseg's PhotoMetricDistortion: hue on OpenCV's
0..180 scale (k -> 2k degrees), saturation scales HSV S, brightness/contrast on 0..255, the
draws' bounds, probabilities and order; checked against colorsys pixel by pixel."""
import colorsys

import numpy as np
import pytest
import torch

from eval.ade import Distortion, apply_distortion, draw_distortion, photometric, scale_saturation, shift_hue

# saturated, pale, dark, grey, black and white pixels, each hue sextant
PIXELS = [(0.9, 0.2, 0.1), (0.2, 0.8, 0.3), (0.1, 0.3, 0.9), (0.7, 0.6, 0.2), (0.5, 0.1, 0.6), (0.2, 0.7, 0.7),
          (0.95, 0.9, 0.85), (0.1, 0.05, 0.02), (0.4, 0.4, 0.4), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)]


def image_of(pixels) -> torch.Tensor:
    """A (3, 1, N) image from N RGB triples."""
    return torch.tensor(pixels, dtype=torch.float32).T[:, None, :].contiguous()


def pixels_of(image: torch.Tensor) -> list[tuple[float, float, float]]:
    return [tuple(map(float, p)) for p in image[:, 0, :].T]


def hue_degrees(rgb) -> float:
    return colorsys.rgb_to_hsv(*rgb)[0] * 360.0


@pytest.mark.parametrize("k", [-18, -7, 1, 5, 17])
def test_hue_shift_of_k_on_the_0_180_scale_rotates_hue_by_2k_degrees(k):
    out = pixels_of(shift_hue(image_of(PIXELS), k))
    for before, after in zip(PIXELS, out):
        h, s, v = colorsys.rgb_to_hsv(*before)
        expected = colorsys.hsv_to_rgb((h + 2 * k / 360.0) % 1.0, s, v)
        assert after == pytest.approx(expected, abs=2e-6), (before, k)
        if s > 0.1:      # a chromatic pixel's hue really moves by 2k degrees (not k)
            turned = (hue_degrees(after) - hue_degrees(before) + 180.0) % 360.0 - 180.0
            assert turned == pytest.approx(2 * k, abs=1e-3)


@pytest.mark.parametrize("alpha", [0.5, 0.8, 1.3, 1.5])
def test_saturation_scales_hsv_s_and_keeps_hue_and_value(alpha):
    out = pixels_of(scale_saturation(image_of(PIXELS), alpha))
    for before, after in zip(PIXELS, out):
        h, s, v = colorsys.rgb_to_hsv(*before)
        expected = colorsys.hsv_to_rgb(h, min(s * alpha, 1.0), v)
        assert after == pytest.approx(expected, abs=2e-6), (before, alpha)
        h2, s2, v2 = colorsys.rgb_to_hsv(*after)
        assert s2 == pytest.approx(min(s * alpha, 1.0), abs=1e-5) and v2 == pytest.approx(v, abs=1e-6)


def test_saturation_clips_s_at_one_and_zero_gives_grey():
    image = image_of([(0.9, 0.5, 0.3)])
    full = pixels_of(scale_saturation(image, 1.5))[0]        # S 0.667 * 1.5 = 1.0: the minimum reaches 0
    assert full == pytest.approx((0.9, 0.3, 0.0), abs=1e-6)
    clipped = pixels_of(scale_saturation(image, 100.0))[0]   # clipped at S = 1, not beyond
    assert clipped == pytest.approx(full, abs=1e-6)
    grey = pixels_of(scale_saturation(image, 0.0))[0]
    assert grey == pytest.approx((0.9, 0.9, 0.9), abs=1e-6)


def test_brightness_adds_on_the_0_255_scale_and_contrast_multiplies_both_clamped():
    image = image_of([(0.1, 0.5, 0.95), (0.0, 0.01, 1.0)])
    up = apply_distortion(image, Distortion(32.0, None, True, None, None))
    assert torch.allclose(up, (image + 32 / 255).clamp(0, 1))
    down = apply_distortion(image, Distortion(-32.0, None, True, None, None))
    assert torch.allclose(down, (image - 32 / 255).clamp(0, 1)) and down.min() == 0
    for c in (0.5, 1.5):
        out = apply_distortion(image, Distortion(None, c, False, None, None))
        assert torch.allclose(out, (image * c).clamp(0, 1)) and out.max() <= 1
    none = apply_distortion(image, Distortion(None, None, True, None, None))
    assert torch.equal(none, image)


def test_contrast_runs_first_or_last_as_drawn():
    """mmseg: brightness, then contrast (mode 1) | saturation, hue | contrast (mode 0)."""
    image = image_of(PIXELS[:6])
    first = apply_distortion(image, Distortion(10.0, 1.4, True, 0.7, 5))
    last = apply_distortion(image, Distortion(10.0, 1.4, False, 0.7, 5))
    b = (image + 10 / 255).clamp(0, 1)
    assert torch.allclose(first, shift_hue(scale_saturation((b * 1.4).clamp(0, 1), 0.7), 5), atol=1e-6)
    assert torch.allclose(last, (shift_hue(scale_saturation(b, 0.7), 5) * 1.4).clamp(0, 1), atol=1e-6)
    assert not torch.allclose(first, last, atol=1e-3)


def test_draws_stay_in_mmseg_bounds_with_probability_one_half_each():
    draws = [draw_distortion(np.random.default_rng([3, i])) for i in range(4000)]
    for name, low, high in (("brightness", -32, 32), ("contrast", 0.5, 1.5), ("saturation", 0.5, 1.5)):
        values = np.array([getattr(d, name) for d in draws if getattr(d, name) is not None])
        assert 0.46 < len(values) / len(draws) < 0.54, name
        assert values.min() >= low and values.max() <= high, name
        assert values.min() < low + 0.05 * (high - low) and values.max() > high - 0.05 * (high - low), name
    hues = [d.hue for d in draws if d.hue is not None]
    assert 0.46 < len(hues) / len(draws) < 0.54
    assert all(isinstance(h, int) for h in hues)
    assert set(hues) == set(range(-18, 18))          # numpy randint(-18, 18): -18..17, as mmseg
    assert 0.46 < np.mean([d.contrast_first for d in draws]) < 0.54


def test_photometric_is_keyed_by_the_generator_and_stays_in_range():
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    outs = [photometric(image, np.random.default_rng([0, 0, i])) for i in range(20)]
    again = photometric(image, np.random.default_rng([0, 0, 7]))
    assert torch.equal(outs[7], again)
    assert all(o.shape == image.shape and o.min() >= 0 and o.max() <= 1 for o in outs)
    assert len({o.sum().item() for o in outs}) > 10
