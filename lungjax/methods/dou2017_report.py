"""dou2017 cross-validation report: the paper's tables from the fold records.

Tables (``<workdir>/cv/dou2017_tables.md``, figures pooled over the folds' held-out scans,
next to the paper's LUNA16 numbers):

1. stage-1 screening with and without online sample filtering: sensitivity and false
   positives per scan (every candidate counts);
2. stage-2 false-positive reduction: sensitivity at 1 FP/scan of DeepNet, ResNet and
   ResNet+HL (pooled FROC, interpolated reading);
3. FROC of the method at 1/8 ... 8 FPs/scan and CPM.

``lungjax.evaluation.reports.cv_report`` writes the per-fold table (mean ± std), the
pooled FROC and the FROC curves (``froc_cv.png``, ``froc_systems.png``).
"""

from __future__ import annotations

import os
from typing import Sequence

from lungjax.data.tables import atomic_write_text
from lungjax.evaluation.froc import FP_RATES, FrocResult


def _fold_metrics(rec: dict) -> dict:
    out = {"fold": int(rec["fold"]), "cpm": rec["cpm"], "froc_new": rec["froc_new"]}
    for rate, s in zip(FP_RATES, rec["sensitivities"]):
        out[f"sens@{rate:g}"] = float(s)
    for name, s in rec["stage1"].items():
        out[f"stage1_{name}_sensitivity"] = s["sensitivity"]
        out[f"stage1_{name}_fps_per_scan"] = s["fps_per_scan"]
    for net, m in rec["stage2"].items():
        out[f"{net}_sens@1"] = m["sensitivity_at_1fp"]
    out["seconds_per_scan"] = rec["mean_seconds_per_scan"]
    return out


def _pooled_stage1(records: Sequence[dict], name: str) -> tuple[float, float, int, int] | None:
    rows = [r["stage1"][name] for r in records if name in r["stage1"]]
    if len(rows) != len(records):
        return None
    det = sum(s["n_detected"] for s in rows)
    nod = sum(s["n_nodules"] for s in rows)
    fps = sum(s["n_false_positives"] for s in rows)
    scans = sum(s["n_scans"] for s in rows)
    return (det / nod if nod else float("nan")), fps / scans, det, nod


def _pooled(store, records, network) -> FrocResult | None:
    from lungjax.evaluation.reports import pooled_froc
    from lungjax.methods.dou2017 import fold_marks

    if not all(network in r["stage2"] for r in records):
        return None
    parts = [fold_marks(r, network) for r in records]
    uids = [u for us, _ in parts for u in us]
    return pooled_froc(store.findings(uids), store.excluded(uids), parts)


def write_cv_report(config, workdir: str, records: Sequence[dict]) -> dict:
    """Writes ``<workdir>/cv/`` (cv_report.*, FROC PNGs, dou2017_tables.md).

    Returns:
      The ``cv_report`` dict plus "tables" (the Markdown) and ``files["tables"]``.
    """
    from lungjax.data.store import PatchStore
    from lungjax.evaluation.reports import cv_report, froc_table
    from lungjax.methods.dou2017 import PAPER
    from lungjax.methods.dou2017_stages import NETWORKS
    from lungjax.train_data import prepare_data

    store = PatchStore.open(prepare_data(config))
    main = records[0]["network"]
    nets = [n for n in NETWORKS if all(n in r["stage2"] for r in records)]
    systems = {n: _pooled(store, records, n) for n in nets}
    out_dir = os.path.join(workdir, "cv")
    names = {"deepnet": "DeepNet", "resnet": "ResNet", "resnet_hl": "ResNet+HL"}
    report = cv_report([_fold_metrics(r) for r in records], out_dir,
                       title=f"{config.name}: {len(records)}-fold cross-validation "
                             f"({names.get(main, main)})",
                       pooled=systems.get(main),
                       systems={names.get(n, n): s for n, s in systems.items()}
                       if len(systems) > 1 else None)

    n_scans = sum(len(r["uids"]) for r in records)
    md = [f"# {config.name}: the paper's tables", "",
          f"{len(records)} folds (held-out folds {[r['fold'] for r in records]}), "
          f"{n_scans} held-out scans; figures pooled over the folds. Paper: LUNA16, 10-fold "
          "CV, 888 scans.", "",
          "## Table 1: candidate screening (stage 1)", "",
          "| FCN | sensitivity | FPs/scan | paper sensitivity | paper FPs/scan |",
          "|---|---|---|---|---|"]
    for key, label in (("no_osf", "without OSF"), ("osf", "with OSF")):
        p = _pooled_stage1(records, key)
        if p is not None:
            ps, pf = PAPER["stage1"][key]
            md.append(f"| {label} | {p[0]:.3f} ({p[2]}/{p[3]}) | {p[1]:.1f} | {ps:.3f} | "
                      f"{pf:.1f} |")
    md += ["", "## Table 2: false-positive reduction (stage 2), sensitivity at 1 FP/scan", "",
           "| network | sensitivity | CPM | paper sensitivity |", "|---|---|---|---|"]
    for n, fr in systems.items():
        md.append(f"| {names[n]} | {fr.sensitivities[3]:.3f} | {fr.cpm:.3f} | "
                  f"{PAPER['stage2_at_1fp'][n]:.3f} |")
    md += ["", "## Table 3: FROC (sensitivity at FPs/scan, interpolated) and CPM", ""]
    rows = {f"{names.get(main, main)} (pooled)": systems[main]} if main in systems else {}
    rows = {k: v for k, v in rows.items() if v is not None}
    table = froc_table(rows, digits=3)
    table += ("| paper (Dou et al. 2017) | " + " | ".join(f"{v:.3f}" for v in
              PAPER["sensitivities"]) + f" | {PAPER['cpm']:.3f} | n/a |\n")
    md.append(table.rstrip("\n"))
    secs = [r["mean_seconds_per_scan"] for r in records]
    md += ["", f"Inference (stage-1 screening + stage-2 scoring, preprocessed scan in the "
           f"store): {sum(secs) / len(secs):.1f} s per scan on average.",
           "", f"FROC curves: {report['files'].get('froc_png', 'n/a')}"
           + (f", {report['files']['systems_png']}" if "systems_png" in report["files"]
              else "")]
    text = "\n".join(md) + "\n"
    path = os.path.join(out_dir, "dou2017_tables.md")
    atomic_write_text(path, text)
    report["files"]["tables"] = path
    report["tables"] = text
    return report
