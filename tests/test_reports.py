"""Cross-validation reports: fold summaries, pooled FROC, Markdown/JSON/PNG outputs."""

import json

import numpy as np
import pytest

from lungjax.data.tables import Findings, Marks
from lungjax.evaluation.classification import classification_record
from lungjax.evaluation.froc import compute_froc
from lungjax.evaluation.plots import plot_froc_curves, plot_roc
from lungjax.evaluation.reports import (cv_report, flatten_metrics, froc_table,
                                        plot_fold_metrics, pooled_froc, summarize_folds)

NOD = Findings(["a", "b", "c", "d"], [[0, 0, 0]] * 4, [10.0] * 4)
FOLDS = [
    (["a", "b"], Marks(["a", "b", "b"], [[0, 0, 0], [50, 0, 0], [1, 0, 0]], [0.9, 0.8, 0.3])),
    (["c", "d"], Marks(["c", "d"], [[40, 0, 0], [0, 1, 0]], [0.7, 0.2])),
]


def fold_froc(k):
    uids, marks = FOLDS[k]
    return compute_froc(NOD, Findings.empty(), uids, marks)


def test_pooled_froc_is_one_evaluation_over_all_folds():
    pooled = pooled_froc(NOD, Findings.empty(), FOLDS)
    union = compute_froc(NOD, Findings.empty(), ["a", "b", "c", "d"],
                         Marks.concatenate([m for _, m in FOLDS]))
    np.testing.assert_array_equal(pooled.sensitivity, union.sensitivity)
    # Entries .9 T, .8 F, .7 F, .3 T, .2 T over 4 scans and 4 nodules.
    np.testing.assert_allclose(pooled.fps_per_scan, [0, 0, 0.25, 0.5, 0.5, 0.5])
    np.testing.assert_allclose(pooled.sensitivity, [0, 0.25, 0.25, 0.25, 0.5, 0.75])
    with pytest.raises(ValueError, match="scan b is in fold 0 and fold 1"):
        pooled_froc(NOD, Findings.empty(), [FOLDS[0], (["b"], FOLDS[1][1])])


def test_flatten_and_summarize():
    r0 = fold_froc(0)
    flat = flatten_metrics({"froc": r0, "loss": 2, "seg": {"dice": 0.5}, "v": [1, 2],
                            "name": "x", "ok": True, "nested": {"froc": r0}})
    assert flat["cpm"] == r0.cpm and flat["sens@0.125"] == r0.sensitivities[0]
    assert flat["nested.froc.cpm"] == r0.cpm
    assert flat["loss"] == 2.0 and flat["seg.dice"] == 0.5 and flat["v[1]"] == 2.0
    assert "name" not in flat and "ok" not in flat
    s = summarize_folds([{"fold": 3, "dice": 0.9, "auc": 0.8}, {"fold": 4, "dice": 0.7},
                         {"fold": 5, "dice": 0.8, "auc": 0.6}])
    assert s["folds"] == ["3", "4", "5"]
    d = s["metrics"]["dice"]
    assert d["mean"] == pytest.approx(0.8) and d["std"] == pytest.approx(0.1)   # ddof=1
    assert s["metrics"]["auc"]["per_fold"] == [0.8, None, 0.6]
    assert s["metrics"]["auc"]["n"] == 2 and s["metrics"]["auc"]["mean"] == pytest.approx(0.7)
    assert summarize_folds([{"x": 1.0}, {"x": 3.0}], ddof=0)["metrics"]["x"]["std"] == 1.0


def test_froc_table_layout():
    t = froc_table({"A": fold_froc(0), "B": fold_froc(1).to_json()}, mean_std=True)
    lines = t.strip().splitlines()
    assert lines[0] == ("| System | 0.125 | 0.25 | 0.5 | 1 | 2 | 4 | 8 | CPM | FROC[new] |")
    # Fold 0: .9 T, .8 F, .3 T over 2 scans -> 0.5 until 0.5 FPs/scan, then 1.
    assert lines[2].startswith("| A | 0.500 | 0.500 | 1.000 | 1.000 |")
    assert lines[-1].startswith("| mean ± std | ")
    assert len(lines) == 5


def test_cv_report_files(tmp_path):
    folds = [{"fold": k, "froc": fold_froc(k), "loss": 0.1 * (k + 1)} for k in range(2)]
    pooled = pooled_froc(NOD, Findings.empty(), FOLDS, n_bootstrap=20, seed=1)
    rep = cv_report(folds, tmp_path / "cv", "toy 2-fold", pooled=pooled,
                    systems={"toy": pooled, "fold 0 only": folds[0]["froc"]})
    files = rep["files"]
    for k in ("json", "markdown", "froc_png", "systems_png"):
        assert (tmp_path / "cv" / files[k].split("/")[-1]).exists()
    data = json.loads((tmp_path / "cv" / "cv_report.json").read_text(encoding="utf-8"))
    assert data["title"] == "toy 2-fold" and data["folds"] == ["0", "1"]
    assert data["metrics"]["loss"]["mean"] == pytest.approx(0.15)
    assert data["metrics"]["cpm"]["per_fold"] == [folds[0]["froc"].cpm, folds[1]["froc"].cpm]
    assert data["pooled"]["cpm"] == pytest.approx(pooled.cpm)
    md = (tmp_path / "cv" / "cv_report.md").read_text(encoding="utf-8")
    assert md.startswith("# toy 2-fold") and "| **pooled (all folds)** |" in md
    assert "| mean ± std |" in md and "bootstrap interval" in md and "## Systems" in md
    with pytest.raises(ValueError, match="no fold results"):
        cv_report([], tmp_path, "x")


def test_cv_report_without_froc(tmp_path):
    rep = cv_report([{"dice": 0.9, "hd95_mm": float("inf")}, {"dice": 0.8, "hd95_mm": 3.0}],
                    tmp_path, "seg")
    assert set(rep["files"]) == {"json", "markdown", "metrics_png"}
    data = json.loads((tmp_path / "cv_report.json").read_text(encoding="utf-8"))
    assert data["metrics"]["hd95_mm"]["per_fold"] == ["inf", 3.0]


def test_plots_write_png(tmp_path):
    plot_froc_curves({"f0": fold_froc(0), "f1": fold_froc(1)}, tmp_path / "f.png")
    plot_roc({"clf": ([0, 0.5, 1], [0, 0.8, 1], 0.9)}, tmp_path / "r.png")
    for f in ("f.png", "r.png"):
        assert (tmp_path / f).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError):
        plot_froc_curves({}, tmp_path / "e.png")


def test_cv_report_of_evaluator_records(tmp_path):
    # Classification records: any numeric key is summarised, intervals included.
    rng = np.random.default_rng(0)
    folds = []
    for k in range(3):
        y = rng.random(60) < 0.5
        s = np.clip(rng.normal(0.3 + 0.4 * y, 0.2), 0, 1)
        folds.append({"fold": k, **classification_record(y.astype(int), s, seed=k,
                                                           n_bootstrap=30)})
    rep = cv_report(folds, tmp_path, "cls", metrics=["roc_auc", "f1", "ci.roc_auc[0]"])
    assert list(rep["metrics"]) == ["roc_auc", "f1", "ci.roc_auc[0]"]
    auc = [f["roc_auc"] for f in folds]
    assert rep["metrics"]["roc_auc"]["mean"] == pytest.approx(np.mean(auc))
    assert rep["metrics"]["roc_auc"]["std"] == pytest.approx(np.std(auc, ddof=1))
    md = (tmp_path / "cv_report.md").read_text(encoding="utf-8")
    assert "## Summary" in md and "| roc_auc | " in md
    png = tmp_path / "cv_metrics.png"
    assert rep["files"]["metrics_png"] == str(png) and png.read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    with pytest.raises(KeyError, match="not in the fold results"):
        cv_report(folds, tmp_path, "cls", metrics=["nope"])
    full = summarize_folds(folds)["metrics"]
    assert "accuracy" in full and "ci.accuracy[1]" in full and "counts.tp" in full


def test_plot_fold_metrics_with_non_finite_values(tmp_path):
    s = summarize_folds([{"hd_mm": float("inf"), "dice": 0.8},
                         {"hd_mm": float("inf"), "dice": 0.9}])
    plot_fold_metrics(s, tmp_path / "m.png", title="x")
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
