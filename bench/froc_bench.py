"""Times the LUNA16 FROC evaluation on the real reference tables with a generated
submission (jittered true nodules + random false positives).

    python bench/froc_bench.py [--marks 100000] [--bootstrap 1000] [--repeats 3]

Prints seconds for: reading the CSV submission, compute_froc without bootstrap, and
compute_froc with the bootstrap. Needs ../shared/luna16 (or LUNGJAX_LUNA16_TABLES).
"""

import argparse
import os
import pathlib
import tempfile
import time

import numpy as np

from lungjax.data.tables import (Marks, read_findings_csv, read_marks_csv, read_uid_list,
                                 write_marks_csv)
from lungjax.evaluation.froc import compute_froc


def make_submission(ann, exc, uids, n_marks, seed=0):
    rng = np.random.default_rng(seed)
    found = rng.random(len(ann)) < 0.9
    jitter = rng.normal(0, 0.1, (len(ann), 3)) * ann.diameter_mm[:, None]
    tp = Marks(ann.uid[found], (ann.xyz + jitter)[found], rng.beta(5, 1.5, found.sum()))
    n_fp = n_marks - len(tp)
    k = rng.integers(0, len(exc), n_fp)        # scatter around real in-scan positions
    fp = Marks(exc.uid[k], exc.xyz[k] + rng.normal(0, 20, (n_fp, 3)), rng.beta(1, 6, n_fp))
    return Marks.concatenate([tp, fp])


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main():
    p = argparse.ArgumentParser()
    default = pathlib.Path(__file__).resolve().parents[2] / "shared" / "luna16"
    p.add_argument("--tables", default=os.environ.get("LUNGJAX_LUNA16_TABLES", str(default)))
    p.add_argument("--marks", type=int, default=100_000)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    d = pathlib.Path(a.tables)
    ann = read_findings_csv(d / "annotations.csv")
    exc = read_findings_csv(d / "annotations_excluded.csv")
    uids = read_uid_list(d / "seriesuids.csv")
    marks = make_submission(ann, exc, uids, a.marks)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sub.csv")
        write_marks_csv(path, marks)
        t_read, _ = best_of(lambda: read_marks_csv(path), a.repeats)
    t_eval, r = best_of(lambda: compute_froc(ann, exc, uids, marks), a.repeats)
    t_boot, rb = best_of(lambda: compute_froc(ann, exc, uids, marks, n_bootstrap=a.bootstrap,
                                              seed=0), 1)
    print(f"scans {r.n_scans}  nodules {r.n_nodules}  submission marks {len(marks)}  "
          f"evaluated after 100/scan cap {r.n_marks}  CPM {r.cpm:.4f}")
    print(f"read_marks_csv                 {t_read:8.3f} s (best of {a.repeats})")
    print(f"compute_froc, no bootstrap     {t_eval:8.3f} s (best of {a.repeats})")
    print(f"compute_froc, {a.bootstrap} bootstrap  {t_boot:8.3f} s "
          f"(CPM {rb.bootstrap.cpm_lower:.4f}..{rb.bootstrap.cpm_upper:.4f})")


if __name__ == "__main__":
    main()
