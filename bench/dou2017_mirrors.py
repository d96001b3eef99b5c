"""dou2017 stage 2 with and without mirror averaging, on one finished run's held-out
candidates: the same trained network scores the same candidates once and as the mean over
each patch's 8 mirror images (``stages.classify.mirrors``); prints both CPMs with their
bootstrap intervals and the seconds each took.

    python bench/dou2017_mirrors.py --run runs/dou2017 \
        --data data_cache/synthetic_default_seed0_v2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ml_collections import config_dict  # noqa: E402

from lungjax.data.store import PatchStore  # noqa: E402
from lungjax.data.tables import read_findings_csv  # noqa: E402
from lungjax.evaluation.froc import compute_froc  # noqa: E402
from lungjax.methods.candidates import (CandidateClassifier, classify_scans,  # noqa: E402
                                        load_candidates)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a finished dou2017 run folder (fpr/, screen/)")
    p.add_argument("--data", required=True, help="its data folder (luna16/, store_1x1x1mm/)")
    p.add_argument("--bootstrap", type=int, default=1000)
    a = p.parse_args(argv)
    with open(os.path.join(a.run, "fpr", "config.json"), encoding="utf-8") as f:
        cfg = config_dict.ConfigDict(json.load(f))
    store = PatchStore.open(os.path.join(a.data, "store_1x1x1mm"))
    ann = read_findings_csv(os.path.join(a.data, "luna16", "annotations.csv"))
    exc = read_findings_csv(os.path.join(a.data, "luna16", "annotations_excluded.csv"))
    cands = load_candidates(os.path.join(a.run, "screen", "candidates_test.npz"))
    uids = list(cands)
    for mirrors in (False, True):
        clf = CandidateClassifier.from_checkpoint(cfg, os.path.join(a.run, "fpr"), 32, mirrors)
        t0 = time.perf_counter()
        marks, _, _ = classify_scans(clf, store, cands, uids)
        secs = time.perf_counter() - t0
        r = compute_froc(ann, exc, uids, marks, n_bootstrap=a.bootstrap)
        b = r.bootstrap
        ci = (b.cpm_lower, b.cpm_upper) if b is not None else (float("nan"),) * 2
        print(f"mirrors={mirrors!s:5}  CPM {r.cpm:.4f} (95% CI {ci[0]:.3f}-{ci[1]:.3f})  {secs / len(uids):.1f} s/scan (stage 2, compile included)",
              flush=True)


if __name__ == "__main__":
    main()
