"""Seconds per scan of xie2018 detection: preprocessing of the raw scan (read, resample to
1 mm, lung mask, crop, window) and whole-scan inference (tiled network + decoding + NMS
across both heads), the two parts the paper reports (20 s + 15 s on a Titan Xp).

Uses the latest checkpoint of ``--workdir`` when given (else a freshly initialised network
of the same config: the cost does not depend on the weights, except the NMS share, which
depends on how many anchors pass the threshold). Runs on the scans of the config's
prepared store (generated default data unless ``--config.data.root`` says otherwise).
Ends with one line, ``per-scan seconds: N (compile C, peak GB M)``: the mean of preprocessing
and detection over the timed scans, the warm-up scan's excess over that mean (compilation
and first-use convolution tuning), and the process's peak resident memory. JAX's persistent
compilation cache is on (``lungjax.compile_cache``, as in ``python -m lungjax.detect``).
On a shared machine the numbers are noisy.

    python bench/xie2018_inference.py --scans=3 [--tile=z,y,x|none] [--conv_impl=auto]
    python bench/xie2018_inference.py --workdir=runs/xie2018/detector --scans=5 --arg=default
    python bench/xie2018_inference.py --scale=1.5 [--scans=2]

With ``--scale=S`` the scan is instead a raw scan of an adult-size generated chest
(``bench/adult_scan.py``; 1.5: 262 x 361 x 361 mm), read and preprocessed as ``python -m
lungjax.detect`` does, then detected inside its lung mask; timed ``--scans`` times after
one warm-up run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lungjax import stages, train as train_lib  # noqa: E402
from lungjax.methods.xie2018 import detect_scans  # noqa: E402


def _config(arg: str):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                        "xie2018.py")
    spec = importlib.util.spec_from_file_location("xie2018_cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arg", default="default", help="config variant of configs/xie2018.py")
    p.add_argument("--workdir", default=None,
                   help="a trained 'detector' stage folder (e.g. runs/xie2018/detector) "
                        "whose latest checkpoint to use")
    p.add_argument("--scans", type=int, default=3, help="scans to time (after one warm-up)")
    p.add_argument("--scale", type=float, default=0.0,
                   help="time an adult-size generated raw scan of this chest scale instead "
                        "of the store's scans (bench/adult_scan.py)")
    p.add_argument("--cache_dir", default=None, help="config.data.cache_dir")
    p.add_argument("--threshold", type=float, default=None, help="detection.threshold")
    p.add_argument("--tile", default=None,
                   help="detection.tile_zyx as z,y,x ('none' = whole scan in one pass)")
    p.add_argument("--conv_impl", default=None,
                   help="detection.conv_impl (default: the config's)")
    args = p.parse_args(argv)

    from lungjax import compile_cache

    compile_cache.enable()
    c = _config(args.arg)
    if args.cache_dir:
        c.data.cache_dir = args.cache_dir
    if args.threshold is not None:
        c.detection.threshold = args.threshold
    if args.tile is not None:
        c.detection.tile_zyx = () if args.tile.strip().lower() in ("", "none") else tuple(
            int(v) for v in args.tile.split(","))
    if args.conv_impl is not None:
        c.detection.conv_impl = args.conv_impl
    from lungjax.data.io import read_scan
    from lungjax.data.luna16 import Luna16Dataset
    from lungjax.data.preprocess import preprocess_scan
    from lungjax.data.store import PatchStore, read_manifest
    from lungjax.train_data import prepare_data

    if args.scale > 0:
        return _adult(c, args)
    store_path = prepare_data(c)
    store = PatchStore.open(store_path)
    model = stages.scan_model(c)
    task = train_lib.build_task(c)
    if args.workdir:
        variables, step = stages.restore_variables(args.workdir)
    else:
        x = np.zeros((1, *c.data.patch_size_zyx, 1), np.float32)
        variables, step = jax.jit(model.init)(jax.random.key(0), x), 0
    uids = store.uids()[:args.scans + 1]
    manifest = read_manifest(store_path) or {}
    root = manifest.get("source_root") or manifest.get("root")

    rows = []
    for i, uid in enumerate(uids):
        pre = None
        if root and os.path.isdir(root):
            ds = Luna16Dataset.open(root)
            t0 = time.perf_counter()
            scan = read_scan(ds.scan_path(uid))
            lung = ds.lung_mask_path(uid)
            seg = read_scan(lung).array if lung else None
            preprocess_scan(scan.array, scan.geometry, spacing_zyx=tuple(c.data.spacing_zyx),
                            hu_window=tuple(c.data.hu_window), lung_seg=seg, name=uid)
            pre = time.perf_counter() - t0
        run = detect_scans(c, model, task, variables, store, [uid])
        s = run.seconds[uid]
        rec = {"uid": uid[-8:], "shape_zyx": list(store.scan(uid).shape_zyx),
               "preprocess_s": pre, "read_s": s["read"], "detect_s": s["detect"],
               "marks": int(len(run.marks.uid))}
        if i == 0:
            print(f"warm-up (compiles): {json.dumps(rec)}", flush=True)
            warm = rec
            continue
        rows.append(rec)
        print(json.dumps(rec), flush=True)
    det = float(np.mean([r["detect_s"] + r["read_s"] for r in rows]))
    pres = [r["preprocess_s"] for r in rows if r["preprocess_s"] is not None]
    print(f"xie2018 ({c.name}, checkpoint step {step}, tile {tuple(c.detection.tile_zyx)}, "
          f"conv_impl {c.detection.conv_impl!r}, "
          f"{jax.devices()[0].platform}): detection {det:.1f} s/scan"
          + (f", preprocessing {np.mean(pres):.1f} s/scan" if pres else "")
          + f" over {len(rows)} scans; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB")
    per_scan = det + (float(np.mean(pres)) if pres else 0.0)
    first = warm["detect_s"] + warm["read_s"] + (warm["preprocess_s"] or 0.0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(f"per-scan seconds: {per_scan:.1f} (compile {first - per_scan:.1f}, peak GB "
          f"{peak:.2f})", flush=True)
    return 0


def _adult(c, args) -> int:
    """Per-scan seconds of one adult-size raw scan, preprocessing included."""
    from adult_scan import adult_scan

    from lungjax.detect import read_preprocessed
    from lungjax.methods.xie2018 import detection_kwargs, scan_apply_fn
    from lungjax.tasks.anchors_decode import detect_volume

    raw = adult_scan(args.scale)
    model, task = stages.scan_model(c), train_lib.build_task(c)
    if args.workdir:
        variables, _ = stages.restore_variables(args.workdir)
    else:
        x = np.zeros((1, *c.data.patch_size_zyx, 1), np.float32)
        variables = jax.jit(model.init)(jax.random.key(0), x)
    variables = jax.device_get(variables)
    kw = detection_kwargs(c, model)
    lung_only = kw.pop("lung_only")
    pre_cfg = {k: c.data[k] for k in ("spacing_zyx", "hu_window")}
    pre_cfg.update(stages.store_preprocessing(c))
    fn = scan_apply_fn(model)
    print(f"xie2018 ({c.name}): {raw} (chest scale {args.scale:g}), tile "
          f"{tuple(c.detection.tile_zyx) or 'none (one pass)'}, conv_impl "
          f"{c.detection.conv_impl!r}, {jax.devices()[0].platform}", flush=True)
    totals = []
    for r in range(args.scans + 1):
        t0 = time.perf_counter()
        volume, _, lung, _, _ = read_preprocessed(raw, pre_cfg)
        t1 = time.perf_counter()
        det = detect_volume(fn, volume, task.cfg, variables=variables,
                            lung_mask=lung if lung_only else None, **kw)
        t2 = time.perf_counter()
        tag = "warm-up (compiles)" if r == 0 else f"run {r}"
        print(f"{tag}: preprocessing {t1 - t0:.1f} s (volume {volume.shape}), detection "
              f"{t2 - t1:.1f} s ({len(det.score)} marks), total {t2 - t0:.1f} s", flush=True)
        totals.append(t2 - t0)
    per_scan = float(np.mean(totals[1:]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(f"per-scan seconds: {per_scan:.1f} (compile {totals[0] - per_scan:.1f}, peak GB "
          f"{peak:.2f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
