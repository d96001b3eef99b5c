"""Shrey et al. 2020: the suspicious-slice screening stage and the paper's tables.

* Stage kind ``"shrey2020_slice_screen"`` (``config.stages.<s>.network`` = the U-Net's
  "train" stage): the trained U-Net segments every axial slice of the held-out scans; a
  slice is suspicious when its largest predicted nodule probability exceeds
  ``config.screening.threshold`` (0.35 in the paper). A slice is truly positive when the
  store's nodule mask has a voxel on it. Writes ``<stage>/screening.json`` (slice-level
  sensitivity, specificity, precision at the rule's threshold, the threshold sweep, the
  slice ROC AUC, the per-scan and pooled Dice of the predicted volume mask) and
  ``<stage>/threshold_sweep.png``, both atomically.
* CV report ``"shrey2020_tables"`` (``config.cv.report``): the paper's Tables 1 and 2
  (precision, recall, F1, accuracy, ROC AUC) beside ours for the proposed classifier and
  every baseline classifier run as a ``cv.variants`` entry, plus the screening and
  segmentation figures, as ``<workdir>/cv/shrey2020_tables.{md,json,png}``.
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lungjax.atomic import atomic_write_json, atomic_write_text
from lungjax.evaluation.reports import n_folds
from lungjax.registry import CV_REPORTS, STAGES

# The classifier stage's name in configs/shrey2020.py, its evaluator's name, and the
# screening stage's name: the tables read their records.
CLASSIFY_STAGE = "classify"
CLASSIFY_EVAL = "eval/cls"
SCREEN_STAGE = "screen"
UNET_STAGE = "unet"

# Thresholds of the sweep plot and record.
SWEEP = tuple(np.round(np.arange(0.05, 1.0, 0.05), 2).tolist())

# The paper's figures, percent: precision, recall, F1, accuracy (Tables 1 and 2), AUC
# where reported. Keys are cv.variants names ("proposed" = the method itself).
PAPER = {
    "proposed": dict(precision=98.0, recall=98.0, f1=98.0, accuracy=97.96, roc_auc=95.67),
    "fc_net": dict(precision=92.0, recall=91.0, f1=91.0, accuracy=90.62),
    "encoder_decoder_fc": dict(precision=26.0, recall=51.0, f1=34.0, accuracy=51.02),
    "resnet50": dict(precision=71.25, recall=71.93, f1=71.57, accuracy=77.14),
    "vgg16": dict(precision=75.94, recall=75.86, f1=75.33, accuracy=75.93),
    "densenet121": dict(precision=76.89, recall=76.47, f1=75.80, accuracy=76.50),
}
LABELS = {"proposed": "proposed (3 conv + FC)", "fc_net": "fully connected",
          "encoder_decoder_fc": "encoder-decoder + FC", "resnet50": "ResNet50",
          "vgg16": "VGG16", "densenet121": "DenseNet121"}
# Our figure for each table column: the classification evaluator's names.
COLUMNS = (("precision", "precision"), ("recall", "sensitivity"), ("f1", "f1"),
           ("accuracy", "accuracy"), ("roc_auc", "roc_auc"))


# ----------------------------------------------------------------------------------
# Slice screening
# ----------------------------------------------------------------------------------


def slice_rule(max_prob: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """Slice-level figures of the rule "suspicious when max probability > threshold".

    Args:
      max_prob: (S,) float, each slice's largest predicted nodule probability.
      labels: (S,) 0/1 or bool, 1 = the slice has nodule voxels.
      threshold: the rule's threshold (strictly greater counts as suspicious).

    Returns:
      ``threshold``, ``tp``, ``fp``, ``tn``, ``fn`` and ``sensitivity``, ``specificity``,
      ``precision``, ``suspicious_fraction`` (nan where a denominator is 0).
    """
    p = np.asarray(max_prob, np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    s = p > threshold
    tp, fp = int(np.sum(s & y)), int(np.sum(s & ~y))
    tn, fn = int(np.sum(~s & ~y)), int(np.sum(~s & y))
    ratio = lambda a, b: float(a) / b if b else float("nan")  # noqa: E731
    return {"threshold": float(threshold), "tp": tp, "fp": fp, "tn": tn, "fn": fn,
            "sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp),
            "precision": ratio(tp, tp + fp), "suspicious_fraction": ratio(tp + fp, len(p))}


def _pad_to(x: np.ndarray, multiple: int) -> np.ndarray:
    """(S, H, W) -> (S, H', W') zero-padded at the end to multiples of ``multiple``."""
    h, w = x.shape[1:]
    ph, pw = -h % multiple, -w % multiple
    return np.pad(x, ((0, 0), (0, ph), (0, pw))) if ph or pw else x


def segment_slices(predict, volume: np.ndarray, batch: int, multiple: int) -> np.ndarray:
    """Nodule probability of every axial slice of a scan.

    Args:
      predict: jitted ``(B, H', W', 1) float32 -> (B, H', W') float32`` probabilities.
      volume: (D, H, W) float32 image in [0, 1].
      batch: slices per call (the last call is padded to it: one compiled shape).
      multiple: the network's size multiple (H', W' = H, W rounded up to it).

    Returns:
      (D, H, W) float32 nodule probability.
    """
    d, h, w = volume.shape
    x = _pad_to(volume.astype(np.float32), multiple)
    out = np.zeros((d, h, w), np.float32)
    for i in range(0, d, batch):
        chunk = x[i:i + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - n,) + chunk.shape[1:],
                                                    np.float32)])
        prob = np.asarray(predict(jnp.asarray(chunk[..., None])))
        out[i:i + n] = prob[:n, :h, :w]
    return out


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    inter, total = np.sum(pred & truth), np.sum(pred) + np.sum(truth)
    return 1.0 if total == 0 else float(2 * inter / total)


def plot_sweep(sweep: Sequence[Mapping[str, float]], rule: float, path: str, title: str) -> None:
    """Sensitivity and specificity of the suspicious-slice rule against its threshold,
    the rule's threshold marked; saved atomically to ``path``."""
    from matplotlib.figure import Figure

    from lungjax.evaluation.plots import save_figure

    t = [r["threshold"] for r in sweep]
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(t, [r["sensitivity"] for r in sweep], "o-", label="sensitivity")
    ax.plot(t, [r["specificity"] for r in sweep], "s-", label="specificity")
    ax.plot(t, [r["precision"] for r in sweep], "^-", label="precision", alpha=0.6)
    ax.axvline(rule, color="k", ls="--", lw=1, label=f"rule: max p > {rule:g}")
    ax.set_xlabel("threshold on a slice's max nodule probability")
    ax.set_ylabel("slice-level figure")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


@STAGES.register("shrey2020_slice_screen")
def slice_screen_stage(run) -> dict:
    """Screens every axial slice of the held-out scans with the U-Net of stage
    ``network``; the record holds the rule's slice-level figures, the sweep and Dice."""
    from lungjax import stages, train
    from lungjax.evaluation.classification import roc_auc

    cfg, ctx = run.config, run.ctx
    model, task = stages.scan_model(cfg), train.build_task(cfg)
    variables, step = stages.restore_variables(run.dirs[run.spec["network"]])
    predict = jax.jit(lambda x: task.probabilities(model.apply(variables, x, train=False)))
    multiple = 2 ** (len(cfg.model.features) - 1)
    rule = float(cfg.screening.threshold)
    scores, labels, per_scan, seconds = [], [], {}, {}
    inter = total = 0
    for uid in ctx.test_uids:
        t0 = time.perf_counter()
        prob = segment_slices(predict, ctx.store.read_volume(uid), int(run.spec["batch"]),
                              multiple)
        truth = ctx.store.read_volume(uid, array="nodules") > 0
        pred = prob >= float(cfg.task.threshold)
        scores.append(prob.reshape(len(prob), -1).max(axis=1))
        labels.append(truth.reshape(len(truth), -1).any(axis=1))
        inter += int(np.sum(pred & truth))
        total += int(np.sum(pred) + np.sum(truth))
        per_scan[uid] = {"dice": _dice(pred, truth), "slices": int(len(prob)),
                         "nodule_slices": int(labels[-1].sum()),
                         "suspicious_slices": int(np.sum(scores[-1] > rule))}
        seconds[uid] = time.perf_counter() - t0
    s = np.concatenate(scores) if scores else np.zeros(0)
    y = np.concatenate(labels) if labels else np.zeros(0, bool)
    at_rule = slice_rule(s, y, rule)
    sweep = [slice_rule(s, y, t) for t in SWEEP]
    auc = roc_auc(y, s) if 0 < y.sum() < len(y) else float("nan")
    record: dict[str, Any] = {
        "network": cfg.model.name, "step": int(step), "fold": int(ctx.config.data.fold),
        "uids": list(ctx.test_uids), "slices": int(len(s)), "nodule_slices": int(y.sum()),
        "rule": at_rule, "slice_roc_auc": auc, "sweep": sweep,
        "dice_pooled": 1.0 if total == 0 else 2.0 * inter / total,
        "dice_mean": float(np.mean([v["dice"] for v in per_scan.values()]))
        if per_scan else float("nan"),
        "dice_threshold": float(cfg.task.threshold), "per_scan": per_scan,
        "mean_seconds_per_scan": float(np.mean(list(seconds.values()))) if seconds else 0.0,
    }
    if jax.process_index() == 0:
        atomic_write_json(os.path.join(run.dir, "screening.json"), record)
        plot_sweep(sweep, rule, os.path.join(run.dir, "threshold_sweep.png"),
                   f"{ctx.config.name}: suspicious-slice rule, fold {record['fold']} "
                   f"({len(s)} slices, {int(y.sum())} with nodule)")
    record["summary_line"] = (
        f"slices suspicious at max p > {rule:g}: sensitivity {at_rule['sensitivity']:.3f}, "
        f"specificity {at_rule['specificity']:.3f} ({len(s)} slices, {int(y.sum())} with "
        f"nodule); slice AUC {auc:.3f}; volume Dice {record['dice_pooled']:.3f}")
    return record


# ----------------------------------------------------------------------------------
# The paper's tables
# ----------------------------------------------------------------------------------


def _classifier_rows(records: Sequence[dict]) -> dict[str, dict]:
    """Classifier -> {figure: mean over folds, figure_lo / _hi: mean of the folds'
    bootstrap bounds, "folds": n}, from each fold's classify stage (and its variants')."""
    per: dict[str, list[dict]] = {}
    for r in records:
        found = {"proposed": r["stages"].get(CLASSIFY_STAGE)}
        for vname, v in r["variants"].items():
            found[vname] = v["stages"].get(CLASSIFY_STAGE)
        for name, rec in found.items():
            if rec and CLASSIFY_EVAL in rec:
                per.setdefault(name, []).append(rec[CLASSIFY_EVAL])
    rows = {}
    for name, evals in per.items():
        row: dict[str, Any] = {"folds": len(evals)}
        for _, ours in COLUMNS:
            for suffix in ("", "_lo", "_hi"):
                vals = [e[ours + suffix] for e in evals if ours + suffix in e]
                row[ours + suffix] = float(np.mean(vals)) if vals else float("nan")
        rows[name] = row
    return rows


def _pct(x: float) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{100 * x:.2f}"


def _screen_rows(records: Sequence[dict]) -> dict[str, float]:
    """Screening and segmentation figures, mean over folds."""
    keys = {"sensitivity": ("rule", "sensitivity"), "specificity": ("rule", "specificity"),
            "precision": ("rule", "precision"), "slice_roc_auc": ("slice_roc_auc",),
            "volume_dice": ("dice_pooled",)}
    out = {}
    for k, path in keys.items():
        vals = []
        for r in records:
            v = r["stages"].get(SCREEN_STAGE)
            for p in path:
                v = v.get(p) if isinstance(v, Mapping) else None
            if v is not None and np.isfinite(v):
                vals.append(float(v))
        out[k] = float(np.mean(vals)) if vals else float("nan")
    dice = [r["stages"][UNET_STAGE].get("eval/seg", {}).get("dice") for r in records
            if UNET_STAGE in r["stages"]]
    dice = [d for d in dice if d is not None]
    out["slice_dice"] = float(np.mean(dice)) if dice else float("nan")
    return out


def plot_tables(rows: Mapping[str, dict], path: str, title: str) -> None:
    """Grouped bars: the paper's and our F1 and accuracy for each classifier; saved
    atomically to ``path``."""
    from matplotlib.figure import Figure

    from lungjax.evaluation.plots import save_figure

    names = [n for n in PAPER if n in rows] + [n for n in rows if n not in PAPER]
    fig = Figure(figsize=(max(6, 1.4 * len(names)), 4))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(names))
    bars = (("paper F1", lambda n: PAPER.get(n, {}).get("f1", np.nan)),
            ("ours F1", lambda n: 100 * rows[n]["f1"]),
            ("paper accuracy", lambda n: PAPER.get(n, {}).get("accuracy", np.nan)),
            ("ours accuracy", lambda n: 100 * rows[n]["accuracy"]))
    for i, (label, get) in enumerate(bars):
        vals = np.array([get(n) for n in names], np.float64)
        ax.bar(x + (i - 1.5) * 0.2, np.nan_to_num(vals), 0.2, label=label,
               hatch="//" if label.startswith("paper") else None, alpha=0.85)
    ax.set_xticks(x)
    ax.set_xticklabels([LABELS.get(n, n) for n in names], rotation=20, ha="right",
                       fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


@CV_REPORTS.register("shrey2020_tables")
def write_tables(config, workdir: str, records: Sequence[dict], report: dict) -> dict:
    """``<workdir>/cv/shrey2020_tables.{md,json,png}``: the paper's Tables 1-2 beside our
    proposed and baseline classifiers, then the screening rule and segmentation figures;
    returns the report plus "tables" (the Markdown) and "classifiers" (the rows)."""
    out_dir = os.path.join(workdir, "cv")
    os.makedirs(out_dir, exist_ok=True)
    rows = _classifier_rows(records)
    screen = _screen_rows(records)
    folds = [int(r["fold"]) for r in records]
    rule = float(config.screening.threshold)
    md = [f"# {config.name}: the paper's tables", "",
          f"{len(records)} held-out folds {folds}; ours = mean over folds, in brackets the "
          "mean of the folds' bootstrap 95% intervals (over held-out nodules). Benign = "
          "median malignancy 1-2, malignant = 4-5 (3 excluded). Paper: LIDC-IDRI, one "
          "60/15/25 split.", "",
          "## Benign / malignant classifiers (percent)", "",
          "| classifier | source | precision | recall | F1 | accuracy | ROC AUC |",
          "|---|---|---|---|---|---|---|"]
    for name in list(PAPER) + [n for n in rows if n not in PAPER]:
        label = LABELS.get(name, name)
        if name in PAPER:
            p = PAPER[name]
            md.append(f"| {label} | paper | " + " | ".join(
                f"{p[k]:.2f}" if k in p else "–" for k, _ in COLUMNS) + " |")
        if name in rows:
            r = rows[name]
            md.append(f"| {label} | ours ({n_folds(r['folds'])}) | " + " | ".join(
                f"{_pct(r[o])} [{_pct(r[o + '_lo'])}-{_pct(r[o + '_hi'])}]"
                for _, o in COLUMNS) + " |")
    md += ["", f"## Screening (U-Net, slice is suspicious when max p > {rule:g})", "",
           "| figure | ours (mean over folds) |", "|---|---|"]
    for k, v in screen.items():
        md.append(f"| {k.replace('_', ' ')} | {v:.4f} |" if np.isfinite(v) else
                  f"| {k.replace('_', ' ')} | – |")
    md.append("")
    md.append("Slice Dice: the U-Net stage's held-out training-style slices (5 before to 5 "
              "after each nodule); volume Dice: every slice of the held-out scans pooled.")
    files = {"tables_md": os.path.join(out_dir, "shrey2020_tables.md"),
             "tables_json": os.path.join(out_dir, "shrey2020_tables.json"),
             "tables_png": os.path.join(out_dir, "shrey2020_tables.png")}
    text = "\n".join(md) + "\n"
    if jax.process_index() == 0:
        atomic_write_text(files["tables_md"], text)
        atomic_write_json(files["tables_json"], {"folds": folds, "paper": PAPER,
                                                 "classifiers": rows, "screening": screen})
        plot_tables(rows, files["tables_png"], f"{config.name}: F1 and accuracy, paper vs "
                                               f"ours ({n_folds(len(records))})")
    print(text, flush=True)
    report = dict(report)
    report["files"] = {**report.get("files", {}), **files}
    report["tables"] = text
    report["classifiers"] = rows
    report["screening"] = screen
    return report

