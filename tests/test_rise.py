"""RISE saliency: the masks' construction and a classifier whose score depends on one
region only."""

import numpy as np
import pytest

from lungjax.evaluation.rise import rise_masks, rise_saliency


def test_masks_are_smooth_seeded_and_keep_about_p():
    a = rise_masks(400, (40, 56), grid=7, p=0.3, seed=3)
    b = rise_masks(400, (40, 56), grid=7, p=0.3, seed=3)
    assert a.shape == (400, 40, 56) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert a.mean() == pytest.approx(0.3, abs=0.03)
    # bilinear upsampling of 8-pixel cells: neighbouring pixels differ by at most 1/8
    assert np.abs(np.diff(a, axis=2)).max() <= 1.0 / 8 + 1e-6
    with pytest.raises(ValueError, match="0 < p"):
        rise_masks(4, (8, 8), p=0.0)


def test_saliency_lies_on_the_region_the_score_reads():
    """Score = mean of the image over rows 40-49, columns 10-19 of a bright image: the
    saliency there is above the rest of the image."""
    img = np.ones((64, 64), np.float32)

    def predict(x):
        return x[:, 40:50, 10:20, 0].mean(axis=(1, 2))

    s = rise_saliency(predict, img, n_masks=1500, grid=8, p=0.5, seed=1)
    inside, outside = s[42:48, 12:18].mean(), s[:24, 40:].mean()
    assert inside > outside + 0.1
    # far from the region, keeping a pixel says nothing about the score:
    # E[score * M] / p = E[score] E[M] / p = E[score] = p = 0.5
    assert outside == pytest.approx(0.5, abs=0.05)
    with pytest.raises(ValueError, match="H, W"):
        rise_saliency(predict, img[None])
