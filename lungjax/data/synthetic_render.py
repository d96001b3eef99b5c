"""Pictures of a generated scan: an axial slice through a nodule (outlined), a close-up
of it, and a coronal slice, read back through the ordinary scan reader."""

from __future__ import annotations

import os

import numpy as np

from lungjax.atomic import atomic_path
from lungjax.data import io
from lungjax.data.coords import world_to_voxel
from lungjax.data.tables import read_findings_csv

LUNG_WINDOW = (-1350.0, 150.0)  # level -600, width 1500


def _find_scan(root: str, uid: str) -> str:
    for d in sorted(os.listdir(root)):
        p = os.path.join(root, d, uid + ".mhd")
        if d.startswith("subset") and os.path.isfile(p):
            return p
    raise FileNotFoundError(f"{root}: no subset*/{uid}.mhd")


def render_scan_png(dataset_dir: str | os.PathLike, png_path: str | os.PathLike,
                    uid: str | None = None, dpi: int = 80) -> str:
    """Renders slices of one scan of a LUNA16-layout dataset to a PNG.

    Args:
      dataset_dir: dataset root (subset*/, annotations.csv, nodule-masks/ optional).
      png_path: output PNG, written atomically.
      uid: scan to show; default the scan holding the largest annotated nodule.
      dpi: resolution of the figure (the figure is 12 x 4.2 inches).

    Returns:
      ``png_path`` as a string.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = os.fspath(dataset_dir)
    ann = read_findings_csv(os.path.join(root, "annotations.csv"))
    if uid is None:
        if len(ann) == 0:
            raise ValueError(f"{root}/annotations.csv: no nodules to show")
        uid = str(ann.uid[int(np.argmax(ann.diameter_mm))])
    scan = io.read_scan(_find_scan(root, uid))
    img = scan.array.astype(np.float32)
    sp = scan.geometry.spacing_zyx
    mine = ann.for_uid(uid)
    if len(mine):
        k = int(np.argmax(mine.diameter_mm))
        centre = np.rint(world_to_voxel(mine.xyz[k], scan.geometry)).astype(int)
        diameter = float(mine.diameter_mm[k])
    else:
        centre, diameter = np.asarray(img.shape) // 2, 0.0
    centre = np.clip(centre, 0, np.asarray(img.shape) - 1)
    mask_path = os.path.join(root, "nodule-masks", uid + ".mhd")
    labels = io.read_scan(mask_path).array if os.path.isfile(mask_path) else None

    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2), gridspec_kw=dict(width_ratios=[1, 1, 1]))
    vmin, vmax = LUNG_WINDOW
    z, y, x = centre
    ax = axes[0]
    ax.imshow(img[z], cmap="gray", vmin=vmin, vmax=vmax, aspect=sp[1] / sp[2])
    if labels is not None and labels[z].any():
        ax.contour(labels[z] > 0, levels=[0.5], colors="red", linewidths=0.8)
    ax.set_title(f"axial z={z} (nodule {diameter:.1f} mm, red outline)", fontsize=9)
    half = int(np.ceil(max(12.0, 1.5 * diameter) / sp[2]))
    y0, y1 = max(y - half, 0), min(y + half + 1, img.shape[1])
    x0, x1 = max(x - half, 0), min(x + half + 1, img.shape[2])
    ax = axes[1]
    ax.imshow(img[z, y0:y1, x0:x1], cmap="gray", vmin=vmin, vmax=vmax, aspect=sp[1] / sp[2],
              extent=(x0 - 0.5, x1 - 0.5, y1 - 0.5, y0 - 0.5))
    if labels is not None and labels[z, y0:y1, x0:x1].any():
        ax.contour(np.arange(x0, x1), np.arange(y0, y1), labels[z, y0:y1, x0:x1] > 0,
                   levels=[0.5], colors="red", linewidths=0.8)
    ax.set_title("close-up, same slice", fontsize=9)
    ax = axes[2]
    # z grows towards the head: origin="lower" puts the apex at the top.
    ax.imshow(img[:, y, :], cmap="gray", vmin=vmin, vmax=vmax, aspect=sp[0] / sp[2],
              origin="lower")
    ax.set_title(f"coronal y={y}", fontsize=9)
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"synthetic scan {uid[-12:]}: spacing (z, y, x) "
                 f"{sp[0]:.3g} x {sp[1]:.3g} x {sp[2]:.3g} mm, window L-600 W1500", fontsize=9)
    fig.tight_layout()
    png_path = os.fspath(png_path)
    try:
        with atomic_path(png_path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return png_path
