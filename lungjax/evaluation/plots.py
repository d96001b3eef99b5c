"""Figures for evaluation results: FROC curves (one system or several), ROC curves, and
learning curves of a training run (its ``metrics.jsonl`` against the step).

Figures are built on ``matplotlib.figure.Figure`` (no pyplot global state, no display
needed) and saved atomically: written to a temporary file in the target directory,
then renamed.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FixedFormatter, FixedLocator, MaxNLocator

from lungjax import fileio
from lungjax.atomic import atomic_path
from lungjax.evaluation.froc import FP_RATES, FROC_MAX_X, FROC_MIN_X, FrocResult
from lungjax.metrics_log import METRICS_JSONL, metric_series, read_jsonl

__all__ = ["plot_findings", "plot_froc", "plot_froc_curves", "plot_learning_curve", "plot_roc",
           "plot_run_learning_curves", "save_figure"]


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 150) -> None:
    """Saves ``fig`` to ``path`` (format from the extension, PNG without one), atomically."""
    ext = os.path.splitext(os.fspath(path))[1] or ".png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=ext.lstrip("."))


def _froc_axes(fig: Figure, title: str | None):
    ax = fig.subplots()
    # The challenge's layout: log2 FPs/scan axis with the seven operating points.
    ax.set_xscale("log", base=2)
    ax.set_xlim(FROC_MIN_X, FROC_MAX_X)
    ax.set_ylim(0, 1)
    ax.xaxis.set_major_locator(FixedLocator(FP_RATES))
    ax.xaxis.set_major_formatter(FixedFormatter([f"{r:g}" for r in FP_RATES]))
    ax.xaxis.set_minor_locator(FixedLocator([]))
    ax.set_yticks(np.arange(0, 1.01, 0.1))
    ax.set_xlabel("Average number of false positives per scan")
    ax.set_ylabel("Sensitivity")
    ax.grid(True, which="both", alpha=0.4)
    if title:
        ax.set_title(title)
    return ax


def _draw_froc(ax, result: FrocResult, label: str, color, bands: bool) -> None:
    ax.plot(result.fps_interp, result.sens_interp, color=color, lw=2,
            label=f"{label} (CPM {result.cpm:.3f})")
    b = result.bootstrap
    if bands and b is not None:
        ax.plot(b.fps_grid, b.sens_mean, color=color, ls="--", lw=1)
        ax.fill_between(b.fps_grid, b.sens_lower, b.sens_upper, color=color, alpha=0.12,
                        lw=0)


def plot_froc(result: FrocResult, path: str | os.PathLike, *, label: str = "system",
              title: str | None = "FROC") -> None:
    """FROC curve of one system, with the bootstrap mean (dashed) and interval (band)
    when the result carries a bootstrap.

    Args:
      result: from :func:`lungjax.evaluation.froc.compute_froc`.
      path: output image (.png, .pdf, .svg).
      label: legend entry.
      title: figure title.
    """
    fig = Figure(figsize=(6, 5))
    ax = _froc_axes(fig, title)
    _draw_froc(ax, result, label, "tab:blue", bands=True)
    ax.legend(loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)


def plot_froc_curves(results: Mapping[str, FrocResult], path: str | os.PathLike, *,
                     title: str | None = "FROC", bands: bool = True) -> None:
    """FROC curves of several systems on one plot (e.g. a method and its baselines, or
    the folds and their pooled curve).

    Args:
      results: {legend name: FrocResult}, drawn in order.
      path: output image.
      title: figure title.
      bands: draw bootstrap intervals of results that have one.
    """
    if not results:
        raise ValueError("plot_froc_curves: no results to plot")
    fig = Figure(figsize=(6.5, 5))
    ax = _froc_axes(fig, title)
    colors = [f"C{i % 10}" for i in range(len(results))]
    for (name, res), color in zip(results.items(), colors):
        _draw_froc(ax, res, name, color, bands)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)


def plot_roc(curves: Mapping[str, tuple], path: str | os.PathLike, *,
             title: str | None = "ROC") -> None:
    """ROC curves.

    Args:
      curves: {name: (fpr, tpr) or (fpr, tpr, auc)}; fpr/tpr (T,) in [0, 1].
      path: output image.
      title: figure title.
    """
    if not curves:
        raise ValueError("plot_roc: no curves to plot")
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    for i, (name, c) in enumerate(curves.items()):
        label = name if len(c) < 3 else f"{name} (AUC {c[2]:.3f})"
        ax.plot(c[0], c[1], color=f"C{i % 10}", lw=2, label=label)
    ax.plot([0, 1], [0, 1], color="0.6", ls=":", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.grid(True, alpha=0.4)
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)


# Held-out rates of the lower panel: (metric, line style, legend text).
_RATES = (("sensitivity", "-", "sensitivity"), ("specificity", ":", "specificity"),
          ("auc", "--", "ROC AUC"))


def plot_learning_curve(metrics_jsonl_path: str | os.PathLike, out_png: str | os.PathLike,
                        *, title: str | None = "learning curve") -> None:
    """Training and held-out figures of one run against the step.

    Upper panel: the training loss (``split="train"`` records, every ``log_every``
    steps; ``loss_all``, the mean over every sample of the batch, when logged, so that
    it compares with the held-out loss, plus the OSF-selected samples' ``loss`` dotted
    when online sample filtering dropped samples) and the held-out ``loss`` of each
    evaluator (``split="eval_<name>"``). Lower panel: each evaluator's held-out
    ``sensitivity`` (solid), ``specificity`` (dotted) and ``auc`` (dashed) where
    logged. A panel with nothing to draw says so (e.g. no evaluator ran: then
    ``config.evals.<name>.every_steps`` > 0 gives points).

    Args:
      metrics_jsonl_path: a ``MetricWriter`` log (``lungjax.metrics_log``).
      out_png: output image (written atomically).
      title: figure title.
    """
    series = metric_series(read_jsonl(metrics_jsonl_path))
    train = series.get("train", {})
    evals = {split[len("eval_"):]: m for split, m in sorted(series.items())
             if split.startswith("eval_")}
    fig = Figure(figsize=(7, 6.5))
    ax_loss, ax_rate = fig.subplots(2, 1, sharex=True)
    losses = []

    def draw_loss(curve, **kw):
        ax_loss.plot(*curve, **kw)
        losses.append(curve[1])

    key = "loss_all" if "loss_all" in train else "loss"
    if key in train:
        draw_loss(train[key], color="0.3", lw=1.5, label="training loss")
        selected = train.get("selected_fraction", (None, np.ones(1)))[1]
        if key == "loss_all" and "loss" in train and np.nanmin(selected) < 1:
            draw_loss(train["loss"], color="0.3", lw=1, ls=":",
                      label="training loss (OSF-selected samples)")
    rates = 0
    for i, (name, m) in enumerate(evals.items()):
        color = f"C{i % 10}"
        if "loss" in m:
            draw_loss(m["loss"], color=color, lw=1.5, marker="o", ms=4,
                      label=f"held-out loss ({name})")
        for metric, ls, text in _RATES:
            if metric in m:
                ax_rate.plot(*m[metric], color=color, ls=ls, lw=1.5, marker="o", ms=4,
                             label=f"{text} ({name})")
                rates += 1

    values = np.concatenate(losses) if losses else np.zeros(0)
    values = values[np.isfinite(values)]
    # Losses fall by orders of magnitude early on; a log axis keeps the late steps,
    # which decide whether more training would help, readable.
    if values.size and values.min() > 0 and values.max() > 10 * values.min():
        ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss")
    ax_loss.grid(True, alpha=0.4)
    if losses:
        ax_loss.legend(loc="best", fontsize="small")
    else:
        _say(ax_loss, "no loss logged")
    ax_rate.set_ylim(-0.02, 1.02)  # rates of 0 and 1 stay visible off the frame
    ax_rate.set_ylabel("held-out rate")
    ax_rate.set_xlabel("step")
    ax_rate.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_rate.grid(True, alpha=0.4)
    if rates:
        ax_rate.legend(loc="best", fontsize="small")
    else:
        _say(ax_rate, "no held-out sensitivity / AUC logged\n(config.evals.<name>.every_steps "
                      "> 0 evaluates every N steps)")
    if title:
        ax_loss.set_title(title)
    fig.tight_layout()
    save_figure(fig, out_png)


def _say(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center",
            color="0.4", fontsize="small")


def plot_run_learning_curves(out_dir: str | os.PathLike,
                             runs: Mapping[str, str | os.PathLike]) -> list[str]:
    """Learning curves of training runs into one directory (e.g. beside the FROC curve
    the runs produced).

    Args:
      out_dir: output directory.
      runs: {output file name (e.g. "learning_curve_stage1.png"): run directory holding
        a ``metrics.jsonl``}; a run without one (e.g. a checkpoint copied without its
        logs) is skipped.

    Returns:
      Paths written.
    """
    written = []
    for name, run_dir in runs.items():
        log = os.path.join(run_dir, METRICS_JSONL)
        if not fileio.isfile(log):
            continue
        tail = "/".join(fileio.abspath(run_dir).split("/")[-2:])
        path = os.path.join(out_dir, name)
        plot_learning_curve(log, path, title=f"learning curve: {tail}")
        written.append(path)
    return written


def plot_findings(volume_zyx: np.ndarray, geometry, marks, diameter_mm, path: str | os.PathLike,
                  *, top: int = 3, title: str = "", mask_zyx: np.ndarray | None = None,
                  notes: Sequence[str] | None = None) -> None:
    """One PNG of a scan's ``top`` highest-scoring findings, each on its axial slice with
    a circle of its diameter (10 mm where the method gives none), written atomically.

    Args:
      volume_zyx: (D, H, W) float32 image in [0, 1] (the preprocessed scan).
      geometry: its ``Geometry`` (the marks' world mm map into it).
      marks: ``Marks`` of this scan (world x, y, z mm, probability).
      diameter_mm: (K,) diameters of the marks, or None.
      path: the PNG.
      mask_zyx: (D, H, W) the method's predicted mask on the same grid, outlined on
        each slice shown; None: none.
      notes: (K,) more text for each mark's title (e.g. its malignancy probability).
    """
    from matplotlib.patches import Circle

    from lungjax.data.coords import world_to_voxel

    order = np.argsort(-marks.probability, kind="stable")[:top]
    fig = Figure(figsize=(3.2 * max(1, len(order)), 3.6))
    axes = fig.subplots(1, max(1, len(order)), squeeze=False)[0]
    if not len(order):
        z = volume_zyx.shape[0] // 2
        axes[0].imshow(volume_zyx[z], cmap="gray", vmin=0, vmax=1)
        axes[0].set_title(f"{title}\nno finding (slice {z})", fontsize=8)
        axes[0].axis("off")
    spacing = np.asarray(geometry.spacing_zyx, np.float64)
    for ax, i in zip(axes, order):
        zyx = world_to_voxel(marks.xyz[i], geometry)
        z = int(np.clip(np.rint(zyx[0]), 0, volume_zyx.shape[0] - 1))
        d = 10.0 if diameter_mm is None else float(diameter_mm[i])
        ax.imshow(volume_zyx[z], cmap="gray", vmin=0, vmax=1)
        if mask_zyx is not None and np.any(mask_zyx[z]):
            ax.contour(np.asarray(mask_zyx[z], np.float32), levels=[0.5], colors="yellow",
                       linewidths=0.8)
        ax.add_patch(Circle((zyx[2], zyx[1]), radius=max(d / 2 / spacing[2], 2.0),
                            fill=False, color="red", lw=1.2))
        x, y, zw = marks.xyz[i]
        note = f", {notes[i]}" if notes is not None else ""
        ax.set_title(f"p={marks.probability[i]:.3f}, d={d:.1f} mm{note}\n"
                     f"world ({x:.1f}, {y:.1f}, {zw:.1f}) mm, slice {z}", fontsize=7)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=8)
    save_figure(fig, path, dpi=100)
