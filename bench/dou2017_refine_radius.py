"""dou2017 stage 1 with several centroid radii (``detection.refine_radius_mm``), on one
finished run's trained FCN: each scan's score map is computed once and read with every
radius; prints, per radius, the nodules hit, the false positives per scan and how far the
hit candidates sit from their nodules' centres.

By default it screens the training scans the run's ``screen`` stage screened for stage-2
hard negatives (the scans the radius may be chosen on); ``--part test`` screens the
held-out fold instead (to look at, not to choose on).

    python bench/dou2017_refine_radius.py --run runs/dou2017 \
        --data data_cache/synthetic_default_seed0_v2 --radii 0,4,6,7,8,10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from ml_collections import config_dict  # noqa: E402

from lungjax.data.store import PatchStore  # noqa: E402
from lungjax.data.tables import Marks  # noqa: E402
from lungjax.detect import (DetectionSettings, candidates_of_scores,  # noqa: E402
                            store_screening_stats)
from lungjax.methods.candidates import load_candidates  # noqa: E402
from lungjax.stages import restore_variables, scan_model  # noqa: E402
from lungjax.steps import make_predict_fn  # noqa: E402
from lungjax import train as train_lib  # noqa: E402
from lungjax.tasks.screening import output_mapping, score_volume  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a finished dou2017 run folder (fcn/, screen/)")
    p.add_argument("--data", required=True, help="its data folder (store_1x1x1mm/)")
    p.add_argument("--radii", default="0,4,6,7,8,10", help="centroid radii in mm (0 = peak)")
    p.add_argument("--part", choices=("train", "test"), default="train",
                   help="the screened training scans (default) or the held-out fold")
    a = p.parse_args(argv)
    radii = [float(r) for r in a.radii.split(",")]
    with open(os.path.join(a.run, "fcn", "config.json"), encoding="utf-8") as f:
        cfg = config_dict.ConfigDict(json.load(f))
    store = PatchStore.open(os.path.join(a.data, "store_1x1x1mm"))
    uids = list(load_candidates(os.path.join(a.run, "screen", f"candidates_{a.part}.npz")))

    # As the screen stage runs the FCN (lungjax.methods.candidates.screen_scans).
    model, task = scan_model(cfg), train_lib.build_task(cfg)
    variables, step = restore_variables(os.path.join(a.run, "fcn"))
    mapping = output_mapping(model.layer_specs(), center="patch")
    base = dataclasses.replace(DetectionSettings.from_config(cfg.detection.to_dict()),
                               log_odds=True)
    predict = make_predict_fn(model, task, cfg.data.spatial_dims, output="log_odds")
    print(f"FCN step {step}; {len(uids)} {a.part} scans; threshold {base.threshold}, "
          f"NMS {base.nms_radius_mm} mm, lung only {base.lung_only}", flush=True)

    marks: dict[float, list[Marks]] = {r: [] for r in radii}
    t0 = time.perf_counter()
    for i, uid in enumerate(uids):
        volume = store.read_volume(uid)
        lung = store.read_volume(uid, "lung") if base.lung_only else None
        scores, cell_map = score_volume(predict, volume, mapping, base.tile_zyx, base.batch,
                                        variables=variables, input_zyx=base.input_zyx)
        geometry = store.scan(uid).geometry
        for r in radii:
            c = candidates_of_scores(scores, cell_map, geometry,
                                     dataclasses.replace(base, refine_radius_mm=r),
                                     volume.shape, lung_mask=lung)
            marks[r].append(Marks(np.full(len(c), uid), c.world_xyz, c.score))
        print(f"  scan {i + 1}/{len(uids)} scored ({time.perf_counter() - t0:.0f} s)",
              flush=True)

    findings = store.findings(uids)
    print("\n| radius (mm) | nodules hit | FPs/scan | median hit distance (mm) |")
    print("|---|---|---|---|")
    for r in radii:
        m = Marks.concatenate(marks[r])
        s = store_screening_stats(m, store, uids)
        dist = []
        for j in range(len(findings)):  # each hit nodule: its nearest candidate
            own = m.xyz[m.uid == findings.uid[j]]
            if len(own):
                d = float(np.min(np.linalg.norm(own - findings.xyz[j], axis=1)))
                if d <= findings.diameter_mm[j] / 2:
                    dist.append(d)
        med = f"{np.median(dist):.1f}" if dist else "-"
        print(f"| {r:g} | {s['n_detected']}/{s['n_nodules']} | {s['fps_per_scan']:.1f} | "
              f"{med} |", flush=True)


if __name__ == "__main__":
    main()
