"""lungjax's vectorised FROC against a literal, loop-by-loop port of the LUNA16
evaluation script's logic (its Python 2 dict handling rewritten, arithmetic kept), on
random submissions and on the real LUNA16 tables."""

import math

import numpy as np
import pytest

import sklearn.metrics as skm  # the independent reference (test extras)

from lungjax.data.tables import Findings, Marks
from lungjax.evaluation.classification import drop_collinear, threshold_counts
from lungjax.evaluation.froc import FP_RATES, compute_froc

# --------------------------------------------------------------- the script, in loops


def script_entries(annotations, excluded, seriesuids, marks, max_marks=100):
    """FROC lists as evaluateCAD builds them: (gt, prob, scan uid, exclude flag)."""
    gt, prob, scan, excl = [], [], [], []
    n_ignored = n_double = 0
    for uid in seriesuids:
        cands = {}
        for i in np.flatnonzero(marks.uid == uid):
            cands[len(cands)] = (marks.xyz[i], float(marks.probability[i]))
        if max_marks > 0 and len(cands) > max_marks:
            probs = sorted((c[1] for c in cands.values()), reverse=True)
            cut = probs[max_marks]
            cands = {k: c for k, c in cands.items() if c[1] > cut}
        remaining = dict(cands)
        findings = [(annotations.xyz[i], annotations.diameter_mm[i], True)
                    for i in np.flatnonzero(annotations.uid == uid)]
        findings += [(excluded.xyz[i], excluded.diameter_mm[i], False)
                     for i in np.flatnonzero(excluded.uid == uid)]
        for (x, y, z), diameter, included in findings:
            if diameter < 0.0:
                diameter = 10.0
            radius_sq = math.pow(diameter / 2.0, 2.0)
            matches = []
            for key, ((x2, y2, z2), p) in cands.items():
                d = math.pow(x - x2, 2.) + math.pow(y - y2, 2.) + math.pow(z - z2, 2.)
                if d < radius_sq:
                    if included:
                        matches.append(p)
                        remaining.pop(key, None)
                    elif key in remaining:
                        n_ignored += 1
                        del remaining[key]
            if len(matches) > 1:
                n_double += len(matches) - 1
            if included:
                gt.append(1.0)
                prob.append(max(matches) if matches else -1e9)
                scan.append(uid)
                excl.append(not matches)
        for (_, p) in remaining.values():
            gt.append(0.0)
            prob.append(p)
            scan.append(uid)
            excl.append(False)
    return (np.array(gt), np.array(prob), np.array(scan), np.array(excl, bool),
            n_ignored, n_double)


def brute_force_roc(gt, prob):
    """(fp, tp) counts at every distinct threshold, highest first, by direct counting."""
    thr = np.unique(prob)[::-1]
    tp = np.array([np.sum((prob >= t) & (gt == 1)) for t in thr])
    fp = np.array([np.sum((prob >= t) & (gt == 0)) for t in thr])
    return tp, fp, thr


def script_froc(gt, prob, n_images, excl, roc=brute_force_roc):
    """computeFROC: missed nodules left out of the ROC but kept in the denominator."""
    g, p = gt[~excl], prob[~excl]
    n_detected = g.sum()
    n_total = gt.sum()
    n_cands = len(p)
    tp, fp, _ = roc(g, p)
    tp = np.r_[0, tp].astype(float)
    fp = np.r_[0, fp].astype(float)
    fpr = fp / fp[-1] if fp[-1] > 0 else np.full(fp.shape, np.nan)
    tpr = tp / tp[-1] if tp[-1] > 0 else np.full(tp.shape, np.nan)
    if gt.sum() == len(gt):
        fps = np.zeros(len(fpr))
    else:
        fps = fpr * (n_cands - n_detected) / n_images
    return fps, tpr * n_detected / n_total


def random_case(seed, n_scans=12, n_marks=400):
    rng = np.random.default_rng(seed)
    uids = [f"1.2.{seed}.{i}" for i in range(n_scans)]
    n_nod = 15
    a_uid = rng.choice(uids[: n_scans - 2], n_nod)      # the last two scans have none
    a_xyz = rng.uniform(-40, 40, (n_nod, 3)).round(1)
    ann = Findings(a_uid, a_xyz, rng.uniform(3, 25, n_nod).round(1))
    e_uid = rng.choice(uids, 20)
    exc = Findings(e_uid, rng.uniform(-40, 40, (20, 3)).round(1),
                   np.where(rng.random(20) < 0.5, -1, rng.uniform(3, 12, 20).round(1)))
    m_uid = rng.choice(uids + ["not.in.list"], n_marks)
    m_xyz = rng.uniform(-45, 45, (n_marks, 3)).round(1)
    # Coarse probabilities: many ties, including at the 100-mark cut.
    m_p = rng.integers(0, 30, n_marks) / 30.0
    near = rng.random(n_marks) < 0.3                   # a third land close to nodules
    k = rng.integers(0, n_nod, n_marks)
    m_uid = np.where(near, a_uid[k], m_uid)
    m_xyz = np.where(near[:, None], a_xyz[k] + rng.normal(0, 3, (n_marks, 3)), m_xyz)
    return ann, exc, uids, Marks(m_uid, m_xyz, m_p)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("cap", [100, 20])
def test_matches_script_port(seed, cap):
    ann, exc, uids, marks = random_case(seed)
    with pytest.warns(UserWarning, match="not in seriesuids"):
        r = compute_froc(ann, exc, uids, marks, max_marks_per_scan=cap)
    gt, prob, _, excl, n_ignored, n_double = script_entries(ann, exc, uids, marks, cap)
    fps, sens = script_froc(gt, prob, len(uids), excl)
    # Same operating points, bit for bit, so every reading is the same.
    np.testing.assert_array_equal(r.fps_per_scan, fps)
    np.testing.assert_array_equal(r.sensitivity, sens)
    assert r.n_detected == int((~excl & (gt == 1)).sum())
    assert r.n_nodules == int(gt.sum())
    assert r.n_false_positives == int((gt == 0).sum())
    assert (r.n_ignored_excluded, r.n_double_hits) == (n_ignored, n_double)
    grid = np.linspace(0.125, 8, 10001)
    np.testing.assert_array_equal(r.sens_interp, np.interp(grid, fps, sens))
    np.testing.assert_array_equal(r.sensitivities, np.interp(FP_RATES, fps, sens))


@pytest.mark.parametrize("seed", range(3))
def test_matches_sklearn_roc_curve_of_the_script(seed):
    ann, exc, uids, marks = random_case(seed, n_marks=300)
    with pytest.warns(UserWarning):
        r = compute_froc(ann, exc, uids, marks)
    gt, prob, _, excl, _, _ = script_entries(ann, exc, uids, marks)

    def sk_roc(g, p):  # scikit-learn's points with the (0, 0) start removed
        fpr, tpr, thr = skm.roc_curve(g, p)
        return tpr[1:] * g.sum(), fpr[1:] * (len(g) - g.sum()), thr[1:]

    fps, sens = script_froc(gt, prob, len(uids), excl, roc=sk_roc)
    # scikit-learn drops collinear points only: same curve, same interpolated values.
    tps, fpc, _ = threshold_counts(gt[~excl], prob[~excl])
    keep = np.r_[0, drop_collinear(tps, fpc) + 1]
    np.testing.assert_allclose(r.fps_per_scan[keep], fps, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(r.sensitivity[keep], sens, rtol=1e-12, atol=1e-15)
    grid = np.linspace(0.125, 8, 10001)
    np.testing.assert_allclose(r.sens_interp, np.interp(grid, fps, sens), atol=1e-12)


def test_bootstrap_matches_script_resampling():
    ann, exc, uids, marks = random_case(11, n_scans=10)
    n_boot, seed = 40, 5
    with pytest.warns(UserWarning):
        r = compute_froc(ann, exc, uids, marks, n_bootstrap=n_boot, seed=seed)
    gt, prob, scan, excl, _, _ = script_entries(ann, exc, uids, marks)
    # The same draws, then the script's procedure: concatenate the entries of the drawn
    # scans, computeFROC with all scans as the divisor, interpolate on 10,000 points.
    draws = np.random.default_rng(seed).integers(0, len(uids), (n_boot, len(uids)))
    grid = np.linspace(0.125, 8, 10000)
    curves = []
    for row in draws:
        idx = np.concatenate([np.flatnonzero(scan == uids[i]) for i in row])
        if gt[idx].sum() == 0:
            continue
        fps, sens = script_froc(gt[idx], prob[idx], len(uids), excl[idx])
        curves.append(np.interp(grid, fps, sens))
    curves = np.sort(np.array(curves), axis=0)
    n = len(curves)
    pz = (1.0 - 0.95) / 2.0
    b = r.bootstrap
    assert b.n_valid == n
    np.testing.assert_allclose(b.sens_mean, curves.mean(0), atol=1e-12)
    np.testing.assert_allclose(b.sens_lower, curves[int(math.floor(pz * n))], atol=1e-12)
    np.testing.assert_allclose(b.sens_upper, curves[int(math.floor((1 - pz) * n))], atol=1e-12)


# ------------------------------------------------------------------ real LUNA16 tables

@pytest.fixture(scope="module")
def real_tables(luna16_tables_dir):
    from lungjax.data.tables import read_findings_csv, read_uid_list

    d = luna16_tables_dir
    return (read_findings_csv(d / "annotations.csv"),
            read_findings_csv(d / "annotations_excluded.csv"),
            read_uid_list(d / "seriesuids.csv"))


def generated_submission(ann, exc, uids, seed=0, fps_per_scan=30):
    """90% of the nodules found (centre jittered by up to 0.3 radius) + FPs scattered
    around each scan's excluded findings (so some land on them and are ignored)."""
    rng = np.random.default_rng(seed)
    found = rng.random(len(ann)) < 0.9
    jitter = rng.normal(size=(len(ann), 3))
    jitter *= (0.3 * np.abs(ann.diameter_mm) / 2 / np.linalg.norm(jitter, axis=1))[:, None]
    tp = Marks(ann.uid[found], (ann.xyz + jitter)[found], rng.uniform(0.3, 1.0, found.sum()))
    k = rng.integers(0, len(exc), fps_per_scan * len(uids))
    fp = Marks(exc.uid[k], exc.xyz[k] + rng.normal(0, 15, (k.size, 3)),
               rng.uniform(0, 0.95, k.size) ** 2)
    return Marks.concatenate([tp, fp]), found


def test_real_tables_perfect_system(real_tables):
    ann, exc, uids = real_tables
    rng = np.random.default_rng(1)
    k = rng.integers(0, len(exc), 20 * len(uids))
    fps = Marks(exc.uid[k], exc.xyz[k] + 200.0, rng.uniform(0, 0.99, k.size))
    perfect = Marks.concatenate([Marks(ann.uid, ann.xyz, np.ones(len(ann))), fps])
    r = compute_froc(ann, exc, uids, perfect)
    assert (r.n_scans, r.n_nodules, r.n_detected) == (888, 1186, 1186)
    assert r.cpm == 1.0 and r.froc_new == 1.0 and len(r.missed) == 0


def test_real_tables_generated_submission(real_tables):
    ann, exc, uids = real_tables
    marks, found = generated_submission(ann, exc, uids)
    r = compute_froc(ann, exc, uids, marks, n_bootstrap=100, seed=0)
    assert (r.n_scans, r.n_nodules) == (888, 1186)
    assert r.n_detected >= found.sum() and r.n_ignored_excluded > 0
    assert 0.1 < r.cpm < r.detection_sensitivity <= 1.0
    assert np.all(np.diff(r.sensitivities) >= 0)
    assert r.bootstrap.cpm_lower < r.cpm < r.bootstrap.cpm_upper
    # Bit-for-bit against the loop port on a subset of 60 scans (the port is slow).
    sub = uids[::15]
    r_sub = compute_froc(ann, exc, sub, marks.select(np.isin(marks.uid, sub)))
    gt, prob, _, excl, n_ign, n_dbl = script_entries(ann, exc, sub, marks)
    fps, sens = script_froc(gt, prob, len(sub), excl)
    np.testing.assert_array_equal(r_sub.fps_per_scan, fps)
    np.testing.assert_array_equal(r_sub.sensitivity, sens)
    assert (r_sub.n_ignored_excluded, r_sub.n_double_hits) == (n_ign, n_dbl)
