"""Per-scan inference seconds of dou2017 (stage-1 screening + stage-2 FP reduction), with
the default (CPU schedule) or paper widths and random weights (timing does not depend on
the weights; the candidate count is fixed instead, by default the config's
``max_candidates_per_scan``). Stage 2 runs as the config's classify stage does
(``mirrors``, ``mirror_top``). Two kinds of scan:

* ``--scale=S`` (default 1.5): a raw scan of an adult-size generated chest
  (``bench/adult_scan.py``: 262 x 361 x 361 mm at a real LIDC voxel size), read and
  preprocessed as ``python -m lungjax.detect`` does (resampled to 1 mm, lung mask,
  cropped to the lungs' box, windowed), screened inside its lung mask;
* ``--scale=0 --size=N``: a random N^3 volume at 1 mm taken as lung everywhere, the worst
  case (no preprocessing, no crop: the whole volume is screened).

    python bench/dou2017_inference.py [--variant=default|paper] [--scale=1.5 | --scale=0
        --size=300] [--candidates=N] [--repeats=2] [--tile=z,y,x|none] [--conv_impl=...]

Prints the seconds of preprocessing, of the FCN over the volume (one pass, or tiles of at
most ``--tile`` voxels per core, default the config's ``detection.tile_zyx``), of the
candidates from its score map (threshold 0, suppression, refinement), of scoring the
candidates' 24x60x60 patches with ResNet+HL, and their sum; the first run includes
compilation and is reported apart. Ends with one line, ``per-scan seconds: N (compile C,
peak GB M)``: the last run's total, the first run's excess over it (compilation and
first-use convolution tuning), and the process's peak resident memory (run one setting
per process to compare peaks). JAX's persistent compilation cache is on
(``lungjax.compile_cache``, as in ``python -m lungjax.detect``): a second process with the
same settings compiles nothing. On a shared machine the numbers are noisy.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(variant: str):
    spec = importlib.util.spec_from_file_location("dou2017_cfg",
                                                  os.path.join(ROOT, "configs", "dou2017.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(variant)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="default", choices=("default", "paper"))
    p.add_argument("--scale", type=float, default=1.5,
                   help="chest scale of the generated raw scan; 0: a random --size^3 volume")
    p.add_argument("--size", type=int, default=300)
    p.add_argument("--candidates", type=int, default=0,
                   help="candidates per scan (default: the config's max_candidates_per_scan)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tile", default=None,
                   help="detection.tile_zyx as z,y,x (most voxels per tile core); 'none' or "
                        "'' = whole scan in one pass; default: the config's")
    p.add_argument("--conv_impl", default=None,
                   help="detection.conv_impl of the FCN (default: the config's)")
    args = p.parse_args()

    from lungjax import compile_cache
    from lungjax import train as train_lib
    from lungjax.data.coords import Geometry
    from lungjax.detect import (DetectionSettings, candidates_of_scores, read_preprocessed,
                                score_volume)
    from lungjax import stages
    from lungjax.methods import candidates as st
    from lungjax.steps import make_predict_fn
    from lungjax.tasks.screening import output_mapping

    compile_cache.enable()
    c = _config(args.variant)
    if args.tile is not None:
        c.detection.tile_zyx = (() if args.tile.strip().lower() in ("", "none") else
                                tuple(int(v) for v in args.tile.split(",")))
    if args.conv_impl is not None:
        c.detection.conv_impl = args.conv_impl
    fcn = train_lib.build_model(c).clone(conv_impl=c.detection.conv_impl)
    task1 = train_lib.build_task(c)
    v1 = jax.jit(fcn.init)(jax.random.key(0), train_lib.sample_input(c))
    mapping = output_mapping(fcn.layer_specs(), center="patch")
    # Threshold 0: every NMS peak is a candidate, capped at --candidates.
    args.candidates = args.candidates or int(c.detection.max_candidates_per_scan)
    settings = DetectionSettings.from_config({**c.detection.to_dict(), "threshold": 0.0,
                                              "max_candidates_per_scan": args.candidates})
    predict1 = make_predict_fn(fcn, task1)
    if args.scale > 0:
        from adult_scan import adult_scan

        raw = adult_scan(args.scale)
        pre_cfg = {k: c.data[k] for k in ("spacing_zyx", "hu_window")}
        pre_cfg.update(stages.store_preprocessing(c))

        def scan():
            volume, geom, lung, _, _ = read_preprocessed(raw, pre_cfg)
            return volume, geom, lung
        what = f"{raw} (chest scale {args.scale:g}), preprocessed"
    else:
        n = args.size
        rng = np.random.default_rng(0)
        volume0 = rng.random((n, n, n), dtype=np.float32)

        def scan():
            # The whole volume as lung: the candidate count, not the mask, is what is timed.
            return volume0, Geometry(np.ones(3), np.zeros(3), np.eye(3)), np.ones((n,) * 3, bool)
        what = f"{n}^3 random volume at 1 mm, all lung"

    c2 = stages.stage_config(c, "fpr", dict(stages.stage_specs(c))["fpr"])
    model2, task2 = train_lib.build_model(c2), train_lib.build_task(c2)
    x2 = np.zeros((1, *c2.data.patch_size_zyx, 1), np.float32)
    v2 = jax.jit(model2.init)(jax.random.key(1), x2)
    # Stage 2 as the method's classify stage runs it: mirror images, and on how many.
    spec = dict(stages.stage_specs(c))["classify"]
    clf = st.CandidateClassifier(model2, task2, v2, c2.data.patch_size_zyx, int(spec["batch"]),
                                 mirrors=bool(spec["mirrors"]),
                                 mirror_top=int(spec["mirror_top"]))

    print(f"dou2017 {args.variant}: {what}, FCN tiles "
          f"{tuple(c.detection.tile_zyx) or 'none (one pass)'}, conv_impl "
          f"{c.detection.conv_impl!r}, {args.candidates} candidates (stage 2: mirrors "
          f"{clf.mirrors}, on the best {clf.mirror_top or 'all'}), devices "
          f"{jax.devices()[0].platform} x {jax.device_count()}", flush=True)
    totals = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        volume, geom, lung = scan()
        t1 = time.perf_counter()
        scores, cell_map = score_volume(predict1, volume, mapping, settings.tile_zyx,
                                        settings.batch, variables=v1)
        t2 = time.perf_counter()
        cands = candidates_of_scores(scores, cell_map, geom, settings, volume.shape,
                                     lung_mask=lung)
        t3 = time.perf_counter()
        out = clf(volume, cands.voxel_zyx)
        t4 = time.perf_counter()
        tag = "first run (with compilation)" if r == 0 else f"run {r + 1}"
        print(f"{tag}: preprocessing {t1 - t0:.1f} s (volume {volume.shape}), FCN "
              f"{t2 - t1:.1f} s, candidates {t3 - t2:.1f} s ({len(cands)}), FP reduction "
              f"{t4 - t3:.1f} s ({len(out['score'])} candidates), total {t4 - t0:.1f} s per "
              "scan", flush=True)
        totals.append(t4 - t0)
    # ru_maxrss is in KiB on Linux.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(f"per-scan seconds: {totals[-1]:.1f} (compile {totals[0] - totals[-1]:.1f}, "
          f"peak GB {peak:.2f})" if len(totals) > 1 else
          f"per-scan seconds: {totals[0]:.1f} (compile not apart: --repeats=1, peak GB "
          f"{peak:.2f})", flush=True)


if __name__ == "__main__":
    main()
