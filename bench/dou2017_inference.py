"""Per-scan inference seconds of dou2017 (stage-1 screening + stage-2 FP reduction) on a
1 mm scan of 300^3 voxels, with the default (CPU schedule) or paper widths and random
weights (timing does not depend on the weights; the candidate count is fixed instead, by
default the config's ``max_candidates_per_scan``). Stage 2 runs as the config's classify
stage does (``mirrors``, ``mirror_top``).

    python bench/dou2017_inference.py [--variant=default|paper] [--size=300] [--candidates=N]
        [--repeats=2] [--tile=z,y,x|none] [--conv_impl=xla|auto|...]

Prints the seconds of the whole-scan FCN pass (one pass, or tiles of at most ``--tile``
voxels per core, default the config's ``detection.tile_zyx``), of scoring the candidates'
24x60x60 patches with ResNet+HL, and their sum; the first run includes compilation and is
reported apart. Ends with one line, ``per-scan seconds: N (compile C, peak GB M)``: the last
run's total, the first run's excess over it (compilation and first-use convolution
tuning), and the process's peak resident memory (run one setting per process to compare
peaks). JAX's persistent compilation cache is on (``lungjax.compile_cache``, as in
``python -m lungjax.detect``): a second process with the same settings compiles nothing.
On a shared machine the numbers are noisy.
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
    from lungjax.detect import DetectionSettings, detect_volume
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
    n = args.size
    rng = np.random.default_rng(0)
    volume = rng.random((n, n, n), dtype=np.float32)
    geom = Geometry(np.ones(3), np.zeros(3), np.eye(3))

    c2 = stages.stage_config(c, "fpr", dict(stages.stage_specs(c))["fpr"])
    model2, task2 = train_lib.build_model(c2), train_lib.build_task(c2)
    x2 = np.zeros((1, *c2.data.patch_size_zyx, 1), np.float32)
    v2 = jax.jit(model2.init)(jax.random.key(1), x2)
    # Stage 2 as the method's classify stage runs it: mirror images, and on how many.
    spec = dict(stages.stage_specs(c))["classify"]
    clf = st.CandidateClassifier(model2, task2, v2, c2.data.patch_size_zyx, int(spec["batch"]),
                                 mirrors=bool(spec["mirrors"]),
                                 mirror_top=int(spec["mirror_top"]))

    print(f"dou2017 {args.variant}: {n}^3 scan at 1 mm, FCN tiles "
          f"{tuple(c.detection.tile_zyx) or 'none (one pass)'}, conv_impl "
          f"{c.detection.conv_impl!r}, {args.candidates} candidates (stage 2: mirrors "
          f"{clf.mirrors}, on the best {clf.mirror_top or 'all'}), devices "
          f"{jax.devices()[0].platform} x {jax.device_count()}", flush=True)
    totals = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        # The whole volume as lung: the candidate count, not the mask, is what is timed.
        cands = detect_volume(predict1, volume, geom, mapping, settings, variables=v1,
                              lung_mask=np.ones(volume.shape, bool))
        t1 = time.perf_counter()
        out = clf(volume, cands.voxel_zyx)
        t2 = time.perf_counter()
        tag = "first run (with compilation)" if r == 0 else f"run {r + 1}"
        print(f"{tag}: screening {t1 - t0:.1f} s ({len(cands)} candidates), "
              f"FP reduction {t2 - t1:.1f} s ({len(out['score'])} patches), "
              f"total {t2 - t0:.1f} s per scan", flush=True)
        totals.append(t2 - t0)
    # ru_maxrss is in KiB on Linux.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(f"per-scan seconds: {totals[-1]:.1f} (compile {totals[0] - totals[-1]:.1f}, "
          f"peak GB {peak:.2f})" if len(totals) > 1 else
          f"per-scan seconds: {totals[0]:.1f} (compile not apart: --repeats=1, peak GB "
          f"{peak:.2f})", flush=True)


if __name__ == "__main__":
    main()
