"""Hand-computed LUNA16 FROC cases: one test per rule and edge case of the challenge's
evaluation script (see lungjax/evaluation/froc.py)."""

import numpy as np
import pytest

from lungjax.data.tables import Findings, Marks
from lungjax.evaluation.froc import (FP_RATES, cap_marks, compute_froc, froc_points,
                                     read_sensitivity)


def F(rows):
    """Findings from [(uid, x, y, z, diameter)]."""
    if not rows:
        return Findings.empty()
    u, x, y, z, d = zip(*rows)
    return Findings(np.array(u), np.stack([x, y, z], 1), np.array(d, float))


def M(rows):
    """Marks from [(uid, x, y, z, probability)]."""
    if not rows:
        return Marks(np.zeros(0, str), np.zeros((0, 3)), np.zeros(0))
    u, x, y, z, p = zip(*rows)
    return Marks(np.array(u), np.stack([x, y, z], 1), np.array(p, float))


# Scan A: nodules A1 (r^2 = 25) and A2 (r^2 = 9); scan B: nodule B1 (r^2 = 4);
# scan C: nothing at all.
NODULES = F([("A", 0, 0, 0, 10), ("A", 50, 0, 0, 6), ("B", 0, 0, 0, 4)])
MARKS = M([
    ("A", 1, 0, 0, 0.9),     # hits A1
    ("A", 0, 2, 0, 0.5),     # second hit on A1: ignored, not an FP
    ("A", 100, 0, 0, 0.8),   # FP
    ("A", 50, 3, 0, 0.7),    # distance^2 == r^2 of A2: not a hit (strict) -> FP
    ("B", 0, 0, 1, 0.6),     # hits B1
    ("B", 30, 30, 30, 0.4),  # FP
])


def test_hand_computed_curve_and_cpm():
    r = compute_froc(NODULES, Findings.empty(), ["A", "B", "C"], MARKS)
    # Entries by probability: .9 TP, .8 FP, .7 FP, .6 TP, .4 FP; 3 scans, 3 nodules.
    np.testing.assert_allclose(r.fps_per_scan, [0, 0, 1 / 3, 2 / 3, 2 / 3, 1])
    np.testing.assert_allclose(r.sensitivity, [0, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3])
    np.testing.assert_array_equal(r.thresholds, [np.inf, 0.9, 0.8, 0.7, 0.6, 0.4])
    np.testing.assert_allclose(r.sensitivities, [1 / 3] * 3 + [2 / 3] * 4)
    assert r.cpm == pytest.approx(11 / 21)
    assert r.froc_new == pytest.approx(2 / 3)
    assert (r.n_scans, r.n_nodules, r.n_detected) == (3, 3, 2)
    assert (r.n_false_positives, r.n_double_hits, r.n_ignored_excluded) == (3, 1, 0)
    assert r.n_marks == 6 and r.n_marks_capped == 0
    # The missed nodule stays in the denominator and is listed.
    assert r.missed.uid.tolist() == ["A"] and r.missed.xyz.tolist() == [[50, 0, 0]]
    np.testing.assert_array_equal(r.nodule_probability, [0.9, np.nan, 0.6])
    for how in ("interpolate", "nearest", "first_at_or_above"):
        assert r.readings[how]["cpm"] == pytest.approx(11 / 21)
    assert r.fps_interp[0] == 0.125 and r.fps_interp[-1] == 8 and r.fps_interp.size == 10001


def test_readings_differ_as_documented():
    fps = np.array([0, 0.5, 0.5, 1.5])
    sens = np.array([0, 0.2, 0.6, 0.8])
    np.testing.assert_allclose(read_sensitivity(fps, sens, [0.25, 1, 4], "interpolate"),
                               [0.1, 0.7, 0.8])
    # Equidistant points: the lower FPs/scan wins, then its highest sensitivity.
    np.testing.assert_allclose(read_sensitivity(fps, sens, [0.25, 1, 4], "nearest"),
                               [0.0, 0.6, 0.8])
    # First point at or above: start of the vertical run; past the end: last point.
    np.testing.assert_allclose(read_sensitivity(fps, sens, [0.25, 1, 4], "first_at_or_above"),
                               [0.2, 0.8, 0.8])
    with pytest.raises(ValueError, match="reading"):
        read_sensitivity(fps, sens, [1], "median")


def test_no_false_positives_at_all():
    # Every mark hits a nodule: FPs/scan is 0 everywhere and the whole curve reads the
    # final sensitivity (the script's "no false positives" branch).
    marks = M([("A", 0, 0, 0, 0.3), ("B", 0, 0, 0, 0.9)])
    r = compute_froc(NODULES, Findings.empty(), ["A", "B"], marks)
    assert r.n_false_positives == 0
    np.testing.assert_array_equal(r.fps_per_scan, 0.0)
    np.testing.assert_allclose(r.sensitivities, 2 / 3)
    assert r.cpm == pytest.approx(2 / 3)


def test_no_marks_at_all():
    with pytest.warns(UserWarning, match="no marks"):
        r = compute_froc(NODULES, Findings.empty(), ["A", "B"], M([]), n_bootstrap=10)
    assert r.cpm == 0.0 and r.n_detected == 0 and len(r.missed) == 3
    np.testing.assert_array_equal(r.fps_per_scan, [0.0])
    assert r.bootstrap.cpm_upper == 0.0 and r.bootstrap.n_valid == 10


def test_scans_without_marks_count_in_fps_per_scan():
    r3 = compute_froc(NODULES, Findings.empty(), ["A", "B", "C"], MARKS)
    r6 = compute_froc(NODULES, Findings.empty(), ["A", "B", "C", "D", "E", "G"], MARKS)
    np.testing.assert_allclose(r6.fps_per_scan, r3.fps_per_scan / 2)
    np.testing.assert_allclose(r6.sensitivity, r3.sensitivity)
    assert r6.n_scans == 6


def test_scans_without_nodules_give_false_positives():
    extra = M([("C", 0, 0, 0, 0.95), ("C", 5, 5, 5, 0.1)])
    r = compute_froc(NODULES, Findings.empty(), ["A", "B", "C"],
                     Marks.concatenate([MARKS, extra]))
    assert r.n_false_positives == 5 and r.n_nodules == 3
    # The 0.95 FP now comes first: the first positive is reached at 1/3 FPs/scan.
    assert r.fps_per_scan[1] == pytest.approx(1 / 3) and r.sensitivity[1] == 0
    assert r.fps_per_scan[-1] == pytest.approx(5 / 3)


def test_mark_inside_two_nodules_detects_both():
    nod = F([("A", 0, 0, 0, 10), ("A", 6, 0, 0, 10)])
    r = compute_froc(nod, Findings.empty(), ["A"], M([("A", 3, 0, 0, 0.7)]))
    assert r.n_detected == 2 and r.n_false_positives == 0
    np.testing.assert_array_equal(r.nodule_probability, [0.7, 0.7])
    assert r.cpm == 1.0


def test_best_probability_per_nodule():
    nod = F([("A", 0, 0, 0, 10)])
    marks = M([("A", 1, 0, 0, 0.2), ("A", 0, 1, 0, 0.8), ("A", 0, 0, 1, 0.5),
               ("A", 90, 0, 0, 0.6)])
    r = compute_froc(nod, Findings.empty(), ["A", "B"], marks)
    assert r.nodule_probability.tolist() == [0.8] and r.n_double_hits == 2
    # One positive at 0.8 before the only FP (0.6): sensitivity 1 at 0 FPs/scan.
    np.testing.assert_allclose(r.fps_per_scan, [0, 0, 0.5])
    np.testing.assert_allclose(r.sensitivity, [0, 1, 1])


def test_marks_on_excluded_findings_are_ignored():
    nod = F([("A", 0, 0, 0, 4)])                        # r = 2
    exc = F([("A", 5, 0, 0, -1),                        # unknown size -> 10 mm, r = 5
             ("A", 40, 0, 0, 2)])                       # r = 1
    marks = M([
        ("A", 1, 0, 0, 0.5),     # inside the nodule AND the excluded finding: a hit
        ("A", 6, 0, 0, 0.9),     # excluded finding only: ignored
        ("A", 40, 0, 0.5, 0.8),  # inside the small excluded finding: ignored
        ("A", 40, 0, 1.5, 0.7),  # outside it (1.5 > r = 1): FP
        ("A", 20, 0, 0, 0.6),    # FP
    ])
    r = compute_froc(nod, exc, ["A"], marks)
    assert r.n_detected == 1 and r.nodule_probability.tolist() == [0.5]
    assert r.n_ignored_excluded == 2 and r.n_false_positives == 2
    np.testing.assert_allclose(r.fps_per_scan, [0, 1, 2, 2])
    np.testing.assert_allclose(r.sensitivity, [0, 0, 0, 1])


def test_unknown_diameter_on_reference_nodule_is_10mm():
    nod = F([("A", 0, 0, 0, -1)])
    r = compute_froc(nod, Findings.empty(), ["A"], M([("A", 4.9, 0, 0, 0.5)]))
    assert r.n_detected == 1


def test_cap_keeps_marks_strictly_above_the_101st():
    # 98 distinct high probabilities + 5 tied at 0.1: the 101st-highest is 0.1, so
    # all five tied marks go and only 98 remain.
    p = np.r_[np.linspace(0.99, 0.5, 98), [0.1] * 5]
    scan = np.zeros(p.size, int)
    keep = cap_marks(scan, p, 100)
    assert keep.sum() == 98 and not keep[98:].any()
    # 101 distinct: the lowest goes. Exactly 100: nothing goes. Other scans untouched.
    p2 = np.linspace(1, 0, 101)
    assert cap_marks(np.zeros(101, int), p2, 100).tolist() == [True] * 100 + [False]
    assert cap_marks(np.zeros(100, int), p2[:100], 100).all()
    both = cap_marks(np.r_[np.ones(101, int), np.zeros(3, int)], np.r_[p2, 0, 0, 0], 100)
    assert both.sum() == 103 and not both[100]
    assert cap_marks(np.zeros(101, int), p2, 0).all()


def test_cap_at_ties_through_compute_froc():
    nod = F([("A", 0, 0, 0, 10)])
    rows = [("A", 100 + i, 0, 0, 0.99 - 0.001 * i) for i in range(98)]
    rows += [("A", 0, 0, 0, 0.1)] + [("A", 300 + i, 0, 0, 0.1) for i in range(4)]
    r = compute_froc(nod, Findings.empty(), ["A"], M(rows))
    assert r.n_marks == 98 and r.n_marks_capped == 5
    assert r.n_detected == 0 and r.cpm == 0.0       # the hit was cut at the tie
    r_all = compute_froc(nod, Findings.empty(), ["A"], M(rows), max_marks_per_scan=0)
    assert r_all.n_marks == 103 and r_all.n_detected == 1


def test_findings_and_marks_outside_the_scan_list():
    nod = F([("A", 0, 0, 0, 10), ("Z", 0, 0, 0, 10)])
    marks = M([("A", 0, 0, 0, 0.9), ("Z", 0, 0, 0, 0.9), ("Q", 1, 1, 1, 0.5)])
    with pytest.warns(UserWarning, match="2 UID"):
        r = compute_froc(nod, Findings.empty(), ["A"], marks)
    assert r.n_nodules == 1 and r.cpm == 1.0 and r.n_marks == 1
    assert r.unknown_uids == ("Q", "Z")


def test_bad_input_errors():
    good = M([("A", 0, 0, 0, 0.5)])
    bad_xyz = M([("A", 0, 0, 0, 0.5), ("A", np.nan, 0, 0, 0.5)])
    with pytest.raises(ValueError, match="non-finite coordinates.*index 1"):
        compute_froc(NODULES, Findings.empty(), ["A"], bad_xyz)
    with pytest.raises(ValueError, match="probability is NaN"):
        compute_froc(NODULES, Findings.empty(), ["A"], M([("A", 0, 0, 0, np.nan)]))
    with pytest.raises(ValueError, match="listed twice"):
        compute_froc(NODULES, Findings.empty(), ["A", "A"], good)
    with pytest.raises(ValueError, match="no reference nodule"), pytest.warns(UserWarning):
        compute_froc(NODULES, Findings.empty(), ["C"], good)
    with pytest.raises(ValueError, match="annotations: non-finite diameter"):
        compute_froc(F([("A", 0, 0, 0, np.nan)]), Findings.empty(), ["A"], good)


def test_froc_points_arithmetic():
    fps, sens = froc_points(np.array([1, 1, 2]), np.array([0, 3, 3]), 4, 2)
    np.testing.assert_allclose(fps, [0, 0, 1.5, 1.5])
    np.testing.assert_allclose(sens, [0, 0.25, 0.25, 0.5])


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(3)
    uids = [f"s{i}" for i in range(30)]
    nod = F([(u, 0.0, 0.0, 0.0, 8.0) for u in uids[:20]])
    rows = [(u, 1.0, 0.0, 0.0, float(rng.uniform(0.2, 1))) for u in uids[:17]]
    rows += [(uids[i], 50.0, 0.0, 0.0, float(rng.uniform(0, 0.9)))
             for i in rng.integers(0, 30, 60)]
    marks = M(rows)
    a = compute_froc(nod, Findings.empty(), uids, marks, n_bootstrap=200, seed=7)
    b = compute_froc(nod, Findings.empty(), uids, marks, n_bootstrap=200, seed=7)
    c = compute_froc(nod, Findings.empty(), uids, marks, n_bootstrap=200, seed=8)
    assert a.bootstrap.cpm_lower == b.bootstrap.cpm_lower
    np.testing.assert_array_equal(a.bootstrap.sens_mean, b.bootstrap.sens_mean)
    assert not np.array_equal(a.bootstrap.sens_mean, c.bootstrap.sens_mean)
    bs = a.bootstrap
    assert bs.n_valid == 200 and bs.fps_grid.size == 10000
    assert bs.cpm_lower <= a.cpm <= bs.cpm_upper
    assert (bs.sens_lower <= bs.sens_upper).all()
    assert (bs.sensitivities_lower <= a.sensitivities + 1e-12).all()
    assert (a.sensitivities <= bs.sensitivities_upper + 1e-12).all()
    assert a.to_json()["bootstrap"]["cpm"]["lower"] == bs.cpm_lower
    assert len(FP_RATES) == len(a.to_json()["sensitivities"]) == 7


def test_cpm_interval_needs_a_bootstrap():
    from lungjax.evaluation.froc import compute_froc
    from lungjax.data.tables import Findings, Marks

    ann = Findings(["a", "b"], [[0, 0, 0], [0, 0, 0]], [10.0, 10.0])
    marks = Marks(["a", "b"], [[0, 0, 0], [50, 0, 0]], [0.9, 0.8])
    plain = compute_froc(ann, Findings.empty(), ["a", "b"], marks)
    with pytest.raises(ValueError, match="n_bootstrap"):
        plain.cpm_ci95
    boot = compute_froc(ann, Findings.empty(), ["a", "b"], marks, n_bootstrap=50, seed=0)
    lo, hi = boot.cpm_ci95
    assert 0.0 <= lo <= hi <= 1.0
    assert [lo, hi] == [boot.bootstrap.cpm_lower, boot.bootstrap.cpm_upper]


def test_suspicious_submissions_warn_and_count_as_the_official_script():
    dup = M([*[(u, x, y, z, p) for u, x, y, z, p in zip(
        MARKS.uid, *MARKS.xyz.T, MARKS.probability)], ("A", 100, 0, 0, 0.8)])
    with pytest.warns(UserWarning, match="1 duplicate mark"):
        r = compute_froc(NODULES, Findings.empty(), ["A", "B", "C"], dup)
    base = compute_froc(NODULES, Findings.empty(), ["A", "B", "C"], MARKS)
    assert r.n_false_positives == base.n_false_positives + 1  # the duplicate FP counts
    scaled = M([(u, x, y, z, 10 * p - 3) for u, x, y, z, p in zip(
        MARKS.uid, *MARKS.xyz.T, MARKS.probability)])
    with pytest.warns(UserWarning, match=r"5 mark probability\(ies\) outside \[0, 1\]"):
        r = compute_froc(NODULES, Findings.empty(), ["A", "B", "C"], scaled)
    assert r.cpm == base.cpm  # order alone matters
    with pytest.warns(UserWarning, match="no marks"):
        compute_froc(NODULES, Findings.empty(), ["A", "B"], M([]))
