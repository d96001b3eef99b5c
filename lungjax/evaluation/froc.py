"""LUNA16 FROC analysis and CPM, computed as the challenge's evaluation script does.

The rules (``noduleCADEvaluationLUNA16.py``, LUNA16 challenge; Setio et al. 2017,
MedIA 42:1-13), here vectorised with numpy:

1. Only the scans listed in ``seriesuids`` are evaluated; marks and findings on other
   UIDs are ignored (marks on unknown UIDs raise a warning and are listed).
2. Per scan, when a system gives more than ``max_marks_per_scan`` (100) marks, only
   marks whose probability is strictly greater than the 101st-highest are kept (so
   ties at the cut can leave fewer than 100).
3. A mark hits a finding when its squared world distance to the finding's centre is
   strictly below ``(diameter / 2) ** 2``; a diameter below 0 (LUNA16 writes -1 for
   excluded findings) counts as 10 mm.
4. Each detected reference nodule gives one positive at the highest probability among
   its hits; further hits on it are ignored (not FPs). A mark inside two nodules
   detects both.
5. Marks that hit an excluded finding (``annotations_excluded.csv``) and no reference
   nodule are ignored: neither hit nor FP. Every other mark is an FP.
6. Missed nodules stay in the sensitivity denominator.
7. Curve: ROC over (positives, FP marks); FPs/scan = FPR x number of FP marks /
   number of scans; sensitivity = TPR x detected / all reference nodules. The script
   interpolates it linearly on 10,001 points between 1/8 and 8 FPs/scan.
8. Bootstrap over scans (1,000 resamples with replacement, 95% interval by order
   statistics, curves interpolated on 10,000 points); the script does not seed its
   generator, we do.

CPM (FROC[luna]) is the mean sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8 FPs/scan and
FROC[new] the mean at 1, 2 and 4. Papers read a sensitivity off the curve in
different ways, so all three are reported (``FrocResult.readings``):

* ``"interpolate"`` (the default, used for ``cpm``): the linearly interpolated curve
  at the exact rate, i.e. the curve the script draws. (A widespread variant reads the
  nearest of the 10,001 grid points instead; it differs by at most the local slope
  times 3.9e-4 FPs/scan.)
* ``"nearest"``: the operating point whose FPs/scan is nearest the rate (on ties, the
  lower FPs/scan; at that FPs/scan, the highest sensitivity).
* ``"first_at_or_above"``: the first operating point, in order of decreasing
  threshold, with FPs/scan >= the rate; the last point when the curve never gets there.

Command line (``lungjax.evaluation.froc_cli``; writes summary.txt, summary.json, froc.png,
froc_curve.csv, bootstrap.csv, missed_nodules.csv)::

    python -m lungjax.evaluation.froc_cli --annotations annotations.csv \
        --excluded annotations_excluded.csv --seriesuids seriesuids.csv \
        --submission sub.csv --out DIR [--bootstrap 1000] [--seed 0]
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Sequence

import numpy as np
from scipy.spatial import cKDTree

from lungjax.data.coords import within_sphere
from lungjax.data.tables import Findings, Marks
from lungjax.evaluation.classification import threshold_counts

__all__ = [
    "FP_RATES",
    "FROC_NEW_RATES",
    "READINGS",
    "FrocBootstrap",
    "FrocResult",
    "compute_froc",
    "froc_points",
    "read_sensitivity",
    "validate_findings",
    "validate_marks",
]

FP_RATES = (0.125, 0.25, 0.5, 1, 2, 4, 8)
FROC_NEW_RATES = (1, 2, 4)
FROC_MIN_X = 0.125
FROC_MAX_X = 8.0
N_INTERP = 10001            # the script's grid for the FROC curve
N_INTERP_BOOTSTRAP = 10000  # ... and for the bootstrap curves (it uses 10,000 there)
N_BOOTSTRAP = 1000  # the script's resamples over scans (held-out records and the CLI)
UNKNOWN_DIAMETER_MM = 10.0
READINGS = ("interpolate", "nearest", "first_at_or_above")
# Offset between scans along the k-d tree's 4th axis: far beyond any nodule radius.
_SCAN_SEPARATION_MM = 1e4


# ----------------------------------------------------------------------------- results

@dataclasses.dataclass(frozen=True)
class FrocBootstrap:
    """Bootstrap over scans.

    Attributes:
      n_resamples: resamples drawn.
      n_valid: resamples used (a resample without any reference nodule has no
        sensitivity and is skipped; only tiny test sets ever hit this).
      seed: seed of ``np.random.default_rng``.
      confidence: two-sided level of the intervals (0.95).
      fps_grid: (10000,) FPs/scan from 1/8 to 8.
      sens_mean, sens_lower, sens_upper: (10000,) mean and interval of the curves.
      sensitivities_mean, sensitivities_lower, sensitivities_upper: (7,) at FP_RATES.
      cpm_mean, cpm_lower, cpm_upper, froc_new_mean, froc_new_lower, froc_new_upper.
    """

    n_resamples: int
    n_valid: int
    seed: int
    confidence: float
    fps_grid: np.ndarray
    sens_mean: np.ndarray
    sens_lower: np.ndarray
    sens_upper: np.ndarray
    sensitivities_mean: np.ndarray
    sensitivities_lower: np.ndarray
    sensitivities_upper: np.ndarray
    cpm_mean: float
    cpm_lower: float
    cpm_upper: float
    froc_new_mean: float
    froc_new_lower: float
    froc_new_upper: float

    def to_json(self) -> dict:
        return {
            "n_resamples": self.n_resamples, "n_valid": self.n_valid, "seed": self.seed,
            "confidence": self.confidence,
            "cpm": {"mean": self.cpm_mean, "lower": self.cpm_lower, "upper": self.cpm_upper},
            "froc_new": {"mean": self.froc_new_mean, "lower": self.froc_new_lower,
                         "upper": self.froc_new_upper},
            "sensitivities": {"mean": self.sensitivities_mean.tolist(),
                              "lower": self.sensitivities_lower.tolist(),
                              "upper": self.sensitivities_upper.tolist()},
        }


@dataclasses.dataclass(frozen=True)
class FrocResult:
    """Outcome of :func:`compute_froc`.

    Attributes:
      cpm: FROC[luna], mean interpolated sensitivity at FP_RATES.
      froc_new: mean interpolated sensitivity at 1, 2, 4 FPs/scan.
      sensitivities: (7,) interpolated sensitivities at FP_RATES.
      readings: {"interpolate"|"nearest"|"first_at_or_above": {"cpm", "froc_new",
        "sensitivities" (list of 7)}}.
      fps_per_scan, sensitivity, thresholds: (T+1,) float64 operating points, one per
        distinct probability, starting at (0, 0) with threshold +inf. (scikit-learn's
        ``drop_intermediate`` would drop collinear points only; the interpolated curve
        is the same.)
      fps_interp, sens_interp: (10001,) the interpolated curve on [1/8, 8].
      nodules: the reference nodules of the evaluated scans.
      nodule_probability: (len(nodules),) best probability among each nodule's hits,
        nan when missed.
      missed: Findings, the missed reference nodules.
      n_scans, n_nodules, n_detected: counts.
      n_marks: marks evaluated (after dropping unknown UIDs and the per-scan cap).
      n_marks_capped: marks dropped by the per-scan cap.
      n_false_positives, n_ignored_excluded, n_double_hits: mark counts.
      unknown_uids: UIDs of marks not in ``seriesuids`` (ignored).
      max_marks_per_scan: the cap used (0 = none).
      bootstrap: FrocBootstrap or None.
    """

    cpm: float
    froc_new: float
    sensitivities: np.ndarray
    readings: dict
    fps_per_scan: np.ndarray
    sensitivity: np.ndarray
    thresholds: np.ndarray
    fps_interp: np.ndarray
    sens_interp: np.ndarray
    nodules: Findings
    nodule_probability: np.ndarray
    missed: Findings
    n_scans: int
    n_nodules: int
    n_detected: int
    n_marks: int
    n_marks_capped: int
    n_false_positives: int
    n_ignored_excluded: int
    n_double_hits: int
    unknown_uids: tuple
    max_marks_per_scan: int
    bootstrap: FrocBootstrap | None = None

    @property
    def cpm_ci95(self) -> list[float]:
        """[lower, upper] bootstrap interval of the CPM (``compute_froc(n_bootstrap > 0)``)."""
        if self.bootstrap is None:
            raise ValueError("no bootstrap: compute_froc(..., n_bootstrap=N) with N > 0")
        return [float(self.bootstrap.cpm_lower), float(self.bootstrap.cpm_upper)]

    @property
    def detection_sensitivity(self) -> float:
        """Fraction of reference nodules hit by any mark (the curve's end point)."""
        return self.n_detected / self.n_nodules

    def to_json(self) -> dict:
        """JSON-serialisable summary (without the full curve arrays)."""
        return {
            "cpm": self.cpm,
            "froc_new": self.froc_new,
            "fp_rates": list(FP_RATES),
            "sensitivities": self.sensitivities.tolist(),
            "readings": self.readings,
            "n_scans": self.n_scans,
            "n_nodules": self.n_nodules,
            "n_detected": self.n_detected,
            "detection_sensitivity": self.detection_sensitivity,
            "n_marks": self.n_marks,
            "n_marks_capped": self.n_marks_capped,
            "n_false_positives": self.n_false_positives,
            "n_ignored_excluded": self.n_ignored_excluded,
            "n_double_hits": self.n_double_hits,
            "max_fps_per_scan": float(self.fps_per_scan[-1]),
            "max_marks_per_scan": self.max_marks_per_scan,
            "unknown_uids": list(self.unknown_uids),
            "bootstrap": None if self.bootstrap is None else self.bootstrap.to_json(),
        }

    def summary_text(self, name: str = "system") -> str:
        """Human-readable summary in the spirit of the script's CADAnalysis.txt."""
        rates = "  ".join(f"{r:>6g}" for r in FP_RATES)
        lines = [
            f"FROC analysis: {name}",
            f"  scans {self.n_scans}, reference nodules {self.n_nodules}, "
            f"marks evaluated {self.n_marks} (cap {self.max_marks_per_scan or 'none'}: "
            f"{self.n_marks_capped} dropped)",
            f"  detected {self.n_detected} ({self.detection_sensitivity:.4f}), "
            f"false positives {self.n_false_positives} "
            f"({self.fps_per_scan[-1]:.3f}/scan), marks on excluded findings ignored "
            f"{self.n_ignored_excluded}, double hits ignored {self.n_double_hits}",
            "",
            f"  FPs/scan            {rates}     CPM  FROC[new]",
        ]
        for how in READINGS:
            r = self.readings[how]
            sens = "  ".join(f"{s:6.4f}" for s in r["sensitivities"])
            lines.append(f"  {how:<19s} {sens}  {r['cpm']:6.4f}  {r['froc_new']:6.4f}")
        b = self.bootstrap
        if b is not None:
            pct = int(round(100 * b.confidence))
            lines += ["", f"  bootstrap ({b.n_valid}/{b.n_resamples} resamples, seed {b.seed}, "
                      f"{pct}% interval):",
                      f"    CPM {b.cpm_mean:.4f} [{b.cpm_lower:.4f}, {b.cpm_upper:.4f}]  "
                      f"FROC[new] {b.froc_new_mean:.4f} "
                      f"[{b.froc_new_lower:.4f}, {b.froc_new_upper:.4f}]"]
            for r, lo, hi in zip(FP_RATES, b.sensitivities_lower, b.sensitivities_upper):
                lines.append(f"    {r:>6g} FPs/scan: [{lo:.4f}, {hi:.4f}]")
        if self.unknown_uids:
            lines += ["", f"  WARNING: {len(self.unknown_uids)} UID(s) in the submission are "
                      "not in the scan list; their marks were ignored."]
        return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------- validation

def _rows(idx: np.ndarray, source: str | None, limit: int = 5) -> str:
    # CSV line numbers (header = line 1) when the table came from a file.
    shown = [str(int(i) + 2) if source else str(int(i)) for i in idx[:limit]]
    more = f" and {idx.size - limit} more" if idx.size > limit else ""
    return ("row(s) " if source else "index ") + ", ".join(shown) + more


def validate_marks(marks: Marks, source: str | None = None) -> None:
    """Raises ValueError naming the rows with non-finite coordinates or NaN probability.

    Args:
      marks: the submission.
      source: file the marks were read from (row numbers are then CSV line numbers).
    """
    where = f"{source}: " if source else "marks: "
    bad = np.flatnonzero(~np.isfinite(marks.xyz).all(axis=1))
    if bad.size:
        raise ValueError(f"{where}non-finite coordinates (coordX/coordY/coordZ) in "
                         f"{_rows(bad, source)}")
    bad = np.flatnonzero(np.isnan(marks.probability))
    if bad.size:
        raise ValueError(f"{where}probability is NaN in {_rows(bad, source)}")


def validate_findings(findings: Findings, source: str | None = None) -> None:
    """Raises ValueError naming rows with non-finite coordinates or diameters."""
    where = f"{source}: " if source else "findings: "
    bad = np.flatnonzero(~np.isfinite(findings.xyz).all(axis=1))
    if bad.size:
        raise ValueError(f"{where}non-finite coordinates in {_rows(bad, source)}")
    bad = np.flatnonzero(~np.isfinite(findings.diameter_mm))
    if bad.size:
        raise ValueError(f"{where}non-finite diameter_mm in {_rows(bad, source)}")


# ---------------------------------------------------------------------------- matching

def _scan_index(uids: np.ndarray, index: dict[str, int]) -> np.ndarray:
    """(N,) int scan number of each UID, -1 when not in the scan list."""
    # A dict lookup per row beats sorting long UID strings (np.unique) by ~20x.
    get = index.get
    return np.fromiter((get(u, -1) for u in uids.tolist()), np.int64, count=uids.size)


def cap_marks(scan: np.ndarray, prob: np.ndarray, max_marks: int) -> np.ndarray:
    """Mask of marks kept by the per-scan cap.

    In a scan with more than ``max_marks`` marks, keep those whose probability is
    strictly greater than the (max_marks+1)-th highest.

    Args:
      scan: (M,) int scan number of each mark.
      prob: (M,) float64 probabilities.
      max_marks: the cap; <= 0 disables it.

    Returns:
      (M,) bool.
    """
    keep = np.ones(scan.size, bool)
    if max_marks <= 0 or scan.size == 0:
        return keep
    order = np.lexsort((-prob, scan))           # by scan, then probability descending
    s_sorted = scan[order]
    starts = np.r_[0, np.flatnonzero(np.diff(s_sorted)) + 1]
    counts = np.diff(np.r_[starts, s_sorted.size])
    over = counts > max_marks
    if not over.any():
        return keep
    cut = np.full(scan.max() + 1, -np.inf)
    cut[s_sorted[starts[over]]] = prob[order[starts[over] + max_marks]]
    return prob > cut[scan]


def _match(f_scan, f_xyz, f_radius, m_scan, m_xyz):
    """All (finding, mark) pairs in the same scan with the mark inside the finding's sphere
    (``lungjax.data.coords.within_sphere``: distance < radius, world (x, y, z) mm).

    A k-d tree over (x, y, z, scan * 1e4 mm) proposes candidates (points of different
    scans are >= 1e4 mm apart, far beyond any nodule radius); each candidate is then
    decided by the script's exact test, so the tree's own rounding never matters.

    Returns:
      (finding_index, mark_index) int64 arrays of the hits.
    """
    if f_scan.size == 0 or m_scan.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    tree = cKDTree(np.c_[m_xyz, m_scan * _SCAN_SEPARATION_MM])
    radius = f_radius * (1 + 1e-9) + 1e-9            # superset of the strict test
    lists = tree.query_ball_point(np.c_[f_xyz, f_scan * _SCAN_SEPARATION_MM], radius,
                                  return_sorted=False)
    counts = np.fromiter((len(x) for x in lists), np.int64, count=len(lists))
    if counts.sum() == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    f_idx = np.repeat(np.arange(f_scan.size), counts)
    m_idx = np.fromiter((k for x in lists for k in x), np.int64, count=int(counts.sum()))
    hit = within_sphere(m_xyz[m_idx], f_xyz[f_idx], f_radius[f_idx])
    return f_idx[hit], m_idx[hit]


# ------------------------------------------------------------------------------- curve

def froc_points(n_tp: np.ndarray, n_fp: np.ndarray, n_nodules: int, n_scans: int):
    """FROC operating points from cumulative counts, with the script's arithmetic.

    Args:
      n_tp, n_fp: (T,) cumulative detected nodules / FP marks at each threshold
        (from :func:`lungjax.evaluation.classification.threshold_counts`).
      n_nodules: all reference nodules (detected + missed).
      n_scans: scans evaluated.

    Returns:
      ``(fps_per_scan, sensitivity)``, each (T+1,) float64, starting at (0, 0).
    """
    tp = np.zeros(len(n_tp) + 1)
    tp[1:] = n_tp
    fp = np.zeros(len(n_fp) + 1)
    fp[1:] = n_fp
    # fps = FPR * nFP / nScans and sens = TPR * nDetected / nNodules, in that order of
    # operations; with no FPs (or no detections) the rate is 0, not 0/0.
    fpr = fp / fp[-1] if fp[-1] > 0 else np.zeros_like(fp)
    tpr = tp / tp[-1] if tp[-1] > 0 else np.zeros_like(tp)
    return fpr * fp[-1] / n_scans, tpr * tp[-1] / n_nodules


def read_sensitivity(fps: np.ndarray, sens: np.ndarray, rates: Sequence[float] = FP_RATES,
                     reading: str = "interpolate") -> np.ndarray:
    """Sensitivity at given FPs/scan from FROC operating points.

    Args:
      fps: (P,) non-decreasing FPs/scan of the operating points.
      sens: (P,) non-decreasing sensitivity.
      rates: FPs/scan to read at.
      reading: "interpolate" | "nearest" | "first_at_or_above" (see module docstring).

    Returns:
      (len(rates),) float64.
    """
    rates = np.asarray(rates, np.float64)
    if reading == "interpolate":
        return np.interp(rates, fps, sens)
    out = np.empty(rates.size)
    for k, r in enumerate(rates):
        if reading == "nearest":
            dist = np.abs(fps - r)
            near = np.isclose(dist, dist.min(), rtol=1e-12, atol=1e-12)
            f = fps[near].min()
            out[k] = sens[near & (fps == f)].max()
        elif reading == "first_at_or_above":
            idx = np.flatnonzero(fps >= r * (1 - 1e-12))
            out[k] = sens[idx[0]] if idx.size else sens[-1]
        else:
            raise ValueError(f"reading must be one of {READINGS}, got {reading!r}")
    return out


def _summary_of(sens_at_rates: np.ndarray) -> dict:
    new = [FP_RATES.index(r) for r in FROC_NEW_RATES]
    return {"cpm": float(sens_at_rates.mean()), "froc_new": float(sens_at_rates[new].mean()),
            "sensitivities": sens_at_rates.tolist()}


def _order_statistic_ci(values: np.ndarray, confidence: float):
    """The script's interval: sorted values at floor(Pz n) and floor((1 - Pz) n)."""
    n = values.shape[0]
    pz = (1.0 - confidence) / 2.0
    i_lo, i_hi = int(np.floor(pz * n)), min(int(np.floor((1.0 - pz) * n)), n - 1)
    v = np.partition(values, sorted({i_lo, i_hi}), axis=0)   # two order statistics only
    return values.mean(axis=0), v[i_lo], v[i_hi]


def _bootstrap(entry_scan, entry_gt, entry_prob, nodules_per_scan, n_scans, n_resamples,
               seed, confidence, chunk=16) -> FrocBootstrap:
    """Resamples scans with replacement; every entry is weighted by how many times its
    scan was drawn, which gives exactly the script's concatenated resample."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_scans, size=(n_resamples, n_scans))
    counts = np.bincount((draws + n_scans * np.arange(n_resamples)[:, None]).ravel(),
                         minlength=n_resamples * n_scans).reshape(n_resamples, n_scans)
    order = np.argsort(entry_prob, kind="mergesort")[::-1]
    p_sorted = entry_prob[order]
    gt_sorted = entry_gt[order].astype(bool)
    last = (np.r_[np.flatnonzero(np.diff(p_sorted)), p_sorted.size - 1].astype(np.int64)
            if p_sorted.size else np.zeros(0, np.int64))
    # Positives and negatives are accumulated separately (no multiply by 0/1 masks); at
    # threshold j the counts are the running sums up to the entries before last[j] + 1.
    n_pos_upto = np.cumsum(gt_sorted)[last]
    n_neg_upto = last + 1 - n_pos_upto
    pos_scan = entry_scan[order][gt_sorted]
    neg_scan = entry_scan[order][~gt_sorted]
    # Cumulative counts are at most n_scans x (entries of the largest scan): int32 unless
    # an uncapped submission is huge.
    biggest = int(np.bincount(entry_scan, minlength=1).max()) if entry_scan.size else 0
    acc = np.int32 if n_scans * max(biggest, 1) < 2**31 else np.int64
    counts = counts.astype(acc)
    n_nod = counts.astype(np.int64) @ nodules_per_scan
    grid = np.linspace(FROC_MIN_X, FROC_MAX_X, N_INTERP_BOOTSTRAP)
    curves = np.empty((n_resamples, grid.size))
    at_rates = np.empty((n_resamples, len(FP_RATES)))
    for b0 in range(0, n_resamples, chunk):
        c = counts[b0:b0 + chunk]
        tp_run = np.zeros((c.shape[0], pos_scan.size + 1), acc)
        np.cumsum(c[:, pos_scan], axis=1, out=tp_run[:, 1:])
        fp_run = np.zeros((c.shape[0], neg_scan.size + 1), acc)
        np.cumsum(c[:, neg_scan], axis=1, out=fp_run[:, 1:])
        tp, fp = tp_run[:, n_pos_upto], fp_run[:, n_neg_upto]
        for k in range(c.shape[0]):
            b = b0 + k
            if n_nod[b] == 0:
                curves[b] = np.nan
                at_rates[b] = np.nan
                continue
            fps, sens = froc_points(tp[k], fp[k], int(n_nod[b]), n_scans)
            curves[b] = np.interp(grid, fps, sens)
            at_rates[b] = np.interp(FP_RATES, fps, sens)
    valid = n_nod > 0
    if not valid.any():
        raise ValueError("bootstrap: no resample contains a reference nodule")
    curves, at_rates = curves[valid], at_rates[valid]
    new = [FP_RATES.index(r) for r in FROC_NEW_RATES]
    cm, cl, cu = _order_statistic_ci(curves, confidence)
    sm, sl, su = _order_statistic_ci(at_rates, confidence)
    pm, pl, pu = _order_statistic_ci(at_rates.mean(axis=1), confidence)
    nm, nl, nu = _order_statistic_ci(at_rates[:, new].mean(axis=1), confidence)
    return FrocBootstrap(
        n_resamples=int(n_resamples), n_valid=int(valid.sum()), seed=int(seed),
        confidence=float(confidence), fps_grid=grid, sens_mean=cm, sens_lower=cl,
        sens_upper=cu, sensitivities_mean=sm, sensitivities_lower=sl,
        sensitivities_upper=su, cpm_mean=float(pm), cpm_lower=float(pl),
        cpm_upper=float(pu), froc_new_mean=float(nm), froc_new_lower=float(nl),
        froc_new_upper=float(nu))


# --------------------------------------------------------------------------------- API

def warn_suspicious_marks(marks: Marks) -> dict[str, int]:
    """Warns (``UserWarning``, with counts) about a submission that is legal but likely
    wrong, and returns the counts; the FROC is computed as the official script would:

    * no marks at all (sensitivity 0 at every rate);
    * duplicate marks, rows with the same UID, coordinates and probability: the script
      counts each one (a duplicated false positive is two false positives);
    * probabilities outside [0, 1]: only their order matters to the FROC, but a
      submission is expected to hold probabilities.
    """
    counts = {"marks": len(marks), "duplicates": 0, "outside_0_1": 0}
    if len(marks) == 0:
        warnings.warn("the submission has no marks: sensitivity is 0 at every FP rate",
                      stacklevel=3)
        return counts
    rows = np.rec.fromarrays([marks.uid, *marks.xyz.T, marks.probability])
    counts["duplicates"] = int(len(rows) - len(np.unique(rows)))
    p = marks.probability
    counts["outside_0_1"] = int(np.count_nonzero((p < 0.0) | (p > 1.0)))
    if counts["duplicates"]:
        warnings.warn(f"{counts['duplicates']} duplicate mark(s) (same UID, coordinates and "
                      "probability); each counts, as in the official script (a duplicated "
                      "false positive is two)", stacklevel=3)
    if counts["outside_0_1"]:
        warnings.warn(f"{counts['outside_0_1']} mark probability(ies) outside [0, 1] (range "
                      f"{p.min():.4g} .. {p.max():.4g}); only their order matters to the FROC",
                      stacklevel=3)
    return counts


def compute_froc(annotations: Findings, excluded: Findings, seriesuids: Sequence[str],
                 marks: Marks, *, n_bootstrap: int = 0, seed: int = 0,
                 max_marks_per_scan: int = 100, confidence: float = 0.95) -> FrocResult:
    """LUNA16 FROC analysis of a set of marks (see the module docstring for the rules).

    Args:
      annotations: reference nodules (``annotations.csv``), world (x, y, z) mm.
      excluded: irrelevant findings (``annotations_excluded.csv``); diameter < 0 = 10 mm.
      seriesuids: the scans evaluated (``seriesuids.csv``), each once; all count in
        FPs/scan, with or without marks.
      marks: the system's detections, world (x, y, z) mm.
      n_bootstrap: bootstrap resamples over scans (0 = none; the challenge used 1000).
      seed: seed of the bootstrap generator.
      max_marks_per_scan: per-scan cap (100 in LUNA16); <= 0 disables it.
      confidence: level of the bootstrap intervals.

    Returns:
      FrocResult.

    Raises:
      ValueError: NaN coordinates/probabilities, a UID listed twice, or no reference
        nodule in the evaluated scans.
    """
    validate_marks(marks)
    validate_findings(annotations, "annotations")
    validate_findings(excluded, "excluded findings")
    warn_suspicious_marks(marks)
    uids = [str(u) for u in seriesuids]
    index: dict[str, int] = {}
    for i, u in enumerate(uids):
        if u in index:
            raise ValueError(f"seriesuids: {u} is listed twice")
        index[u] = i
    n_scans = len(uids)
    if n_scans == 0:
        raise ValueError("seriesuids: no scans to evaluate")

    # Marks: drop unknown UIDs (warn), then apply the per-scan cap.
    m_scan = _scan_index(marks.uid, index)
    unknown = tuple(sorted(set(marks.uid[m_scan < 0].tolist())))
    if unknown:
        warnings.warn(f"{len(unknown)} UID(s) in the marks are not in seriesuids and were "
                      f"ignored: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}",
                      stacklevel=2)
    known = m_scan >= 0
    m_scan, m_xyz, m_prob = m_scan[known], marks.xyz[known], marks.probability[known]
    keep = cap_marks(m_scan, m_prob, max_marks_per_scan)
    n_capped = int(np.count_nonzero(~keep))
    m_scan, m_xyz, m_prob = m_scan[keep], m_xyz[keep], m_prob[keep]
    n_marks = m_scan.size

    # Findings of the evaluated scans: reference nodules first, then excluded ones.
    a_scan = _scan_index(annotations.uid, index)
    nodules = annotations.select(a_scan >= 0)
    a_scan = a_scan[a_scan >= 0]
    e_scan = _scan_index(excluded.uid, index)
    e_sel = e_scan >= 0
    n_nod = len(nodules)
    if n_nod == 0:
        raise ValueError("annotations: no reference nodule in the evaluated scans; "
                         "sensitivity is undefined")
    f_scan = np.r_[a_scan, e_scan[e_sel]].astype(np.int64)
    f_xyz = np.concatenate([nodules.xyz, excluded.xyz[e_sel]])
    diam = np.r_[nodules.diameter_mm, excluded.diameter_mm[e_sel]]
    diam = np.where(diam < 0.0, UNKNOWN_DIAMETER_MM, diam)
    hit_f, hit_m = _match(f_scan, f_xyz, diam / 2.0, m_scan, m_xyz)
    on_nodule = hit_f < n_nod
    best = np.full(n_nod, -np.inf)
    np.maximum.at(best, hit_f[on_nodule], m_prob[hit_m[on_nodule]])
    n_hits = np.bincount(hit_f[on_nodule], minlength=n_nod)
    detected = n_hits > 0
    is_hit = np.zeros(n_marks, bool)
    is_hit[hit_m[on_nodule]] = True
    ignored = np.zeros(n_marks, bool)
    ignored[hit_m[~on_nodule]] = True
    ignored &= ~is_hit
    is_fp = ~is_hit & ~ignored

    # FROC entries: one positive per detected nodule + one negative per FP mark.
    entry_scan = np.r_[a_scan[detected], m_scan[is_fp]]
    entry_gt = np.r_[np.ones(int(detected.sum()), bool), np.zeros(int(is_fp.sum()), bool)]
    entry_prob = np.r_[best[detected], m_prob[is_fp]]
    n_tp, n_fp, thr = threshold_counts(entry_gt, entry_prob)
    fps, sens = froc_points(n_tp, n_fp, n_nod, n_scans)
    thresholds = np.r_[np.inf, thr]
    fps_interp = np.linspace(FROC_MIN_X, FROC_MAX_X, N_INTERP)
    sens_interp = np.interp(fps_interp, fps, sens)
    readings = {how: _summary_of(read_sensitivity(fps, sens, FP_RATES, how))
                for how in READINGS}

    boot = None
    if n_bootstrap > 0:
        nodules_per_scan = np.bincount(a_scan, minlength=n_scans).astype(np.int64)
        boot = _bootstrap(entry_scan, entry_gt, entry_prob, nodules_per_scan, n_scans,
                          int(n_bootstrap), seed, confidence)

    interp = readings["interpolate"]
    return FrocResult(
        cpm=interp["cpm"], froc_new=interp["froc_new"],
        sensitivities=np.asarray(interp["sensitivities"]), readings=readings,
        fps_per_scan=fps, sensitivity=sens, thresholds=thresholds,
        fps_interp=fps_interp, sens_interp=sens_interp,
        nodules=nodules, nodule_probability=np.where(detected, best, np.nan),
        missed=nodules.select(~detected), n_scans=n_scans, n_nodules=n_nod,
        n_detected=int(detected.sum()), n_marks=int(n_marks), n_marks_capped=n_capped,
        n_false_positives=int(is_fp.sum()), n_ignored_excluded=int(ignored.sum()),
        n_double_hits=int(np.maximum(n_hits - 1, 0).sum()), unknown_uids=unknown,
        max_marks_per_scan=int(max(max_marks_per_scan, 0)), bootstrap=boot)
