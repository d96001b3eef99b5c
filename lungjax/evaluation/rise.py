"""RISE saliency (Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for Explanation of
Black-box Models", BMVC 2018), as Sathish et al. show it for their patch classifier.

A classifier f is run on the image multiplied by N random smooth masks M_i (a coarse
``grid`` x ``grid`` binary grid, each cell kept with probability p, bilinearly upsampled
to (grid + 1) cells' size and cropped at a random shift); the saliency of a pixel is the
score-weighted mean of the masks covering it, S = sum_i f(I * M_i) M_i / (N p). It needs
the classifier's outputs only, no gradients: it runs on an exported network.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def rise_masks(n: int, size_hw: tuple[int, int], grid: int = 8, p: float = 0.5,
               seed: int = 0) -> np.ndarray:
    """(n, H, W) float32 masks in [0, 1] (the RISE construction, seeded)."""
    from scipy import ndimage

    if n < 1 or grid < 1 or not 0.0 < p <= 1.0:
        raise ValueError(f"rise_masks: need n >= 1, grid >= 1 and 0 < p <= 1, got n={n}, "
                         f"grid={grid}, p={p}")
    h, w = (int(v) for v in size_hw)
    ch, cw = -(-h // grid), -(-w // grid)
    rng = np.random.default_rng(seed)
    cells = (rng.random((n, grid, grid)) < p).astype(np.float32)
    # (grid + 1) cells' worth of upsampled mask, so that every shift covers the image.
    big = ndimage.zoom(cells, (1, (grid + 1) * ch / grid, (grid + 1) * cw / grid), order=1,
                       mode="nearest", grid_mode=True)
    dy, dx = rng.integers(0, ch, n), rng.integers(0, cw, n)
    return np.stack([big[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def rise_saliency(predict: Callable[[np.ndarray], np.ndarray], image: np.ndarray, *,
                  n_masks: int = 2000, grid: int = 8, p: float = 0.5, seed: int = 0,
                  batch: int = 250) -> np.ndarray:
    """Saliency of one 2D image for a classifier's score.

    Args:
      predict: (B, H, W, 1) float32 -> (B,) score (e.g. the nodule probability).
      image: (H, W) float32, as the classifier takes it.
      n_masks, grid, p, seed: the masks (:func:`rise_masks`).
      batch: masked images per call.

    Returns:
      (H, W) float32 saliency (the score's expected value where the pixel is kept,
      times 1/p: same scale as the score).
    """
    img = np.asarray(image, np.float32)
    if img.ndim != 2:
        raise ValueError(f"rise_saliency: expected a (H, W) image, got shape {img.shape}")
    masks = rise_masks(n_masks, img.shape, grid, p, seed)
    total = np.zeros(img.shape, np.float64)
    for i in range(0, n_masks, batch):
        m = masks[i:i + batch]
        score = np.asarray(predict((img[None] * m)[..., None]), np.float64).reshape(len(m))
        total += np.tensordot(score, m, axes=1)
    return (total / (n_masks * p)).astype(np.float32)
