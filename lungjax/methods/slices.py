"""Axial-slice helpers shared by the 2D methods (sathish2020, shrey2020): a slice
segmenter run over a whole volume, axial crops at given centres and a patch classifier
run on them, and the export of a slice segmenter.

Arrays: volumes (D, H, W) float32 in [0, 1] (the store's intensities, 0 = air); networks
take channels-last slices (B, H, W, 1).
"""

from __future__ import annotations

import numpy as np


def segment_slices(predict, volume: np.ndarray, *, multiple: int, batch: int = 16
                   ) -> np.ndarray:
    """Foreground probability of every axial slice of a volume.

    Args:
      predict: (B, H', W', 1) float32 -> (B, H', W') float32 probability (a fully
        convolutional segmenter whose sides must be multiples of ``multiple``).
      volume: (D, H, W) float32 in [0, 1].
      multiple: slices are zero-padded (0 = air) at their far sides to multiples of it.
      batch: slices per call; the last call is padded to it, so a jitted ``predict``
        compiles one shape per volume size.

    Returns:
      (D, H, W) float32 probability.
    """
    vol = np.asarray(volume, np.float32)
    d, h, w = vol.shape
    hp, wp = -(-h // multiple) * multiple, -(-w // multiple) * multiple
    out = np.zeros(vol.shape, np.float32)
    for z in range(0, d, batch):
        n = min(batch, d - z)
        x = np.zeros((batch, hp, wp, 1), np.float32)
        x[:n, :h, :w, 0] = vol[z:z + n]
        out[z:z + n] = np.asarray(predict(x))[:n, :h, :w]
    return out


def crop_slices(volume: np.ndarray, centres: np.ndarray, size: int) -> np.ndarray:
    """(K, size, size) float32 axial patches centred on ``centres`` ((K, 3) z, y, x
    voxels), zero-padded where they leave the volume (start: centre - size // 2)."""
    vol = np.asarray(volume, np.float32)
    pad = size
    padded = np.pad(vol, ((0, 0), (pad, pad), (pad, pad)))
    c = np.asarray(centres, np.int64).reshape(-1, 3)
    y0, x0 = c[:, 1] - size // 2 + pad, c[:, 2] - size // 2 + pad
    iy = y0[:, None] + np.arange(size)[None]
    ix = x0[:, None] + np.arange(size)[None]
    return padded[c[:, 0][:, None, None], iy[:, :, None], ix[:, None, :]]


def classify_patches(predict, volume: np.ndarray, centres: np.ndarray, size: int,
                     batch: int = 256) -> np.ndarray:
    """(K,) float64 probability of the axial patches at ``centres`` ((K, 3) z, y, x
    voxels); ``predict``: (B, size, size, 1) float32 -> (B,) probability."""
    out = [np.zeros(0)]
    for i in range(0, len(centres), batch):
        x = crop_slices(volume, centres[i:i + batch], size)[..., None]
        out.append(np.asarray(predict(x), np.float64).reshape(len(x)))
    return np.concatenate(out)


SEGMENTER_EXPORT = "segmenter"  # a slice segmenter's export, inside its stage's export


def export_slice_segmenter(run, multiple: int, output: str) -> str:
    """Exports the slice segmenter of stage ``run.spec["segmenter_from"]`` (its latest
    checkpoint) to ``<run.dir>/segmenter`` for (B, H, W, 1) slices of any size whose
    sides are multiples of ``multiple``; ``output`` describes what it returns. Returns the
    folder's name inside ``run.dir``."""
    import os

    from lungjax import export as export_lib
    from lungjax import train as train_lib
    from lungjax.configcheck import as_dict
    from lungjax.steps import make_predict_fn

    src = run.spec["segmenter_from"]
    seg_cfg = run.configs[src]
    model, task = train_lib.build_model(seg_cfg), train_lib.build_task(seg_cfg)
    # Symbolic slice sides: XLA's own convolutions (CPU-fast plans are per concrete shape).
    if "conv_impl" in model.__dataclass_fields__:
        model = model.clone(conv_impl="xla")
    export_lib.export_network(
        os.path.join(run.dir, SEGMENTER_EXPORT), os.path.join(run.dirs[src], "checkpoints"),
        make_predict_fn(model, task, spatial_dims=2), (None, None),
        {"model": as_dict(seg_cfg.model), "stage": src, "output": output},
        network=seg_cfg.train.network, min_size_zyx=(multiple, multiple),
        multiple_of=multiple)
    return SEGMENTER_EXPORT
