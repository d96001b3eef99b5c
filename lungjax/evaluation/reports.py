"""Cross-validation reports: per-fold figures, mean +- std, pooled FROC, in the style
of the LUNA16 papers' tables, written as JSON + Markdown + plots (per-fold values of
every metric with mean +- std bars; FROC curves).

LUNA16 papers report the FROC of all folds pooled: every fold's test scans scored by
the model that did not see them, merged into one submission and evaluated once over
all 888 scans (:func:`pooled_froc`). Per-fold CPMs and their mean +- std are reported
next to it; the two are not the same number.

A fold result is a plain dict, e.g. ``{"fold": 0, "cpm": 0.83, "loss": 0.12,
"froc": FrocResult, "dice": 0.97}``: numbers, nested dicts of numbers (flattened to
``"a.b"``), lists of numbers (``"a[0]"``...) and :class:`FrocResult` values (expanded to
``cpm``, ``froc_new`` and ``sens@<rate>``) are summarised; other values are ignored.
Whatever an evaluator measured is reported this way, e.g. the records of
:func:`lungjax.evaluation.segmentation.segmentation_record` (``pooled.dice``, ...) and
:func:`lungjax.evaluation.classification.classification_record` (``roc_auc``,
``ci.roc_auc[0]``, ...).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from lungjax import fileio
from lungjax.atomic import atomic_write_text
from lungjax.data.tables import Findings, Marks
from lungjax.evaluation.froc import FP_RATES, FrocResult, compute_froc

__all__ = ["cv_report", "flatten_metrics", "froc_table", "plot_fold_metrics", "pooled_froc",
           "summarize_folds"]


def pooled_froc(annotations: Findings, excluded: Findings,
                folds: Sequence[tuple[Sequence[str], Marks]], **kwargs) -> FrocResult:
    """FROC over all folds pooled into one evaluation.

    Args:
      annotations, excluded: the LUNA16 reference tables.
      folds: per fold, (test scan UIDs, marks of the model evaluated on that fold).
      **kwargs: passed to :func:`compute_froc` (n_bootstrap, seed, ...).

    Raises:
      ValueError: a scan appears in two folds.
    """
    uids: list[str] = []
    seen: dict[str, int] = {}
    for k, (fold_uids, _) in enumerate(folds):
        for u in fold_uids:
            if u in seen:
                raise ValueError(f"pooled_froc: scan {u} is in fold {seen[u]} and fold {k}")
            seen[u] = k
            uids.append(str(u))
    marks = Marks.concatenate([m for _, m in folds])
    return compute_froc(annotations, excluded, uids, marks, **kwargs)


def _froc_values(r: FrocResult | Mapping, reading: str) -> tuple[list[float], float, float]:
    if isinstance(r, FrocResult):
        d = r.readings[reading]
    else:  # a FrocResult.to_json() dict
        d = r["readings"][reading] if "readings" in r else r
    return list(d["sensitivities"]), float(d["cpm"]), float(d["froc_new"])


def _fmt(x: float, digits: int) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def froc_table(results: Mapping[str, FrocResult | Mapping], *, reading: str = "interpolate",
               digits: int = 3, mean_std: bool = False, ddof: int = 1) -> str:
    """Markdown table, one row per system: sensitivity at the seven FPs/scan, CPM and
    FROC[new] (the layout of the LUNA16 papers' tables).

    Args:
      results: {row name: FrocResult or its to_json() dict}.
      reading: "interpolate" | "nearest" | "first_at_or_above".
      digits: decimals.
      mean_std: append a "mean +- std" row over the rows given (e.g. folds).
      ddof: delta degrees of freedom of the std (1 = sample std).
    """
    head = ["System"] + [f"{r:g}" for r in FP_RATES] + ["CPM", "FROC[new]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = []
    for name, r in results.items():
        sens, cpm, new = _froc_values(r, reading)
        rows.append(sens + [cpm, new])
        lines.append("| " + " | ".join([name] + [_fmt(v, digits) for v in rows[-1]]) + " |")
    if mean_std and rows:
        a = np.asarray(rows, np.float64)
        sd = a.std(axis=0, ddof=ddof) if len(rows) > ddof else np.full(a.shape[1], np.nan)
        cells = [f"{_fmt(m, digits)} ± {_fmt(s, digits)}" for m, s in zip(a.mean(0), sd)]
        lines.append("| mean ± std | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def flatten_metrics(d: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numbers of a (nested) fold-result dict as {"name": float} (see module docstring)."""
    out: dict[str, float] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, FrocResult):
            # A top-level "froc" gives plain cpm / froc_new / sens@<rate> columns.
            base = "" if (not prefix and k == "froc") else f"{name}."
            out[f"{base}cpm"] = v.cpm
            out[f"{base}froc_new"] = v.froc_new
            for r, s in zip(FP_RATES, v.sensitivities):
                out[f"{base}sens@{r:g}"] = float(s)
        elif isinstance(v, (bool, np.bool_)):
            continue
        elif isinstance(v, (int, float, np.integer, np.floating)):
            out[name] = float(v)
        elif isinstance(v, np.ndarray) and v.ndim == 0 and np.issubdtype(v.dtype, np.number):
            out[name] = float(v)
        elif isinstance(v, Mapping):
            out.update(flatten_metrics(v, f"{name}."))
        elif isinstance(v, (list, tuple, np.ndarray)) and len(v) and all(
                isinstance(x, (int, float, np.integer, np.floating)) for x in v):
            out.update({f"{name}[{i}]": float(x) for i, x in enumerate(v)})
    return out


def n_folds(n: int) -> str:
    """"1 fold" / "n folds", for report headings."""
    return f"{n} fold" if n == 1 else f"{n} folds"


def summarize_folds(fold_results: Sequence[Mapping[str, Any]], *, ddof: int = 1,
                    metrics: Sequence[str] | None = None) -> dict:
    """Per-fold values and mean +- std of every metric.

    Args:
      fold_results: one dict per fold; ``"fold"`` labels the fold (default: position).
      ddof: delta degrees of freedom of the std (1 = sample std, as most papers).
      metrics: flattened names to keep, in this order (None = every metric, in order of
        first appearance); a name no fold has is an error.

    Returns:
      {"folds": [labels], "metrics": {name: {"per_fold": [float|None], "mean", "std",
      "n"}}}; a metric missing from a fold is None there and left out of its mean.
    """
    labels = [str(fr.get("fold", i)) for i, fr in enumerate(fold_results)]
    flat = [flatten_metrics({k: v for k, v in fr.items() if k != "fold"})
            for fr in fold_results]
    names: list[str] = []
    for f in flat:
        names += [n for n in f if n not in names]
    if metrics is not None:
        unknown = [n for n in metrics if n not in names]
        if unknown:
            raise KeyError(f"metrics {unknown} not in the fold results; found {names}")
        names = list(metrics)
    metrics = {}
    for n in names:
        vals = [f.get(n) for f in flat]
        present = np.asarray([v for v in vals if v is not None], np.float64)
        with np.errstate(invalid="ignore"):  # an inf (e.g. HD of an empty mask) -> std nan
            std = float(present.std(ddof=ddof)) if present.size > ddof else float("nan")
            mean = float(present.mean())
        metrics[n] = {"per_fold": vals, "mean": mean, "std": std,
                      "n": int(present.size)}
    return {"folds": labels, "metrics": metrics, "ddof": ddof}


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def plot_fold_metrics(summary: Mapping[str, Any], path: str | os.PathLike, *,
                      title: str | None = None, ncols: int = 4) -> None:
    """One panel per metric: each fold's value (labelled points) and the mean with a
    +- std bar; written atomically (temporary file, then rename).

    Args:
      summary: :func:`summarize_folds` output.
      path: output image (.png, .pdf, .svg).
      title: figure title.
      ncols: panels per row.

    Non-finite fold values (an infinite HD) are left out of the panel; a metric with no
    finite value gets an empty panel saying so.
    """
    from matplotlib.figure import Figure

    from lungjax.evaluation.plots import save_figure

    names = list(summary["metrics"])
    if not names:
        raise ValueError("plot_fold_metrics: no metrics")
    labels = list(summary["folds"])
    ncols = max(1, min(ncols, len(names)))
    nrows = -(-len(names) // ncols)
    fig = Figure(figsize=(3.2 * ncols, 2.8 * nrows + (0.4 if title else 0)),
                 layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).reshape(-1)
    x = np.arange(len(labels), dtype=np.float64)
    for ax, name in zip(axes, names):
        m = summary["metrics"][name]
        vals = np.asarray([np.nan if v is None else v for v in m["per_fold"]], np.float64)
        ok = np.isfinite(vals)
        ax.set_title(name, fontsize=9)
        ax.set_xticks(x, labels, fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(True, axis="y", alpha=0.4)
        if not ok.any():
            ax.text(0.5, 0.5, "no finite value", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8)
            continue
        ax.plot(x[ok], vals[ok], "o", color="C0", ms=5, label="fold")
        mean, std = m["mean"], m["std"]
        if math.isfinite(mean):
            xm = len(labels) - 0.5 + 0.25
            ax.axhline(mean, color="C1", lw=1, ls="--")
            ax.errorbar([xm], [mean], yerr=[std if math.isfinite(std) else 0.0],
                        fmt="s", color="C1", capsize=4, label="mean ± std")
            ax.set_xticks([*x, xm], [*labels, "mean ± sd"], fontsize=7)
            ax.set_xlim(-0.5, xm + 0.5)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    save_figure(fig, path)


def cv_report(fold_results: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike,
              title: str, *, pooled: FrocResult | None = None,
              systems: Mapping[str, FrocResult] | None = None, ddof: int = 1,
              digits: int = 4, metrics: Sequence[str] | None = None,
              missing_folds: Sequence[int] = ()) -> dict:
    """Writes a cross-validation report into ``out_dir``.

    Files (each written atomically):
      cv_report.json   the summary returned here
      cv_report.md     per-fold table + mean ± std, a summary table (one row per
                       metric); the FROC table (folds, mean ± std, pooled) when folds
                       carry a ``"froc"`` FrocResult or ``pooled`` is given; a systems
                       table when ``systems`` is given
      cv_metrics.png   per-fold values and mean ± std of every metric (when there are
                       numeric metrics)
      froc_cv.png      per-fold and pooled FROC curves (when there are FROC results)
      froc_systems.png FROC curves of ``systems`` (e.g. method vs baselines)

    Args:
      fold_results: one dict per fold (see module docstring), e.g. the engine's
        per-fold evaluation metrics.
      out_dir: output directory (created).
      title: report title.
      pooled: FROC of all folds pooled (:func:`pooled_froc`).
      systems: {name: FrocResult} to compare (each typically pooled over folds).
      ddof: std degrees of freedom (1 = sample std).
      digits: decimals in the Markdown tables.
      metrics: flattened metric names to report, in order (None = all; see
        :func:`summarize_folds`).
      missing_folds: folds of the cross-validation that have not finished (named under
        the title).

    Returns:
      dict with "title", "folds", "metrics" (see :func:`summarize_folds`), "pooled"
      (FrocResult.to_json() or None), "systems", "missing_folds" and "files" {kind: path}.
    """
    if not fold_results:
        raise ValueError("cv_report: no fold results")
    out_dir = os.fspath(out_dir)
    fileio.makedirs(out_dir)
    summary = summarize_folds(fold_results, ddof=ddof, metrics=metrics)
    names = list(summary["metrics"])
    md = [f"# {title}", "", f"{n_folds(len(fold_results))}; mean ± std over folds "
          f"(std with ddof={ddof}).", ""]
    if missing_folds:
        md += [f"Not finished (not in this report): fold(s) "
               f"{', '.join(str(int(k)) for k in missing_folds)}.", ""]
    md += ["## Per fold", ""]
    if names:
        md.append("| Fold | " + " | ".join(names) + " |")
        md.append("|" + "---|" * (len(names) + 1))
        for i, label in enumerate(summary["folds"]):
            vals = [summary["metrics"][n]["per_fold"][i] for n in names]
            md.append(f"| {label} | " + " | ".join(_fmt(v, digits) for v in vals) + " |")
        md.append("| mean ± std | " + " | ".join(
            f"{_fmt(summary['metrics'][n]['mean'], digits)} ± "
            f"{_fmt(summary['metrics'][n]['std'], digits)}" for n in names) + " |")
        md += ["", "## Summary", "", "| Metric | mean ± std | folds |", "|---|---|---|"]
        for n in names:
            m = summary["metrics"][n]
            md.append(f"| {n} | {_fmt(m['mean'], digits)} ± {_fmt(m['std'], digits)} "
                      f"| {m['n']} |")
    else:
        md.append("(no numeric metrics)")
    fold_froc = {f"fold {summary['folds'][i]}": fr["froc"] for i, fr in enumerate(fold_results)
                 if isinstance(fr.get("froc"), FrocResult)}
    files = {"json": os.path.join(out_dir, "cv_report.json"),
             "markdown": os.path.join(out_dir, "cv_report.md")}
    if names:
        files["metrics_png"] = os.path.join(out_dir, "cv_metrics.png")
        plot_fold_metrics(summary, files["metrics_png"], title=title)
    if fold_froc or pooled is not None:
        from lungjax.evaluation.plots import plot_froc_curves

        md += ["", "## FROC (sensitivity at FPs/scan, interpolated; CPM = FROC[luna])", ""]
        table = froc_table(fold_froc, digits=min(digits, 3), mean_std=bool(fold_froc),
                           ddof=ddof) if fold_froc else froc_table({}, digits=3)
        if pooled is not None:
            sens, cpm, new = _froc_values(pooled, "interpolate")
            table += "| **pooled (all folds)** | " + " | ".join(
                _fmt(v, min(digits, 3)) for v in sens + [cpm, new]) + " |\n"
            b = pooled.bootstrap
            if b is not None:
                table += (f"\nPooled CPM {pooled.cpm:.4f}, {round(100 * b.confidence)}% "
                          f"bootstrap interval [{b.cpm_lower:.4f}, {b.cpm_upper:.4f}] "
                          f"({b.n_resamples} resamples over scans, seed {b.seed}).\n")
            table += (f"\nPooled: {pooled.n_scans} scans, {pooled.n_nodules} nodules, "
                      f"{pooled.n_detected} detected.\n")
        md.append(table.rstrip("\n"))
        curves = dict(fold_froc)
        if pooled is not None:
            curves["pooled"] = pooled
        files["froc_png"] = os.path.join(out_dir, "froc_cv.png")
        plot_froc_curves(curves, files["froc_png"], title=f"FROC: {title}",
                         bands=pooled is not None and len(curves) == 1)
    if systems:
        from lungjax.evaluation.plots import plot_froc_curves

        md += ["", "## Systems", "", froc_table(systems, digits=min(digits, 3)).rstrip("\n")]
        files["systems_png"] = os.path.join(out_dir, "froc_systems.png")
        plot_froc_curves(systems, files["systems_png"], title=f"FROC: {title}")
    report = {
        "title": title,
        "missing_folds": [int(k) for k in missing_folds],
        **summary,
        "pooled": None if pooled is None else pooled.to_json(),
        "systems": {k: v.to_json() for k, v in (systems or {}).items()},
        "files": files,
    }
    atomic_write_text(files["markdown"], "\n".join(md) + "\n")
    atomic_write_text(files["json"], json.dumps(_json_safe(report), indent=2) + "\n")
    return report
