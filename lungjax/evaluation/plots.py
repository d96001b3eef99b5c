"""Figures for evaluation results: FROC curves (one system or several), ROC curves.

Figures are built on ``matplotlib.figure.Figure`` (no pyplot global state, no display
needed) and saved atomically: written to a temporary file in the target directory,
then renamed.
"""

from __future__ import annotations

import os
import tempfile
from typing import Mapping

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FixedFormatter, FixedLocator

from lungjax.evaluation.froc import FP_RATES, FROC_MAX_X, FROC_MIN_X, FrocResult

__all__ = ["plot_froc", "plot_froc_curves", "plot_roc", "save_figure"]


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 150) -> None:
    """Saves ``fig`` to ``path`` (format from the extension) via temp file + rename."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    ext = os.path.splitext(path)[1] or ".png"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=ext)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, format=ext.lstrip("."))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
