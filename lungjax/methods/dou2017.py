"""Dou et al. (MICCAI 2017) on the stages engine: what the method adds to it.

The method itself is its stage list in ``configs/dou2017.py`` (FCN screening with online
sample filtering -> candidates -> hybrid-loss residual false-positive reduction ->
LUNA16 FROC); this module holds the two pieces the runner cannot know:

* ``STAGE_CONFIGS["dou2017_fpr"]``: the FP-reduction network's conv1-3 take the FCN's
  widths and kernels (their trained weights initialise them) and its regression targets
  the patch size and spacing;
* ``CV_REPORTS["dou2017_tables"]``: the paper's tables from the cross-validation folds
  (``<workdir>/cv/dou2017_tables.md``, figures pooled over the folds' held-out scans,
  next to the paper's LUNA16 numbers): 1. screening with and without online sample
  filtering (sensitivity, FPs/scan, every candidate counting); 2. sensitivity at 1 FP/scan
  of DeepNet, ResNet and ResNet+HL; 3. FROC at 1/8 ... 8 FPs/scan and CPM.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from lungjax import fileio
from lungjax.atomic import atomic_write_text
from lungjax.models.fp_reduction import FCN_TRANSFER_PATHS
from lungjax.registry import CV_REPORTS, STAGE_CONFIGS

ONE_FP = 3  # index of 1 FP/scan in lungjax.evaluation.froc.FP_RATES
NETWORKS = ("deepnet", "resnet", "resnet_hl")
NAMES = {"deepnet": "DeepNet", "resnet": "ResNet", "resnet_hl": "ResNet+HL"}
# The paper's LUNA16 figures (10-fold CV), for the tables.
PAPER = {"sensitivities": (0.659, 0.745, 0.819, 0.865, 0.906, 0.933, 0.946), "cpm": 0.839,
         "stage1": {"osf": (0.971, 219.1), "no_osf": (0.943, 286.2)},
         "stage2_at_1fp": {"deepnet": 0.848, "resnet": 0.867, "resnet_hl": 0.905}}
MODEL_PREFIX = "dou2017_fpr_"


@STAGE_CONFIGS.register("dou2017_fpr")
def fpr_config(cfg, method_config) -> None:
    """Fills the FP-reduction stage's derived fields in ``cfg`` (its run config) from the
    method's config (whose model is the screening FCN)."""
    network = str(cfg.model.name).removeprefix(MODEL_PREFIX)
    if network not in NETWORKS:
        raise ValueError(f"config.stages.fpr.sections.model.name: {cfg.model.name!r} is not "
                         f"one of {', '.join(MODEL_PREFIX + n for n in NETWORKS)}")
    fcn = method_config.model
    cfg.model.trunk_features = tuple(int(f) for f in fcn.features[:3])
    cfg.model.trunk_kernels = tuple(tuple(int(v) for v in k) for k in fcn.kernels[:3])
    cfg.task.patch_size_zyx = tuple(cfg.data.patch_size_zyx)
    cfg.task.spacing_zyx = tuple(cfg.data.spacing_zyx)
    cfg.train.init_paths = FCN_TRANSFER_PATHS


# ---------------------------------------------------------------------------- tables


def _systems(record: dict) -> dict[str, dict]:
    """Every stage-2 network's held-out result in a fold record: {network: record}."""
    final = record["final_stage"]
    runs = [record["result"]] + [v["stages"][final] for v in record["variants"].values()
                                 if final in v["stages"]]
    return {r["network"].removeprefix(MODEL_PREFIX): r for r in runs}


def _screening(record: dict) -> dict[str, dict]:
    """Screening figures with ("osf") and without ("no_osf") online sample filtering,
    told apart by the screening network's own run config (``train.osf.enabled``)."""
    out = {}
    for part in [record] + list(record["variants"].values()):
        for rec in part["stages"].values():
            if "stats" in rec and "network_dir" in rec:
                with fileio.open_file(os.path.join(rec["network_dir"], "config.json"),
                          encoding="utf-8") as f:
                    osf = json.load(f)["train"]["osf"]["enabled"]
                out["osf" if osf else "no_osf"] = rec["stats"]
    return out


def _fold_row(record: dict) -> dict:
    from lungjax.stages import fold_metrics

    out = fold_metrics(record)
    for name, s in _screening(record).items():
        out[f"stage1_{name}_sensitivity"] = s["sensitivity"]
        out[f"stage1_{name}_fps_per_scan"] = s["fps_per_scan"]
    for net, m in _systems(record).items():
        out[f"{net}_sens@1"] = m["sensitivity_at_1fp"]
    return out


def _pooled_screening(records: Sequence[dict], name: str):
    rows = [_screening(r).get(name) for r in records]
    if any(r is None for r in rows):
        return None
    det = sum(s["n_detected"] for s in rows)
    nod = sum(s["n_nodules"] for s in rows)
    fps = sum(s["n_false_positives"] for s in rows)
    scans = sum(s["n_scans"] for s in rows)
    return (det / nod if nod else float("nan")), fps / scans, det, nod


@CV_REPORTS.register("dou2017_tables")
def write_tables(config, workdir: str, records: Sequence[dict], report: dict) -> dict:
    """Writes ``<workdir>/cv/`` again with every network's figures (cv_report.*, FROC
    PNGs) and ``dou2017_tables.md``; returns the report plus "tables" (the Markdown)."""
    from lungjax.evaluation.reports import cv_report, froc_table, n_folds
    from lungjax.stages import pooled_froc

    main = records[0]["result"]["network"].removeprefix(MODEL_PREFIX)
    variant_of = {}
    for vname, v in records[0]["variants"].items():
        res = v["stages"].get(records[0]["final_stage"])
        if res is not None:
            variant_of[res["network"].removeprefix(MODEL_PREFIX)] = vname
    systems = {main: pooled_froc(config, records)}
    for net, vname in variant_of.items():
        if net != main:
            systems[net] = pooled_froc(config, records, vname)
    systems = {n: s for n, s in sorted(systems.items(), key=lambda x: NETWORKS.index(x[0]))
               if s is not None}
    out_dir = os.path.join(workdir, "cv")
    report = cv_report([_fold_row(r) for r in records], out_dir,
                       title=f"{config.name}: {len(records)}-fold cross-validation "
                             f"({NAMES[main]})",
                       pooled=systems.get(main),
                       systems={NAMES[n]: s for n, s in systems.items()}
                       if len(systems) > 1 else None,
                       missing_folds=report.get("missing_folds", ()))

    n_scans = sum(len(r["uids"]) for r in records)
    md = [f"# {config.name}: the paper's tables", "",
          f"{n_folds(len(records))} (held-out folds {[r['fold'] for r in records]}), "
          f"{n_scans} held-out scans; figures pooled over the folds. Paper: LUNA16, 10-fold "
          "CV, 888 scans.", "",
          "## Table 1: candidate screening (stage 1)", "",
          "| FCN | sensitivity | FPs/scan | paper sensitivity | paper FPs/scan |",
          "|---|---|---|---|---|"]
    for key, label in (("no_osf", "without OSF"), ("osf", "with OSF")):
        p = _pooled_screening(records, key)
        if p is not None:
            ps, pf = PAPER["stage1"][key]
            md.append(f"| {label} | {p[0]:.3f} ({p[2]}/{p[3]}) | {p[1]:.1f} | {ps:.3f} | "
                      f"{pf:.1f} |")
    md += ["", "## Table 2: false-positive reduction (stage 2), sensitivity at 1 FP/scan", "",
           "| network | sensitivity | CPM | paper sensitivity |", "|---|---|---|---|"]
    for n, fr in systems.items():
        md.append(f"| {NAMES[n]} | {fr.sensitivities[ONE_FP]:.3f} | {fr.cpm:.3f} | "
                  f"{PAPER['stage2_at_1fp'][n]:.3f} |")
    md += ["", "## Table 3: FROC (sensitivity at FPs/scan, interpolated) and CPM", ""]
    rows = {f"{NAMES[main]} (pooled)": systems[main]} if main in systems else {}
    table = froc_table(rows, digits=3)
    table += ("| paper (Dou et al. 2017) | " + " | ".join(f"{v:.3f}" for v in
              PAPER["sensitivities"]) + f" | {PAPER['cpm']:.3f} | n/a |\n")
    md.append(table.rstrip("\n"))
    secs = [r["result"]["mean_seconds_per_scan"] for r in records]
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
    print(f"dou2017 tables: {path}", flush=True)
    return report
