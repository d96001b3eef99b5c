"""Evaluation: LUNA16 FROC/CPM (``froc``), segmentation and classification metrics,
cross-validation reports and plots.

Names are imported lazily (on first attribute access), so that
``python -m lungjax.evaluation.froc_cli`` runs its module once and importing the package
stays cheap (``plots`` pulls in matplotlib).
"""

import importlib

_EXPORTS = {
    "FP_RATES": "froc", "FrocBootstrap": "froc", "FrocResult": "froc",
    "compute_froc": "froc",
    "binary_metrics": "classification", "confusion_counts": "classification",
    "roc_auc": "classification", "roc_curve": "classification",
    "dice": "segmentation", "hausdorff_distance": "segmentation",
    "pixel_roc_auc": "segmentation", "segmentation_metrics": "segmentation",
    "cv_report": "reports", "froc_table": "reports", "pooled_froc": "reports",
    "summarize_folds": "reports",
    "plot_froc": "plots", "plot_froc_curves": "plots", "plot_learning_curve": "plots",
    "plot_roc": "plots", "plot_run_learning_curves": "plots",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f"lungjax.evaluation.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'lungjax.evaluation' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
