"""In-training evaluators chosen by name: ``config.evals.<name> = dict(type=..., every_steps=N,
...)``, every other field a constructor argument.

Each evaluator is called as ``evaluator(engine, state, data)``: one pass over
``data.eval_batches()`` through ``engine.eval_step(state, global_batch) -> (state,
metric_sums, host_outputs)``, returning a flat ``{name: float}`` dict, the eval step's
``loss`` first and ``count`` (samples) last. A figure undefined on the held-out set (nan,
or an infinite Hausdorff distance) is left out of the dict, not logged as nan.

* ``"segmentation"``: Dice, IoU, precision, recall, pixel ROC AUC, HD and HD95 in mm,
  as the mean over samples and pooled over all samples (``pooled_<figure>``), from the
  task's ``probability`` / ``mask`` host maps (:class:`lungjax.tasks.segmentation.
  SegmentationTask`).
* ``"classification"``: accuracy, sensitivity, specificity, precision, F1 and ROC AUC
  with seeded bootstrap intervals (``<figure>_lo`` / ``<figure>_hi``); binary from the
  host outputs ``score`` (B,) and ``label`` (B,) 0/1, multi-class (macro averages)
  from ``probabilities`` (B, K) and ``label`` (B,) in [0, K).
* ``"size_rule"``: no network: the annotated diameter alone as a benign / malignant
  classifier, its threshold fitted on the training ROIs, scored on the held-out ones with
  the ``"classification"`` figures: the yardstick a network trained on the same ROIs is
  read against (data of a ``"nodule_roi"`` sampler).
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import numpy as np

from lungjax import sharding as shd
from lungjax.evaluation.classification import (FIGURES, best_accuracy_threshold,
                                               classification_record)
from lungjax.evaluation.segmentation import SegmentationPool
from lungjax.registry import EVALUATORS

__all__ = ["ClassificationEvaluator", "MetricSums", "SegmentationEvaluator", "SizeRuleEvaluator",
           "eval_pass"]


class MetricSums:
    """Weighted sums of the eval step's metrics over batches -> weighted means."""

    def __init__(self):
        self.sums: dict[str, float] = {}

    def add(self, metric_sums) -> None:
        for k, v in shd.fetch_to_host(metric_sums).items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def means(self) -> tuple[dict[str, float], float]:
        """({metric: weighted mean}, total weight); ``{}, 0`` when nothing was seen."""
        if not self.sums:
            return {}, 0.0
        sums = dict(self.sums)
        n = max(sums.pop("weight"), 1e-8)
        return {k: v / n for k, v in sums.items()}, n


def eval_pass(engine, state, data, sums: MetricSums) -> Iterator[dict[str, np.ndarray]]:
    """Runs the eval step over ``data.eval_batches()``; yields each batch's host outputs
    as numpy with the padding rows (weight 0) removed, and adds the metric sums to
    ``sums``."""
    for batch in data.eval_batches():
        _, m, host = engine.eval_step(state, shd.to_global_batch(batch, engine.mesh))
        sums.add(m)
        h = shd.fetch_to_host(host)
        keep = np.asarray(h["weight"]) > 0
        yield {k: np.asarray(v)[keep] for k, v in h.items()}


def _finite(out: dict[str, float], key: str, value) -> None:
    if value is not None and math.isfinite(float(value)):
        out[key] = float(value)


def _assemble(means: dict[str, float], figures: dict[str, float], n: float) -> dict[str, float]:
    # Loss, then the evaluator's figures, then the step's other means: the console line
    # is read left to right.
    out = {"loss": means["loss"]} if "loss" in means else {}
    out.update(figures)
    for k, v in means.items():
        if k not in out:
            out[k] = v
    out["count"] = n
    return out


@EVALUATORS.register("segmentation")
class SegmentationEvaluator:
    """Held-out segmentation figures over one pass of ``data.eval_batches()``.

    Args:
      every_steps: run every this many training steps (0 = only at the end).
      name: the hook's name (``config.evals.<name>``).
      threshold: foreground probability at which a voxel counts as foreground.
      spacing: voxel size in mm per spatial axis of a sample, in array order ((z, y, x)
        or (y, x)); () = the batch's ``spacing`` (B, ndim) when it carries one, else the
        last ``ndim`` entries of ``config.data.spacing_zyx`` (a 2D slice: (y, x)).

    Returns (from ``__call__``): ``loss``; ``dice``, ``iou``, ``precision``, ``recall``,
    ``pixel_auc``, ``hd_mm``, ``hd95_mm`` as means over samples (an HD with exactly one
    empty mask, an AUC of a one-class target left out of the mean); the same figures
    pooled over all samples as ``pooled_<figure>`` (see
    :class:`lungjax.evaluation.segmentation.SegmentationPool`); ``hd_undefined`` (samples
    with exactly one empty mask); the eval step's other means; ``count``.
    """

    def __init__(self, every_steps: int = 0, name: str = "segmentation",
                 threshold: float = 0.5, spacing: Sequence[float] = ()):
        self.every_steps = every_steps
        self.name = name
        self.threshold = float(threshold)
        self.spacing = tuple(float(s) for s in spacing)

    def _spacing(self, engine, ndim: int) -> tuple[float, ...]:
        if self.spacing:
            if len(self.spacing) != ndim:
                raise ValueError(f"config.evals.{self.name}.spacing={self.spacing}: need "
                                 f"{ndim} values for {ndim}D samples")
            return self.spacing
        return tuple(float(s) for s in engine.config.data.spacing_zyx)[-ndim:]

    def __call__(self, engine, state, data) -> dict[str, float]:
        sums = MetricSums()
        pool = SegmentationPool(self.threshold)
        for h in eval_pass(engine, state, data, sums):
            if "probability" not in h or "mask" not in h:
                raise ValueError(f"evaluator {self.name!r} (segmentation) needs the task's "
                                 "'probability' and 'mask' host outputs, e.g. task "
                                 "'segmentation'")
            prob, mask = h["probability"], h["mask"].astype(bool)
            default = self._spacing(engine, prob.ndim - 1) if len(prob) else None
            for i in range(len(prob)):
                sp = h["spacing"][i] if "spacing" in h and not self.spacing else default
                pool.add(prob[i], mask[i], sp)
        means, n = sums.means()
        if not means:
            return {}
        figures: dict[str, float] = {}
        mean, pooled = pool.mean(), pool.pooled()
        keys = ("dice", "iou", "precision", "recall", "pixel_auc", "hd_mm", "hd95_mm")
        for k in keys:
            _finite(figures, k, mean[k])
        for k in keys:
            _finite(figures, f"pooled_{k}", pooled[k])
        figures["hd_undefined"] = float(pooled["n_hd_undefined"])
        return _assemble(means, figures, n)


@EVALUATORS.register("classification")
class ClassificationEvaluator:
    """Held-out classification figures with seeded bootstrap intervals.

    Args:
      every_steps: run every this many training steps (0 = only at the end).
      name: the hook's name (``config.evals.<name>``).
      n_bootstrap: bootstrap resamples of the held-out samples (0 = no intervals).
      seed: bootstrap seed (the same seed and predictions give the same intervals).
      threshold: binary decision threshold on ``score``.
      confidence: interval coverage.

    Returns (from ``__call__``): ``loss``; for each of ``accuracy``, ``sensitivity``,
    ``specificity``, ``precision``, ``f1``, ``roc_auc`` the figure and its interval
    ``<figure>_lo``, ``<figure>_hi`` (macro averages over classes when the task gives
    ``probabilities`` for K > 2 classes); the eval step's other means; ``count``.
    """

    def __init__(self, every_steps: int = 0, name: str = "classification",
                 n_bootstrap: int = 1000, seed: int = 0, threshold: float = 0.5,
                 confidence: float = 0.95):
        self.every_steps = every_steps
        self.name = name
        self.n_bootstrap = int(n_bootstrap)
        self.seed = int(seed)
        self.threshold = float(threshold)
        self.confidence = float(confidence)

    def record(self, labels: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
        """:func:`classification_record` with this evaluator's settings."""
        return classification_record(labels, scores, seed=self.seed,
                                     n_bootstrap=self.n_bootstrap, threshold=self.threshold,
                                     confidence=self.confidence)

    def __call__(self, engine, state, data) -> dict[str, float]:
        sums = MetricSums()
        scores, labels = [], []
        for h in eval_pass(engine, state, data, sums):
            scores.append(h["probabilities"] if "probabilities" in h else h["score"])
            labels.append(h["label"])
        means, n = sums.means()
        if not means:
            return {}
        rec = self.record(np.concatenate(labels), np.concatenate(scores))
        return _assemble(means, _record_figures(rec), n)


def _record_figures(rec: dict) -> dict[str, float]:
    """A ``classification_record``'s figures and their intervals, flat (finite only)."""
    figures: dict[str, float] = {}
    for k in FIGURES:
        _finite(figures, k, rec[k])
        lo, hi = rec["ci"][k]
        _finite(figures, f"{k}_lo", lo)
        _finite(figures, f"{k}_hi", hi)
    return figures


@EVALUATORS.register("size_rule")
class SizeRuleEvaluator:
    """The annotated diameter alone as a classifier: malignant when a nodule's diameter is
    at least ``threshold_mm``, the threshold most accurate on the training ROIs
    (:func:`lungjax.evaluation.classification.best_accuracy_threshold`), scored on the
    held-out ROIs. Size is the first thing malignancy is graded by, so a network that
    learned from the same ROIs is expected to reach it; the network is not used.

    Needs the data of a ``"nodule_roi"`` sampler (:class:`lungjax.data.dense_sampling.
    RoiTrainData`): the training pool and the held-out index, rows with ``diameter_mm``
    and ``label`` (1 malignant, 0 benign).

    Args: as :class:`ClassificationEvaluator` (no ``threshold``: it is fitted).

    Returns (from ``__call__``): ``threshold_mm``; each of ``accuracy``, ``sensitivity``,
    ``specificity``, ``precision``, ``f1``, ``roc_auc`` (the held-out diameter's AUC,
    threshold-free) with ``<figure>_lo`` / ``<figure>_hi``; ``count`` (held-out ROIs).
    """

    def __init__(self, every_steps: int = 0, name: str = "size_rule",
                 n_bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95):
        self.every_steps = every_steps
        self.name = name
        self.n_bootstrap = int(n_bootstrap)
        self.seed = int(seed)
        self.confidence = float(confidence)

    def __call__(self, engine, state, data) -> dict[str, float]:
        del engine, state  # the rule reads the ROIs' annotations only
        pool = getattr(getattr(data, "sampler", None), "pool", None)
        index = getattr(data, "eval_index", None)
        if pool is None or index is None or pool.dtype.names is None or not {
                "diameter_mm", "label"} <= set(pool.dtype.names):
            raise ValueError(f"evaluator {self.name!r} (size_rule) needs nodule ROIs with "
                             "held-out scans: sampler.name 'nodule_roi' and a data.fold")
        held = index.samples[index.samples["weight"] > 0]
        if not len(pool) or not len(held):
            return {}
        t = best_accuracy_threshold(pool["label"], pool["diameter_mm"])
        rec = classification_record(held["label"], held["diameter_mm"], seed=self.seed,
                                    n_bootstrap=self.n_bootstrap, threshold=t,
                                    confidence=self.confidence)
        return {"threshold_mm": t, **_record_figures(rec), "count": float(len(held))}
