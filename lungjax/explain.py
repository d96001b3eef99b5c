"""RISE saliency maps of an exported sathish2020 method's most confident patches on a scan
(``lungjax.evaluation.rise``: which pixels the patch classifier's nodule score rests on).

    python -m lungjax.main --config=configs/sathish2020.py --mode=export
    python -m lungjax.explain --model=runs/sathish2020/export --scan=SCAN.mhd --out=DIR \\
        [--top 6] [--masks 2000] [--grid 8] [--lung-mask MASK]

The scan is read and preprocessed as for ``python -m lungjax.detect`` (same lung-mask
rule), the method segments the lungs and scores its patch grid, and the ``--top``
highest-scoring patches get a saliency map each. Writes, atomically:
``DIR/<uid>_rise.png`` (one column per patch: the patch, its saliency over it, the
probability and the patch centre in world mm) and ``DIR/<uid>_rise.npz`` (``patches``
(K, S, S) float32, ``saliency`` (K, S, S) float32, ``world_xyz`` (K, 3) mm,
``probability`` (K,)). Exit codes: 0 done, 2 bad arguments or model.
"""

from __future__ import annotations

import io
import os
import sys
from typing import Sequence

import numpy as np

from lungjax import fileio
from lungjax.atomic import atomic_write_bytes


def _find_stage(model_dir: str) -> str:
    """The folder of the export's sathish2020 find stage."""
    from lungjax.detect import METHOD_JSON, read_method_stages

    stages = read_method_stages(model_dir)
    found = [s for s in stages if s["kind"] == "sathish2020_find"]
    if not found:
        kinds = ", ".join(s["kind"] for s in stages)
        raise ValueError(f"{os.path.join(model_dir, METHOD_JSON)}: RISE explains a "
                         f"sathish2020 export (a 'sathish2020_find' stage); this one has "
                         f"{kinds}")
    return os.path.join(model_dir, found[-1]["dir"])


def plot_saliency(patches, saliency, probability, world_xyz, path: str, title: str) -> None:
    """One column per patch: the patch (gray, [0, 1]) and its saliency over it."""
    from matplotlib.figure import Figure

    from lungjax.evaluation.plots import save_figure

    k = max(1, len(patches))
    fig = Figure(figsize=(2.4 * k, 5.0))
    axes = fig.subplots(2, k, squeeze=False)
    for i in range(k):
        top, bottom = axes[0][i], axes[1][i]
        top.axis("off")
        bottom.axis("off")
        if i >= len(patches):
            top.set_title("no patch", fontsize=8)
            continue
        top.imshow(patches[i], cmap="gray", vmin=0, vmax=1)
        x, y, z = world_xyz[i]
        top.set_title(f"p = {probability[i]:.3f}\n({x:.0f}, {y:.0f}, {z:.0f}) mm", fontsize=8)
        bottom.imshow(patches[i], cmap="gray", vmin=0, vmax=1)
        bottom.imshow(saliency[i], cmap="jet", alpha=0.45)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def explain_scan(model_dir: str, scan: str, out: str, *, top: int = 6, n_masks: int = 2000,
                 grid: int = 8, lung_mask: str | None = None, seed: int = 0) -> dict:
    """RISE maps of the ``top`` patches of one scan (see the module docstring).

    Returns:
      {"uid", "png", "npz", "probability": [...]}.
    """
    from lungjax.data.coords import voxel_to_world
    from lungjax.detect import find_lung_mask, read_preprocessed
    from lungjax.evaluation.rise import rise_saliency
    from lungjax.methods.sathish2020 import ExportedFind
    from lungjax.methods.slices import crop_slices

    method = ExportedFind.parts(_find_stage(model_dir))
    volume, geometry, _, uid, _ = read_preprocessed(
        scan, method.preprocessing, lung_mask_path=find_lung_mask(scan, lung_mask, 1))
    _, centres, prob = method(volume, geometry.spacing_zyx)
    order = np.argsort(-prob, kind="stable")[:top]
    patches = crop_slices(volume, centres[order], method.size)
    maps = np.stack([rise_saliency(method.classify, p, n_masks=n_masks, grid=grid, seed=seed)
                     for p in patches]) if len(order) else np.zeros((0,) + patches.shape[1:])
    world = voxel_to_world(centres[order], geometry).reshape(-1, 3)
    fileio.makedirs(out)
    png, npz = (os.path.join(out, f"{uid}_rise{ext}") for ext in (".png", ".npz"))
    plot_saliency(patches, maps, prob[order], world, png,
                  f"{uid}: RISE saliency of the top {len(order)} patches ({n_masks} masks, "
                  f"grid {grid})")
    buf = io.BytesIO()
    np.savez_compressed(buf, patches=patches.astype(np.float32), saliency=maps.astype(np.float32),
                        world_xyz=world, probability=prob[order])
    atomic_write_bytes(npz, buf.getvalue())
    return {"uid": uid, "png": png, "npz": npz,
            "probability": [float(v) for v in prob[order]]}


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m lungjax.explain",
        description="RISE saliency maps of an exported sathish2020 method's top patches on "
                    "a scan: <uid>_rise.png and <uid>_rise.npz in --out.")
    parser.add_argument("--model", required=True, help="the folder --mode=export printed")
    parser.add_argument("--scan", required=True, help=".mhd/.mha/.nii/.nii.gz or DICOM folder")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--top", type=int, default=6, help="patches explained (highest scores)")
    parser.add_argument("--masks", type=int, default=2000, help="random masks per patch")
    parser.add_argument("--grid", type=int, default=8, help="mask grid cells per side")
    parser.add_argument("--lung-mask", "--lung_mask", dest="lung_mask", default=None)
    args = parser.parse_args(argv)
    try:
        res = explain_scan(args.model, args.scan, args.out, top=args.top, n_masks=args.masks,
                           grid=args.grid, lung_mask=args.lung_mask)
    except (OSError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    probs = ", ".join(f"{p:.3f}" for p in res["probability"]) or "none"
    print(f"{res['uid']}: {len(res['probability'])} patches (probabilities {probs}) -> "
          f"{res['png']}, {res['npz']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
