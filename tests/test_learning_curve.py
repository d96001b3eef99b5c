"""Learning curves: the patch evaluator's thresholded figures, metric series from
``metrics.jsonl``, the learning-curve figure, and a tiny run that writes it."""

import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lungjax import sharding as shd
from lungjax import train
from lungjax.evaluation.plots import plot_learning_curve, plot_run_learning_curves
from lungjax.metrics_log import metric_series, read_jsonl
from lungjax.train_data import ArrayTrainData

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_engine import shared_engine, tiny_config, toy_patches  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _EchoEngine:
    """An engine whose eval step returns the batch's own "loss" and "score" columns."""

    mesh = shd.make_mesh(jax.devices()[:1])

    @staticmethod
    def eval_step(state, batch):
        w = batch["weight"]
        metrics = {"loss": jnp.sum(w * batch["loss"]), "weight": jnp.sum(w)}
        return state, metrics, {"score": batch["score"], "label": batch["label"], "weight": w}


class _Batches:
    def __init__(self, labels, scores, losses, batch_size):
        n = len(labels)
        pad = (-n) % batch_size
        # Padding rows look like confident misses; weight 0 must keep them out.
        self.cols = {"label": np.r_[labels, np.ones(pad)].astype(np.int32),
                     "score": np.r_[scores, np.zeros(pad)].astype(np.float32),
                     "loss": np.r_[losses, np.full(pad, 100.0)].astype(np.float32),
                     "weight": np.r_[np.ones(n), np.zeros(pad)].astype(np.float32)}
        self.b = batch_size

    def eval_batches(self):
        total = len(self.cols["label"])
        for i in range(0, total, self.b):
            yield {k: v[i:i + self.b] for k, v in self.cols.items()}


def test_patch_evaluator_sensitivity_specificity_auc():
    labels = [1, 1, 1, 0, 0, 0, 0, 0]
    scores = [0.9, 0.5, 0.2, 0.7, 0.1, 0.3, 0.4, 0.6]
    losses = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    ev = train.EVALUATORS.get("patch_classification")(every_steps=4)
    out = ev(_EchoEngine, None, _Batches(labels, scores, losses, batch_size=5))
    # score >= 0.5 is positive: TP 2 (0.9, 0.5), FN 1; FP 2 (0.7, 0.6), TN 3.
    assert out["sensitivity"] == pytest.approx(2 / 3)
    assert out["specificity"] == pytest.approx(3 / 5)
    # Pairs (positive above negative): 5 + 3 + 1 of 3 * 5.
    assert out["auc"] == pytest.approx(9 / 15)
    assert out["loss"] == pytest.approx(4.5)
    assert out["count"] == 8
    assert list(out)[:4] == ["loss", "sensitivity", "specificity", "auc"]


def test_patch_evaluator_leaves_out_undefined_figures():
    ev = train.EVALUATORS.get("patch_classification")()
    out = ev(_EchoEngine, None, _Batches([0, 0, 0], [0.2, 0.6, 0.1], [1.0, 1.0, 1.0], 4))
    assert out["specificity"] == pytest.approx(2 / 3)
    assert "sensitivity" not in out and "auc" not in out  # no positive patch


def _write_jsonl(path, rows, torn_tail=False):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        if torn_tail:
            f.write('{"step": 9, "split": "tra')


def test_metric_series_last_record_of_a_step_wins_and_sorts():
    rows = [{"step": 4, "split": "train", "time": 1.0, "loss": 2.0},
            {"step": 8, "split": "train", "time": 2.0, "loss": 1.5},
            {"step": 4, "split": "eval_patches", "loss": 2.5, "sensitivity": 0.25},
            # resumed from step 4: step 8 logged again
            {"step": 8, "split": "train", "time": 3.0, "loss": 1.0},
            {"step": 8, "split": "eval_patches", "loss": "nan"},
            {"step": 6, "split": "train", "time": 4.0, "loss": 1.25, "note": "x"}]
    s = metric_series(rows)
    steps, loss = s["train"]["loss"]
    assert steps.tolist() == [4, 6, 8] and loss.tolist() == [2.0, 1.25, 1.0]
    assert "note" not in s["train"] and "time" not in s["train"]
    assert s["eval_patches"]["sensitivity"][0].tolist() == [4]  # missing at step 8
    assert np.isnan(s["eval_patches"]["loss"][1][1])


def test_plot_learning_curve_writes_png_with_and_without_eval_entries(tmp_path):
    train_rows = [{"step": s, "split": "train", "loss": 1 / s, "loss_all": 1.2 / s,
                   "selected_fraction": 0.75} for s in (10, 20, 30, 40)]
    evals = [{"step": 20, "split": "eval_patches", "loss": 0.09, "sensitivity": 0.5,
              "specificity": 0.9, "auc": 0.8},
             {"step": 40, "split": "eval_patches", "loss": 0.05, "specificity": 0.95}]
    full = tmp_path / "full.jsonl"
    _write_jsonl(full, train_rows + evals, torn_tail=True)
    plot_learning_curve(full, tmp_path / "out" / "full.png", title="t")
    no_eval = tmp_path / "no_eval.jsonl"
    _write_jsonl(no_eval, train_rows)
    plot_learning_curve(no_eval, tmp_path / "out" / "no_eval.png")
    empty = tmp_path / "empty.jsonl"
    _write_jsonl(empty, [])
    plot_learning_curve(empty, tmp_path / "out" / "empty.png")
    out = sorted(os.listdir(tmp_path / "out"))
    assert out == ["empty.png", "full.png", "no_eval.png"]  # no temporary file left
    for name in out:
        assert (tmp_path / "out" / name).read_bytes()[:8] == PNG_MAGIC


def test_plot_run_learning_curves_skips_runs_without_a_log(tmp_path):
    run = tmp_path / "fold_0" / "stage1"
    run.mkdir(parents=True)
    _write_jsonl(run / "metrics.jsonl", [{"step": 1, "split": "train", "loss": 0.5}])
    written = plot_run_learning_curves(tmp_path / "eval", {
        "learning_curve_stage1.png": run, "learning_curve_fpr.png": tmp_path / "missing"})
    assert written == [str(tmp_path / "eval" / "learning_curve_stage1.png")]
    assert sorted(os.listdir(tmp_path / "eval")) == ["learning_curve_stage1.png"]


def test_tiny_run_logs_eval_every_steps_and_writes_learning_curve(tmp_path):
    c = tiny_config(num_steps=12, checkpoint_every=12, log_every=4)
    c.sampler.steps_per_round = 12
    c.evals.patches.every_steps = 4
    images, labels = toy_patches(96)
    data = ArrayTrainData(images[:64], labels[:64], batch_size=16, seed=0,
                          val_images=images[64:], val_labels=labels[64:])
    engine = shared_engine(c)
    result = train.train_and_evaluate(c, str(tmp_path), data=data, engine=engine)
    assert result["step"] == 12
    evals = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "eval_patches"]
    assert [r["step"] for r in evals] == [4, 8, 12]
    assert all(0 <= r["sensitivity"] <= 1 and 0 <= r["specificity"] <= 1 for r in evals)
    png = tmp_path / "learning_curve.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    # A rerun of the finished run evaluates step 12 again and redraws the curve, which
    # keeps one point per step.
    os.remove(png)
    train.train_and_evaluate(c, str(tmp_path), data=data, engine=engine)
    assert png.read_bytes()[:8] == PNG_MAGIC
    s = metric_series(read_jsonl(tmp_path / "metrics.jsonl"))
    assert s["eval_patches"]["sensitivity"][0].tolist() == [4, 8, 12]
