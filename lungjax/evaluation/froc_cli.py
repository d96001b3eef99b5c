"""Command line of the LUNA16 FROC evaluation (``python -m lungjax.evaluation.froc_cli``).

Reads the standard LUNA16 tables and a submission CSV (seriesuid, coordX, coordY,
coordZ, probability; extra columns are ignored) and writes into ``--out``, each file
atomically:

  summary.txt         the summary printed to stdout
  summary.json        the same as JSON, with the inputs used
  froc.png            the FROC curve (bootstrap mean and interval when computed)
  froc_curve.csv      operating points: fps_per_scan, sensitivity, threshold
  bootstrap.csv       fps_per_scan, sensitivity_mean, _lower, _upper (with --bootstrap > 0)
  missed_nodules.csv  reference nodules no mark hit (LUNA16 annotation columns)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
import warnings

import numpy as np

from lungjax import fileio
from lungjax.atomic import atomic_write_text
from lungjax.data.tables import (TableError, read_findings_csv, read_marks_csv, read_uid_list,
                                 write_findings_csv)
from lungjax.evaluation.froc import (N_BOOTSTRAP, FrocResult, compute_froc, validate_findings,
                                    validate_marks)

__all__ = ["evaluate_files", "main", "write_outputs"]


def _csv(header, rows) -> str:
    return ",".join(header) + "\n" + "".join(",".join(r) + "\n" for r in rows)


def write_outputs(result: FrocResult, out_dir: str | os.PathLike, *, name: str = "system",
                  inputs: dict | None = None) -> dict[str, str]:
    """Writes the evaluation files of ``result`` into ``out_dir``.

    Returns:
      {kind: path} of the files written.
    """
    from lungjax.evaluation.plots import plot_froc  # matplotlib only when writing figures

    out_dir = os.fspath(out_dir)
    fileio.makedirs(out_dir)
    paths = {k: os.path.join(out_dir, f) for k, f in (
        ("summary_txt", "summary.txt"), ("summary_json", "summary.json"),
        ("froc_png", "froc.png"), ("froc_curve_csv", "froc_curve.csv"),
        ("missed_csv", "missed_nodules.csv"))}
    atomic_write_text(paths["summary_txt"], result.summary_text(name))
    payload = {"name": name, **result.to_json(), "inputs": inputs or {}}
    atomic_write_text(paths["summary_json"], json.dumps(payload, indent=2) + "\n")
    plot_froc(result, paths["froc_png"], label=name, title=f"FROC: {name}")
    atomic_write_text(paths["froc_curve_csv"], _csv(
        ("fps_per_scan", "sensitivity", "threshold"),
        ((f"{f:.9f}", f"{s:.9f}", f"{t:.9g}") for f, s, t in
         zip(result.fps_per_scan, result.sensitivity, result.thresholds))))
    write_findings_csv(paths["missed_csv"], result.missed)
    b = result.bootstrap
    if b is not None:
        paths["bootstrap_csv"] = os.path.join(out_dir, "bootstrap.csv")
        atomic_write_text(paths["bootstrap_csv"], _csv(
            ("fps_per_scan", "sensitivity_mean", "sensitivity_lower", "sensitivity_upper"),
            ((f"{f:.9f}", f"{m:.9f}", f"{lo:.9f}", f"{hi:.9f}") for f, m, lo, hi in
             zip(b.fps_grid, b.sens_mean, b.sens_lower, b.sens_upper))))
    return paths


def evaluate_files(annotations: str, excluded: str, seriesuids: str, submission: str, *,
                   n_bootstrap: int = N_BOOTSTRAP, seed: int = 0,
                   max_marks_per_scan: int = 100) -> FrocResult:
    """Reads the four LUNA16 CSV files, validates them and runs :func:`compute_froc`.

    Raises:
      TableError / ValueError naming the file and row of any malformed input;
      FileNotFoundError for a missing file.
    """
    ann = read_findings_csv(annotations)
    validate_findings(ann, annotations)
    exc = read_findings_csv(excluded)
    validate_findings(exc, excluded)
    uids = read_uid_list(seriesuids)
    if not uids:
        raise TableError(f"{seriesuids}: no series UIDs")
    dup = sorted(u for u, n in collections.Counter(uids).items() if n > 1)
    if dup:
        raise TableError(f"{seriesuids}: UID(s) listed more than once: {dup[:5]}")
    marks = read_marks_csv(submission)
    validate_marks(marks, submission)
    return compute_froc(ann, exc, uids, marks, n_bootstrap=n_bootstrap, seed=seed,
                        max_marks_per_scan=max_marks_per_scan)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lungjax.evaluation.froc_cli",
        description="LUNA16 FROC / CPM evaluation of a submission CSV.")
    p.add_argument("--annotations", required=True, help="annotations.csv")
    p.add_argument("--excluded", required=True, help="annotations_excluded.csv")
    p.add_argument("--seriesuids", required=True, help="seriesuids.csv (scans evaluated)")
    p.add_argument("--submission", required=True,
                   help="CSV with seriesuid,coordX,coordY,coordZ,probability")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--bootstrap", type=int, default=N_BOOTSTRAP,
                   help="bootstrap resamples over scans (0 = none; default 1000 as LUNA16)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--max-marks-per-scan", type=int, default=100,
                   help="per-scan cap on marks (LUNA16: 100; <= 0 = no cap)")
    p.add_argument("--name", default=None, help="system name (default: submission file name)")
    args = p.parse_args(argv)
    if args.bootstrap < 0:
        p.error("--bootstrap must be >= 0")
    name = args.name or os.path.splitext(os.path.basename(args.submission))[0]
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = evaluate_files(args.annotations, args.excluded, args.seriesuids,
                                    args.submission, n_bootstrap=args.bootstrap,
                                    seed=args.seed, max_marks_per_scan=args.max_marks_per_scan)
    except (TableError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if result.unknown_uids:
        print("warning: marks on UIDs not in the scan list (ignored):", file=sys.stderr)
        for u in result.unknown_uids:
            print(f"  {u}", file=sys.stderr)
    inputs = {"annotations": os.path.abspath(args.annotations),
              "excluded": os.path.abspath(args.excluded),
              "seriesuids": os.path.abspath(args.seriesuids),
              "submission": os.path.abspath(args.submission),
              "bootstrap": args.bootstrap, "seed": args.seed,
              "max_marks_per_scan": args.max_marks_per_scan,
              "seconds": round(time.perf_counter() - t0, 3),
              "numpy": np.__version__}
    write_outputs(result, args.out, name=name, inputs=inputs)
    sys.stdout.write(result.summary_text(name))
    print(f"\nwritten to {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
