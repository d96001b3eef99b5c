"""Dou et al. (MICCAI 2017) end to end on the engine: FCN screening with online sample
filtering -> hybrid-loss residual false-positive reduction -> LUNA16 FROC.

Selected by ``config.method = "dou2017"`` (``configs/dou2017.py``); every ``--mode``:

* ``train``: one fold (``data.fold`` held out) in ``workdir``::

      stage1/                  FCN (OSF) checkpoints, metrics, train_summary.json,
                               candidates_train.npz (training scans: hard negatives),
                               candidates_test.npz (held-out scans)
      stage2_<net>/            FP-reduction network, initialised from stage1 conv1-3
      stage2_<net>/eval/       submission.csv (world mm, probability, diameter_mm),
                               froc.json (FROC / CPM, stage-1 figures, s/scan), froc.png,
                               learning_curve_stage1.png, learning_curve_<net>.png
      dou2017.json             the fold's record (also its "done" marker)

  Each step leaves a record; a rerun skips finished steps and resumes a cut training
  from its checkpoint.
* ``evaluate``: re-screens the held-out fold and re-scores it with the trained networks.
* ``cv``: every fold of ``cv.folds`` in ``<workdir>/fold_<k>``, with the ablations
  (``dou2017.cv_ablations``: FCN without OSF, DeepNet, ResNet), then ``<workdir>/cv/``:
  ``cv_report.md/json`` + ``froc_cv.png`` / ``froc_systems.png``
  (``lungjax.evaluation.reports``) and ``dou2017_tables.md``, the paper's tables.
* ``export``: ``export/stage1`` (whole-scan FCN) and ``export/stage2`` (probability and
  diameter of (24, 60, 60) candidate patches).
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import jax
import numpy as np

from lungjax import train as train_lib
from lungjax.data.sampler import spread_subset
from lungjax.data.tables import Marks
from lungjax.methods import dou2017_stages as st
from lungjax.metrics_log import banner
from lungjax.registry import METHODS

FOLD_RECORD = "dou2017.json"
STAGE1, STAGE1_NO_OSF = "stage1", "stage1_no_osf"
ONE_FP = 3  # index of 1 FP/scan in lungjax.evaluation.froc.FP_RATES
# The paper's LUNA16 figures (10-fold CV), for the tables.
PAPER = {"sensitivities": (0.659, 0.745, 0.819, 0.865, 0.906, 0.933, 0.946), "cpm": 0.839,
         "stage1": {"osf": (0.971, 219.1), "no_osf": (0.943, 286.2)},
         "stage2_at_1fp": {"deepnet": 0.848, "resnet": 0.867, "resnet_hl": 0.905}}


@METHODS.register("dou2017")
def run(mode: str, config, workdir: str) -> dict:
    if mode == "train":
        return train(config, workdir)
    if mode == "evaluate":
        return train(config, workdir, evaluate_only=True)
    if mode == "cv":
        return cross_validate(config, workdir)
    if mode == "export":
        return export(config, workdir)
    raise ValueError(f"unknown mode {mode!r} (train | cv | evaluate | export)")


def _progress(config) -> bool:
    return bool(config.dou2017.progress) and jax.process_index() == 0


def _networks(config, ablations: bool) -> list[str]:
    nets = list(config.stage2.networks)
    if ablations:
        nets += [n for n in st.NETWORKS if n not in nets]
    return nets


# ---------------------------------------------------------------------------- one fold


def _train_stage(cfg, run_dir: str, data=None) -> dict:
    """Trains one network unless its summary says it is done; returns the summary."""
    done = os.path.join(run_dir, "train_summary.json")
    rec = st.read_json(done)
    if rec is not None:
        banner(f"{cfg.name}: already trained ({done})")
        return rec
    result = train_lib.train_and_evaluate(cfg, run_dir, data=data)
    if result["preempted"]:
        raise SystemExit(f"{cfg.name}: preempted at step {result['step']}; rerun the same "
                         "command to resume")
    rec = {k: v for k, v in result.items() if k != "state"}
    st.write_json(done, rec)
    return rec


def _stage1(config, fold_dir, store, train_uids, test_uids, osf: bool, *,
            need_train_candidates: bool, redo: bool = False) -> dict:
    """Trains the FCN and screens the scans; returns candidates and figures."""
    from lungjax.detect import store_screening_stats

    cfg = st.stage1_config(config, osf)
    run_dir = os.path.join(fold_dir, STAGE1 if osf else STAGE1_NO_OSF)
    if not redo:
        _train_stage(cfg, run_dir)
    elif not os.path.isdir(os.path.join(run_dir, "checkpoints")):
        raise FileNotFoundError(f"{run_dir}: no stage-1 checkpoints; run --mode=train first")
    out = {"dir": run_dir, "config": cfg}
    n = int(config.dou2017.train_scans_screened or 0)
    if n and n < len(train_uids):  # CPU schedule: hard negatives from a spread subset
        train_uids = [train_uids[i] for i in spread_subset(len(train_uids), n)]
    parts = [("test", test_uids)] + ([("train", train_uids)] if need_train_candidates else [])
    for part, uids in parts:
        path = os.path.join(run_dir, f"candidates_{part}.npz")
        if redo or not os.path.isfile(path):
            banner(f"stage 1 ({'OSF' if osf else 'no OSF'}): screening {len(uids)} "
                   f"{part} scans")
            det = st.screen_scans(cfg, run_dir, store, uids, progress=_progress(config))
            st.save_candidates(path, det.candidates, det.seconds)
        out[part] = st.load_candidates(path)
    marks = st.candidate_marks(out["test"])
    stats = store_screening_stats(marks, store, test_uids)
    stats.pop("missed")
    out["stats"] = stats
    return out


def _stage2_data(cfg2, store, train_uids, test_uids, train_cands) -> Any:
    """The stage-2 ``TrainData``: nodules + stage-1 FPs of the training scans."""
    import dataclasses

    from lungjax.data.pipeline import StoreTrainData

    data = StoreTrainData(cfg2, store, train_uids, test_uids, seed=cfg2.seed,
                          process_index=jax.process_index(),
                          process_count=jax.process_count())
    screened = [u for u in train_uids if u in train_cands]
    uids = [u for u in screened for _ in range(len(train_cands[u]["score"]))]
    vox = (np.concatenate([train_cands[u]["voxel_zyx"] for u in screened])
           if uids else np.zeros((0, 3)))
    score = (np.concatenate([train_cands[u]["score"] for u in screened])
             if uids else np.zeros(0))
    added = data.sampler.add_false_positives(uids, vox, score) if uids else 0
    print(f"stage 2 sampler: {added} stage-1 false positives of {len(screened)} screened "
          f"training scans as hard negatives; pool {data.sampler.counts()}", flush=True)
    if not added:
        # A stage-1 network that leaves no false positive (tiny runs): candidates_V2
        # negatives stand in, so the stage still has negatives to learn from.
        print("stage 2 sampler: no stage-1 false positives; using candidate negatives",
              flush=True)
        data.sampler.cfg = dataclasses.replace(data.sampler.cfg,
                                               negative_mix=(("candidate", 1.0),))
    return data


def _evaluate_network(config, cfg2, run_dir, store, test_uids, stage1_test, stage1_stats,
                      batch: int) -> dict:
    from lungjax.detect import write_submission
    from lungjax.evaluation.froc import N_BOOTSTRAP, compute_froc

    clf = st.CandidateClassifier.from_checkpoint(cfg2, run_dir, batch)
    marks, diam, sec2 = st.classify_scans(
        clf, store, stage1_test, test_uids,
        regressed_position=bool(config.stage2.regressed_position))
    out_dir = os.path.join(run_dir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    sub = os.path.join(out_dir, "submission.csv")
    if jax.process_index() == 0:
        write_submission(sub, marks, diam)
    froc = compute_froc(store.findings(test_uids), store.excluded(test_uids), test_uids, marks,
                        n_bootstrap=N_BOOTSTRAP, seed=int(config.seed))
    per_scan = {u: {"stage1": stage1_test[u]["seconds"], "stage2": sec2[u],
                    "total": stage1_test[u]["seconds"] + sec2[u]} for u in test_uids}
    record = {
        "network": cfg2.model.name, "step": clf.step, "fold": int(config.data.fold),
        "uids": list(test_uids), "cpm": froc.cpm, "cpm_ci95": froc.cpm_ci95,
        "froc_new": froc.froc_new,
        "sensitivities": np.asarray(froc.sensitivities).tolist(),
        "sensitivity_at_1fp": float(froc.sensitivities[ONE_FP]),
        "n_nodules": froc.n_nodules, "n_detected": froc.n_detected, "marks": len(marks),
        "stage1": stage1_stats, "seconds_per_scan": per_scan,
        "mean_seconds_per_scan": float(np.mean([v["total"] for v in per_scan.values()])),
        "submission_csv": sub, "froc": froc.to_json(),
    }
    st.write_json(os.path.join(out_dir, "froc.json"), record)
    if jax.process_index() == 0:
        from lungjax.evaluation.plots import plot_froc

        plot_froc(froc, os.path.join(out_dir, "froc.png"), label=cfg2.model.name,
                  title=f"FROC: dou2017 {cfg2.model.name}, fold {int(config.data.fold)} "
                  f"({len(test_uids)} held-out scans)")
    return record


def run_fold(config, fold_dir: str, *, ablations: bool = False,
             evaluate_only: bool = False) -> dict:
    """The whole method on one fold (``config.data.fold`` held out).

    Args:
      config: the dou2017 run config.
      fold_dir: run directory of the fold (see the module docstring).
      ablations: also the FCN without OSF and every stage-2 network.
      evaluate_only: no training: re-screen and re-score the held-out scans with the
        trained networks.

    Returns:
      The fold record (also written to ``fold_dir/dou2017.json``).
    """
    from lungjax.data.store import PatchStore
    from lungjax.train_data import held_out_uids, prepare_data

    os.makedirs(fold_dir, exist_ok=True)
    t0 = time.perf_counter()
    store = PatchStore.open(prepare_data(config))
    test_uids = held_out_uids(config, store)
    held = set(test_uids)
    train_uids = [u for u in store.uids() if u not in held]
    if not train_uids:
        raise ValueError(f"no training scans: every scan is in fold {config.data.fold}")
    if config.detection.max_scans:
        test_uids = test_uids[:config.detection.max_scans]
    nets = _networks(config, ablations)
    osf = bool(config.train.osf.enabled)  # False in the no-OSF baseline config
    s1 = _stage1(config, fold_dir, store, train_uids, test_uids, osf,
                 need_train_candidates=not evaluate_only, redo=evaluate_only)
    record: dict[str, Any] = {"fold": int(config.data.fold), "uids": list(test_uids),
                              "stage1_main": _osf_key(osf),
                              "stage1": {_osf_key(osf): s1["stats"]}, "stage2": {}}
    if ablations:  # the other stage-1 variant, for the screening table
        s1n = _stage1(config, fold_dir, store, train_uids, test_uids, not osf,
                      need_train_candidates=False, redo=evaluate_only)
        record["stage1"][_osf_key(not osf)] = s1n["stats"]
    for net in nets:
        cfg2 = st.stage2_config(config, net, s1["dir"])
        run_dir = os.path.join(fold_dir, f"stage2_{net}")
        if not evaluate_only:
            done = os.path.join(run_dir, "train_summary.json")
            data = None if os.path.isfile(done) else _stage2_data(
                cfg2, store, train_uids, test_uids, s1["train"])
            _train_stage(cfg2, run_dir, data=data)
        rec_path = os.path.join(run_dir, "eval", "froc.json")
        rec = None if evaluate_only else st.read_json(rec_path)
        if rec is None:
            banner(f"stage 2 ({net}): scoring the candidates of {len(test_uids)} held-out scans")
            rec = _evaluate_network(config, cfg2, run_dir, store, test_uids, s1["test"],
                                    s1["stats"], int(config.stage2.inference_batch))
        if jax.process_index() == 0:  # the learning curves beside the FROC they led to
            from lungjax.evaluation.plots import plot_run_learning_curves

            plot_run_learning_curves(os.path.join(run_dir, "eval"), {
                "learning_curve_stage1.png": s1["dir"], f"learning_curve_{net}.png": run_dir})
        record["stage2"][net] = {k: v for k, v in rec.items() if k != "froc"}
        record["stage2"][net]["froc"] = rec["froc"]
    main = nets[0]
    m = record["stage2"][main]
    record.update(network=main, cpm=m["cpm"], cpm_ci95=m["cpm_ci95"], froc_new=m["froc_new"],
                  sensitivities=m["sensitivities"], submission_csv=m["submission_csv"],
                  mean_seconds_per_scan=m["mean_seconds_per_scan"],
                  wall_seconds=time.perf_counter() - t0)
    st.write_json(os.path.join(fold_dir, FOLD_RECORD), record)
    return record


def _osf_key(osf: bool) -> str:
    return "osf" if osf else "no_osf"


def _print_fold(record: dict, fold_dir: str) -> None:
    lines = [f"dou2017 fold {record['fold']}: {len(record['uids'])} held-out scans"]
    for key, s in record["stage1"].items():
        lines.append(f"  stage 1 (FCN, {'OSF' if key == 'osf' else 'no OSF'}): sensitivity "
                     f"{s['sensitivity']:.3f} ({s['n_detected']}/{s['n_nodules']}), "
                     f"{s['fps_per_scan']:.1f} FPs/scan, {s['candidates_per_scan']:.1f} "
                     "candidates/scan" + (" (used by stage 2)"
                                          if key == record["stage1_main"] else ""))
    for net, m in record["stage2"].items():
        lo, hi = m["cpm_ci95"]
        lines.append(f"  stage 2 {net}: CPM {m['cpm']:.4f} (95% CI {lo:.3f}-{hi:.3f}), "
                     f"{m['n_detected']}/{m['n_nodules']} nodules hit, sensitivity at 1 FP/scan "
                     f"{m['sensitivity_at_1fp']:.3f}, {m['mean_seconds_per_scan']:.1f} s/scan")
    lo, hi = record["cpm_ci95"]
    lines += [f"CPM (FROC[luna]) = {record['cpm']:.4f} (95% CI {lo:.3f}-{hi:.3f}, bootstrap over "
              f"scans; {record['network']})",
              f"submission: {record['submission_csv']}",
              f"FROC curve: {os.path.join(os.path.dirname(record['submission_csv']), 'froc.png')}",
              f"record: {os.path.join(fold_dir, FOLD_RECORD)}"]
    print("\n".join(lines), flush=True)


def train(config, workdir: str, evaluate_only: bool = False) -> dict:
    """``--mode=train`` / ``--mode=evaluate``: the method on fold ``data.fold``."""
    banner(f"dou2017: fold {config.data.fold} in {workdir}")
    record = run_fold(config, workdir, ablations=bool(config.dou2017.ablations),
                      evaluate_only=evaluate_only)
    _print_fold(record, workdir)
    return record


# ---------------------------------------------------------------------------- cv


def cross_validate(config, workdir: str) -> dict:
    """Every fold (resumable), then the reports under ``<workdir>/cv``."""
    from lungjax.methods.dou2017_report import write_cv_report

    folds = list(config.cv.folds) or list(range(config.data.num_folds))
    ablations = bool(config.dou2017.cv_ablations)
    records = []
    for k in folds:
        fold_dir = os.path.join(workdir, f"fold_{k}")
        rec = st.read_json(os.path.join(fold_dir, FOLD_RECORD))
        if rec is not None and (not ablations or len(rec["stage1"]) == 2):
            banner(f"cv: fold {k} already done ({fold_dir})")
        else:
            cfg = config.copy_and_resolve_references()
            with cfg.unlocked():
                cfg.data.fold = int(k)
            rec = run_fold(cfg, fold_dir, ablations=ablations)
            _print_fold(rec, fold_dir)
        records.append(rec)
    report = write_cv_report(config, workdir, records)
    print(f"cross-validation report: {report['files']}", flush=True)
    return report


# ---------------------------------------------------------------------------- export


def export(config, workdir: str) -> dict:
    """Exports the fold's FCN (whole scans) and main stage-2 network (patches)."""
    import jax.numpy as jnp

    from lungjax import export as export_lib
    from lungjax import modes
    from lungjax.checkpointing import restore_params

    banner(f"export: {config.name}")
    out = {}
    osf = bool(config.train.osf.enabled)
    cfg1 = st.stage1_config(config, osf)
    stage1_dir = os.path.join(workdir, STAGE1 if osf else STAGE1_NO_OSF)
    sidecar1 = modes.export(cfg1, stage1_dir)
    dst = os.path.join(workdir, "export", "stage1")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    src = os.path.join(stage1_dir, "export")
    if os.path.isdir(dst):
        import shutil

        shutil.rmtree(dst)
    os.replace(src, dst)
    out["stage1"] = sidecar1

    net = list(config.stage2.networks)[0]
    cfg2 = st.stage2_config(config, net, None)
    run_dir = os.path.join(workdir, f"stage2_{net}")
    model, task = train_lib.build_model(cfg2), train_lib.build_task(cfg2)
    if config.detection.conv_impl:
        # Measured per-shape convolution choices need concrete shapes; the export's batch
        # size is symbolic.
        model = model.clone(conv_impl=config.detection.conv_impl)
    ck = restore_params(os.path.join(run_dir, "checkpoints"))
    variables = {"params": ck["params"], **ck["model_state"]}

    def predict(variables, image):
        dec = task.decode(model.apply(variables, image, train=False))
        cols = [dec["score"]]
        if "diameter_mm" in dec:
            cols.append(dec["diameter_mm"])
        return jnp.stack(cols, axis=-1)

    size = tuple(int(s) for s in cfg2.data.patch_size_zyx)
    meaning = ("column 0: nodule probability of the candidate patch"
               + ("; column 1: regressed diameter (mm)" if model.regression else ""))
    meta = {"model": cfg2.model.to_dict(), "task": cfg2.task.to_dict(),
            "config_name": cfg2.name, "checkpoint_step": int(ck["step"]),
            "output_columns": meaning,
            "preprocessing": {"spacing_zyx": list(cfg2.data.spacing_zyx),
                              "hu_window": list(cfg2.data.hu_window),
                              "patch_size_zyx": list(size),
                              "patch_start": "candidate voxel - patch_size // 2"}}
    meta["preprocessing"].update(modes._store_preprocessing(config))
    out["stage2"] = export_lib.export_predictor(os.path.join(workdir, "export", "stage2"),
                                                predict, variables, size, meta)
    print(f"exported stage 1 and stage 2 ({net}) to {os.path.join(workdir, 'export')}",
          flush=True)
    return out


def fold_marks(record: dict, network: str) -> tuple[Sequence[str], Marks]:
    """(held-out uids, stage-2 marks) of a fold record, for pooled FROCs."""
    from lungjax.data.tables import read_marks_csv

    return record["uids"], read_marks_csv(record["stage2"][network]["submission_csv"])
