"""The run modes behind ``lungjax.main``: train, cv, evaluate, export.

Each mode is callable alone and writes a JSON record of what it did into the workdir:

* ``train``    -> ``train_and_evaluate`` then, when the model can screen whole scans,
                  ``evaluate`` on the held-out fold (``train_summary.json``);
* ``evaluate`` -> full-scan detection of held-out scans with the latest checkpoint,
                  LUNA16 submission CSV, FROC / CPM (``eval/``);
* ``cv``       -> every fold of ``cv.folds`` in ``<workdir>/fold_<k>`` (a finished fold is
                  skipped, an unfinished one resumes), then one report (``cv/``); with
                  several hosts run as independent jobs, ``--config.cv.folds=(k,)`` per
                  job spreads the folds and a final ``--mode=cv`` run writes the report;
* ``export``   -> ``export/`` (see ``lungjax.export``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from lungjax import train as train_lib
from lungjax.data.tables import atomic_write_json
from lungjax.metrics_log import banner

DONE_FILE = "train_summary.json"


def _write_json(path: str, obj: Any) -> None:
    if jax.process_index() == 0:
        atomic_write_json(path, obj)


def run(mode: str, config, workdir: str) -> dict:
    if config.get("method"):  # a registered multi-stage method runs every mode itself
        from lungjax.registry import METHODS

        return METHODS.get(config.method)(mode, config, workdir)
    if mode == "train":
        return train(config, workdir)
    if mode == "evaluate":
        return evaluate(config, workdir)
    if mode == "cv":
        return cross_validate(config, workdir)
    if mode == "export":
        return export(config, workdir)
    raise ValueError(f"unknown mode {mode!r} (train | cv | evaluate | export)")


def train(config, workdir: str, data=None, engine=None) -> dict:
    """Trains (resuming if possible), then screens the held-out fold when the model can."""
    result = train_lib.train_and_evaluate(config, workdir, data=data, engine=engine)
    summary = {k: v for k, v in result.items() if k != "state"}
    if not result["preempted"] and _can_screen(config) and config.data.source == "store":
        summary["detection"] = evaluate(config, workdir)
    record = dict(summary)
    if "detection" in record:  # the FrocResult object is in there as its JSON already
        record["detection"] = {k: v for k, v in record["detection"].items()
                               if k != "froc_result"}
    _write_json(os.path.join(workdir, DONE_FILE), record)
    return summary


def _can_screen(config) -> bool:
    model = train_lib.build_model(config)
    return hasattr(model, "layer_specs") or _scan_detector(config) is not None


def _scan_detector(config):
    """The whole-scan detector registered for ``config.task.name`` (e.g. anchor-based
    detection, which decodes boxes instead of a score volume), or None."""
    from lungjax.registry import DETECTORS

    return DETECTORS.get(config.task.name) if config.task.name in DETECTORS else None


def _store_preprocessing(config) -> dict:
    """The prepared store's preprocessing settings (margin, closing, ...), when it exists."""
    from lungjax.data.store import read_manifest
    from lungjax.train_data import _default_store_path

    path = config.data.store or _default_store_path(config)
    try:
        manifest = read_manifest(path)
    except Exception:  # no store at that path: the config's own settings stand
        return {}
    keys = ("spacing_zyx", "hu_window", "margin_mm", "closing_mm", "use_lung_masks")
    return {k: manifest[k] for k in keys if manifest and k in manifest}


def _scan_model(config):
    """The model as used on whole scans (``detection.conv_impl`` formulation)."""
    model = train_lib.build_model(config)
    if config.detection.conv_impl and hasattr(model, "conv_impl"):
        model = model.clone(conv_impl=config.detection.conv_impl)
    return model


def _variables(workdir: str) -> tuple[dict, int]:
    from lungjax.checkpointing import restore_params

    ck = restore_params(os.path.join(workdir, "checkpoints"))
    return {"params": ck["params"], **ck["model_state"]}, ck["step"]


def evaluate(config, workdir: str) -> dict:
    """Screens the held-out fold's scans and scores the marks with the LUNA16 FROC."""
    from lungjax.data.store import PatchStore
    from lungjax.detect import DetectionSettings, run_detection, store_screening_stats, \
        write_submission
    from lungjax.evaluation.froc import FP_RATES, N_BOOTSTRAP, compute_froc
    from lungjax.steps import make_predict_fn
    from lungjax.tasks.screening import output_mapping
    from lungjax.train_data import held_out_uids, prepare_data

    banner(f"evaluate: {config.name} fold {config.data.fold}")
    model = _scan_model(config)
    task = train_lib.build_task(config)
    detector = _scan_detector(config)
    if detector is None and not hasattr(model, "layer_specs"):
        raise ValueError(f"model {config.model.name!r} cannot screen whole scans (no "
                         "layer_specs); --mode=evaluate needs a fully convolutional model")
    variables, step = _variables(workdir)
    store = PatchStore.open(prepare_data(config))
    uids = held_out_uids(config, store)
    if config.detection.max_scans:
        uids = uids[:config.detection.max_scans]
    if detector is not None:  # returns a DetectionRun-like (marks, mean_seconds_per_scan)
        run = detector(config, model, task, variables, store, uids)
    else:
        mapping = output_mapping(model.layer_specs(), center="patch")
        settings = DetectionSettings.from_config(config.detection.to_dict())
        run = run_detection(make_predict_fn(model, task, config.data.spatial_dims), store,
                            uids, mapping, settings, variables=variables,
                            progress=jax.process_index() == 0)
    out_dir = os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    sub = os.path.join(out_dir, "submission.csv")
    if jax.process_index() == 0:
        write_submission(sub, run.marks)
    annotations, excluded = store.findings(uids), store.excluded(uids)
    # A fold of a few scans moves the CPM in steps: every record carries its interval.
    froc = compute_froc(annotations, excluded, uids, run.marks, n_bootstrap=N_BOOTSTRAP,
                        seed=int(config.seed))
    record = {
        "step": step, "fold": config.data.fold, "scans": len(uids), "uids": list(uids),
        "cpm": froc.cpm, "cpm_ci95": froc.cpm_ci95, "froc_new": froc.froc_new,
        "sensitivities": np.asarray(froc.sensitivities).tolist(),
        "n_nodules": froc.n_nodules, "n_detected": froc.n_detected,
        "marks": len(run.marks.uid),
        "seconds_per_scan": run.mean_seconds_per_scan(),
        "screening": store_screening_stats(run.marks, store, uids),
        "submission_csv": sub, "froc": froc.to_json(),
    }
    _write_json(os.path.join(out_dir, "froc.json"), record)
    png = os.path.join(out_dir, "froc.png")
    if jax.process_index() == 0:
        from lungjax.evaluation.plots import plot_froc, plot_run_learning_curves

        plot_froc(froc, png, label=config.name, title=f"FROC: {config.name}, fold "
                  f"{config.data.fold} ({len(uids)} held-out scans)")
        plot_run_learning_curves(out_dir, {train_lib.LEARNING_CURVE_PNG: workdir})
    points = ", ".join(f"{r:g}: {s:.3f}" for r, s in zip(FP_RATES, froc.sensitivities))
    lo, hi = record["cpm_ci95"]
    print(f"CPM (FROC[luna]) = {froc.cpm:.4f} (95% CI {lo:.3f}-{hi:.3f}, bootstrap over scans), "
          f"FROC[new] = {froc.froc_new:.4f} on "
          f"{len(uids)} held-out scans, {froc.n_detected}/{froc.n_nodules} nodules hit; "
          f"{len(run.marks.uid)} marks; {record['seconds_per_scan']:.1f} s/scan\n"
          f"sensitivity at FPs/scan {points}\n"
          f"submission: {sub}\nFROC record: {os.path.join(out_dir, 'froc.json')}\n"
          f"FROC curve: {png}", flush=True)
    record["froc_result"] = froc
    return record


def cross_validate(config, workdir: str) -> dict:
    """Trains + evaluates every fold, then writes the cross-validation report."""
    folds = list(config.cv.folds) or list(range(config.data.num_folds))
    results = []
    engine = None  # built on the first fold that trains; the fold does not change it
    for k in folds:
        fold_dir = os.path.join(workdir, f"fold_{k}")
        done = os.path.join(fold_dir, DONE_FILE)
        if os.path.isfile(done):
            with open(done, encoding="utf-8") as f:
                summary = json.load(f)
            banner(f"cv: fold {k} already done ({done})")
        else:
            cfg = config.copy_and_resolve_references()
            with cfg.unlocked():
                cfg.data.fold = int(k)
            engine = engine or train_lib.build_engine(cfg)
            summary = train(cfg, fold_dir, engine=engine)
        results.append(_fold_metrics(k, summary))
    from lungjax.evaluation.reports import cv_report

    out = os.path.join(workdir, "cv")
    report = cv_report(results, out, title=f"{config.name}: {len(folds)}-fold cross-validation",
                       pooled=_pooled_froc(config, workdir, folds))
    print(f"cross-validation report: {report.get('files', out)}", flush=True)
    if config.cv.get("report"):  # a method's own comparison (e.g. ablations, ensembles)
        from lungjax.registry import CV_REPORTS

        report = CV_REPORTS.get(config.cv.report)(config, workdir, report)
    return report


def _pooled_froc(config, workdir: str, folds):
    """FROC of every fold's held-out marks pooled into one evaluation (LUNA16 style)."""
    from lungjax.data.store import PatchStore
    from lungjax.data.tables import read_marks_csv
    from lungjax.evaluation.reports import pooled_froc
    from lungjax.train_data import prepare_data

    parts = []
    for k in folds:
        rec = os.path.join(workdir, f"fold_{k}", "eval", "froc.json")
        if not os.path.isfile(rec):
            return None  # a fold without detection (e.g. a patch classifier)
        with open(rec, encoding="utf-8") as f:
            uids = json.load(f)["uids"]
        parts.append((uids, read_marks_csv(os.path.join(os.path.dirname(rec),
                                                        "submission.csv"))))
    store = PatchStore.open(prepare_data(config))
    all_uids = [u for uids, _ in parts for u in uids]
    return pooled_froc(store.findings(all_uids), store.excluded(all_uids), parts)


def _fold_metrics(fold: int, summary: dict) -> dict:
    out: dict[str, Any] = {"fold": int(fold)}
    for k, v in summary.items():
        if k.startswith("eval/") and isinstance(v, dict):
            for m, x in v.items():
                out[f"{k[5:]}_{m}"] = x
    det = summary.get("detection")
    if det:
        out["cpm"] = det["cpm"]
        out["froc_new"] = det["froc_new"]
        # Per-fold sensitivities as plain numbers: a fold read back from its JSON record
        # and a fold trained in this process then report alike.
        from lungjax.evaluation.froc import FP_RATES

        for rate, sens in zip(FP_RATES, det["sensitivities"]):
            out[f"sens@{rate:g}"] = float(sens)
    return out


def export(config, workdir: str) -> dict:
    """Exports the latest checkpoint of ``workdir`` to ``<workdir>/export``."""
    from lungjax import export as export_lib
    from lungjax.steps import make_predict_fn

    banner(f"export: {config.name}")
    model = _scan_model(config)
    task = train_lib.build_task(config)
    variables, step = _variables(workdir)
    size = tuple(config.export.input_size_zyx) or tuple(config.data.patch_size_zyx)
    min_size = None
    meta = {
        "model": config.model.to_dict(), "task": config.task.to_dict(),
        "config_name": config.name, "checkpoint_step": step,
        "preprocessing": {"spacing_zyx": list(config.data.spacing_zyx),
                          "hu_window": list(config.data.hu_window),
                          "intensity": "clip(HU, hu_window) scaled linearly to [0, 1]",
                          "patch_size_zyx": list(config.data.patch_size_zyx)},
    }
    meta["preprocessing"].update(_store_preprocessing(config))
    if hasattr(model, "layer_specs"):
        # A screening network runs on whole scans: spatial sizes stay symbolic (any size
        # from the receptive field up) unless export.input_size_zyx fixes them.
        from lungjax.tasks.screening import output_mapping

        m = output_mapping(model.layer_specs(), center="patch")
        meta["output_mapping"] = m.to_json()
        meta["detection"] = config.detection.to_dict()
        if not config.export.input_size_zyx:
            size = (None,) * len(size)
            min_size = tuple(int(r) for r in m.receptive_field_zyx)
    out_dir = os.path.join(workdir, "export")
    sidecar = export_lib.export_predictor(out_dir, make_predict_fn(model, task), variables,
                                          size, meta, min_size_zyx=min_size)
    print(f"exported step {step} to {out_dir}", flush=True)
    return sidecar
