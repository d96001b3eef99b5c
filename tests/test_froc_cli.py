"""The FROC command line: outputs, and clear errors for malformed submissions."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from lungjax.data.tables import (Findings, Marks, read_findings_csv, write_findings_csv,
                                 write_marks_csv)
from lungjax.evaluation.froc_cli import main

UIDS = ["1.2.3.1", "1.2.3.2", "1.2.3.3"]


@pytest.fixture()
def tables(tmp_path):
    ann = Findings(["1.2.3.1", "1.2.3.1", "1.2.3.2"], [[0, 0, 0], [50, 0, 0], [0, 0, 0]],
                   [10.0, 6.0, 4.0])
    exc = Findings(["1.2.3.2"], [[20, 0, 0]], [-1.0])
    write_findings_csv(tmp_path / "annotations.csv", ann)
    write_findings_csv(tmp_path / "excluded.csv", exc)
    (tmp_path / "seriesuids.csv").write_text("\n".join(UIDS) + "\n")
    return tmp_path


def _args(d, sub, *extra):
    return ["--annotations", str(d / "annotations.csv"), "--excluded", str(d / "excluded.csv"),
            "--seriesuids", str(d / "seriesuids.csv"), "--submission", str(sub),
            "--out", str(d / "out"), *extra]


def test_cli_writes_all_outputs(tables, capsys):
    marks = Marks(["1.2.3.1", "1.2.3.1", "1.2.3.2", "1.2.3.2", "1.2.3.3"],
                  [[1, 0, 0], [100, 0, 0], [0, 0, 1], [21, 0, 0], [5, 5, 5]],
                  [0.9, 0.8, 0.6, 0.99, 0.4])
    sub = tables / "sub.csv"
    write_marks_csv(sub, marks)
    assert main(_args(tables, sub, "--bootstrap", "20", "--seed", "3")) == 0
    out = tables / "out"
    printed = capsys.readouterr().out
    assert "CPM" in printed and printed.startswith("FROC analysis: sub")
    assert (out / "summary.txt").read_text(encoding="utf-8") in printed
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    # 2 of 3 nodules found; FPs .8 and .4 over 3 scans, the .99 mark is on an excluded
    # finding: curve (0,0) (0,1/3) (1/3,1/3) (1/3,2/3) (2/3,2/3).
    assert summary["n_detected"] == 2 and summary["n_ignored_excluded"] == 1
    assert summary["sensitivities"] == pytest.approx([1 / 3] * 2 + [2 / 3] * 5)
    assert summary["cpm"] == pytest.approx(4 / 7)
    assert summary["bootstrap"]["n_resamples"] == 20 and summary["inputs"]["seed"] == 3
    missed = read_findings_csv(out / "missed_nodules.csv")
    assert missed.xyz.tolist() == [[50, 0, 0]] and missed.diameter_mm.tolist() == [6.0]
    boot = np.loadtxt(out / "bootstrap.csv", delimiter=",", skiprows=1)
    assert boot.shape == (10000, 4) and (boot[:, 2] <= boot[:, 3]).all()
    curve = np.genfromtxt(out / "froc_curve.csv", delimiter=",", skip_header=1)
    np.testing.assert_allclose(curve[:, :2], [[0, 0], [0, 1 / 3], [1 / 3, 1 / 3],
                                              [1 / 3, 2 / 3], [2 / 3, 2 / 3]], atol=1e-9)
    assert (out / "froc.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


def test_cli_without_bootstrap_writes_no_bootstrap_csv(tables):
    sub = tables / "sub.csv"
    write_marks_csv(sub, Marks(["1.2.3.1"], [[0, 0, 0]], [0.5]))
    assert main(_args(tables, sub, "--bootstrap", "0")) == 0
    assert not (tables / "out" / "bootstrap.csv").exists()
    assert json.loads((tables / "out" / "summary.json").read_text(encoding="utf-8"))["bootstrap"] is None


@pytest.mark.parametrize("text, message", [
    ("seriesuid,coordX,coordY,probability\n1.2.3.1,0,0,0.5\n", "missing column"),
    ("seriesuid,coordX,coordY,coordZ,probability\n1.2.3.1,0,0,0,0.5\n1.2.3.1,0,0,0,high\n",
     "row 3: column 'probability' is not a number"),
    ("seriesuid,coordX,coordY,coordZ,probability\n1.2.3.1,0,0,0,0.5\n1.2.3.1,0,nan,0,0.5\n",
     r"non-finite coordinates \(coordX/coordY/coordZ\) in row\(s\) 3"),
    ("seriesuid,coordX,coordY,coordZ,probability\n1.2.3.1,0,0,0,nan\n",
     r"probability is NaN in row\(s\) 2"),
])
def test_cli_malformed_submission(tables, capsys, text, message):
    sub = tables / "bad.csv"
    sub.write_text(text)
    assert main(_args(tables, sub, "--bootstrap", "0")) == 2
    err = capsys.readouterr().err
    assert "bad.csv" in err
    assert re.search(message, err), err
    assert not (tables / "out").exists()


def test_cli_unknown_uids_warn_and_list(tables, capsys):
    sub = tables / "sub.csv"
    write_marks_csv(sub, Marks(["1.2.3.1", "9.9.9", "8.8.8"], [[0, 0, 0]] * 3, [0.5] * 3))
    assert main(_args(tables, sub, "--bootstrap", "0")) == 0
    err = capsys.readouterr().err
    assert "2 UID(s)" in err and "  8.8.8" in err and "  9.9.9" in err
    summary = json.loads((tables / "out" / "summary.json").read_text(encoding="utf-8"))
    assert summary["unknown_uids"] == ["8.8.8", "9.9.9"]


def test_cli_duplicate_series_uid(tables, capsys):
    (tables / "seriesuids.csv").write_text("1.2.3.1\n1.2.3.1\n")
    sub = tables / "sub.csv"
    write_marks_csv(sub, Marks(["1.2.3.1"], [[0, 0, 0]], [0.5]))
    assert main(_args(tables, sub, "--bootstrap", "0")) == 2
    assert "seriesuids.csv: UID(s) listed more than once" in capsys.readouterr().err


def test_module_entry_point(tables):
    sub = tables / "sub.csv"
    write_marks_csv(sub, Marks(["1.2.3.1"], [[0, 0, 0]], [0.5]))
    proc = subprocess.run([sys.executable, "-m", "lungjax.evaluation.froc_cli",
                           *_args(tables, sub, "--bootstrap", "0")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "FROC analysis" in proc.stdout and (tables / "out" / "summary.json").exists()
