"""xie2018's suppression across both heads, compared on one trained detector without
retraining: every anchor of the held-out scans is decoded once, then selected with each
rule, and each selection is scored with the LUNA16 FROC.

    python bench/xie2018_nms.py --model runs/xie2018/export \\
        --data data_cache/synthetic_default_seed0_v2/luna16 \\
        --store data_cache/synthetic_default_seed0_v2/store_1x1x1mm [--fold 0]

``--model`` is the folder ``--mode=export`` printed; the held-out scans are the stored
scans of subset ``--fold``. Prints one line per rule: CPM, sensitivities at 1/8 ... 8
FPs/scan, marks.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lungjax.data.store import PatchStore  # noqa: E402
from lungjax.data.tables import Marks, read_findings_csv  # noqa: E402
from lungjax.detect import read_method_stages  # noqa: E402
from lungjax.evaluation.froc import compute_froc  # noqa: E402
from lungjax.export import load_predictor  # noqa: E402
from lungjax.registry import TASKS  # noqa: E402
from lungjax.tasks import screening  # noqa: E402
from lungjax.tasks.anchors_decode import decode_volume, select_candidates, to_marks  # noqa: E402

RULES = {"iou > 0.1": dict(method="iou", iou_threshold=0.1),
         "iou > 0.05": dict(method="iou", iou_threshold=0.05),
         "iou > 0 (any overlap)": dict(method="iou", iou_threshold=0.0),
         "soft-NMS sigma 0.5": dict(method="soft", sigma=0.5),
         "distance 10 mm": dict(method="distance", radius=10.0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="LUNA16-layout folder (annotations)")
    p.add_argument("--store", required=True, help="the prepared store the model used")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--threshold", type=float, default=0.3)
    args = p.parse_args()
    stage = [s for s in read_method_stages(args.model) if s["kind"] == "detect"][-1]
    predict, side = load_predictor(os.path.join(args.model, stage["dir"]))
    cfg = TASKS.build(side["task"]).cfg
    store = PatchStore.open(args.store)
    uids = store.uids([args.fold])
    raw = {}
    for u in uids:  # every anchor above the threshold, inside the lung mask, once
        sc, ce, di = decode_volume(predict, store.read_volume(u), cfg,
                                   multiple=side["coarsest_stride"], jit=False,
                                   threshold=args.threshold)
        keep = screening.inside_mask(store.read_volume(u, "lung"), ce)
        raw[u] = (np.asarray(sc, np.float64)[keep], ce[keep],
                  np.asarray(di, np.float64)[keep], store.scan(u).geometry)
    ann = read_findings_csv(os.path.join(args.data, "annotations.csv"))
    exc = read_findings_csv(os.path.join(args.data, "annotations_excluded.csv"))
    print(f"{len(uids)} held-out scans of subset {args.fold}; threshold {args.threshold}")
    for name, kw in RULES.items():
        marks = Marks.concatenate([
            to_marks(u, select_candidates(s, c, d, threshold=args.threshold,
                                          max_candidates=100, **kw), g)[0]
            for u, (s, c, d, g) in raw.items()])
        r = compute_froc(ann, exc, uids, marks)
        print(f"{name:24s} CPM {r.cpm:.4f}  sensitivities "
              f"{' '.join(f'{v:.3f}' for v in r.sensitivities)}  marks {len(marks)}")


if __name__ == "__main__":
    main()
