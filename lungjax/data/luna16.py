"""The LUNA16 on-disk layout: subsets as folds, reference tables, lung and nodule masks.

::

    root/subset0/<uid>.mhd + .raw      ... subset9/   (subset number = official fold)
    root/annotations.csv               nodules >= 3 mm (seriesuid, coordX/Y/Z, diameter_mm)
    root/annotations_excluded.csv      findings ignored by the evaluation (optional)
    root/candidates_V2.csv | candidates.csv   (seriesuid, coordX/Y/Z, class) (optional)
    root/seriesuids.csv                the scan list of the challenge (optional)
    root/seg-lungs-LUNA16/<uid>.mhd    lung masks, 3/4 = lungs, 5 = trachea (optional)
    root/nodule-masks/<uid>.mhd        nodule instance labels (generated data only, optional)
    root/malignancy.csv                per-nodule LIDC reader scores and mask label
                                       (generated data only, optional; read by
                                       :func:`lungjax.data.prepare.nodule_labels_table`)

Inconsistencies (annotation rows whose UID has no scan, a UID in two subsets, ...) do
not stop :meth:`Luna16Dataset.open`; they are listed in ``.problems``.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
from typing import Sequence

import numpy as np

from lungjax.data.tables import (XYZ_COLUMNS, Findings, TableError, read_findings_csv,
                                 read_uid_list)

_SUBSET_RE = re.compile(r"^subset(\d+)$")
LUNG_MASK_DIR = "seg-lungs-LUNA16"
NODULE_MASK_DIR = "nodule-masks"


@dataclasses.dataclass(frozen=True)
class Candidates:
    """Candidate locations (LUNA16 candidates_V2.csv).

    Attributes:
      uid: (K,) str.
      xyz: (K, 3) float64 world (x, y, z) mm.
      label: (K,) int64, 1 = nodule, 0 = not.
    """

    uid: np.ndarray
    xyz: np.ndarray
    label: np.ndarray

    def __len__(self) -> int:
        return len(self.uid)

    def select(self, index) -> "Candidates":
        return Candidates(self.uid[index], self.xyz[index], self.label[index])

    def for_uid(self, uid: str) -> "Candidates":
        return self.select(self.uid == uid)

    @classmethod
    def empty(cls) -> "Candidates":
        return cls(np.zeros((0,), str), np.zeros((0, 3)), np.zeros((0,), np.int64))


def read_candidates_csv(path: str | os.PathLike) -> Candidates:
    """Reads candidates.csv / candidates_V2.csv: seriesuid, coordX, coordY, coordZ, class.

    Raises:
      TableError: missing column or non-numeric value (naming file, row and column).
    """
    path = os.fspath(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise TableError(f"{path}: empty file")
        required = ("seriesuid",) + XYZ_COLUMNS + ("class",)
        missing = [c for c in required if c not in header]
        if missing:
            raise TableError(f"{path}: missing column(s) {missing}; header is {header}")
        cols = [header.index(c) for c in required]
        uids, values = [], []
        for i, row in enumerate(reader):
            if not row or not any(v.strip() for v in row):
                continue
            try:
                values.append([float(row[c]) for c in cols[1:]])
            except (ValueError, IndexError):
                raise TableError(f"{path}: row {i + 2}: non-numeric coordinate or class: {row}")
            uids.append(row[cols[0]].strip())
    values = np.asarray(values, np.float64).reshape(-1, 4)
    return Candidates(np.asarray(uids, str), values[:, :3], values[:, 3].astype(np.int64))


def _summarise(kind: str, uids: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(sorted(uids)[:limit])
    more = f" and {len(uids) - limit} more" if len(uids) > limit else ""
    return f"{kind}: {len(uids)} UID(s): {shown}{more}"


@dataclasses.dataclass
class Luna16Dataset:
    """A LUNA16-layout folder.

    Attributes:
      root: the folder.
      annotations: reference nodules (world mm).
      excluded: excluded findings (empty if the table is absent).
      candidates: candidate table (empty if absent).
      seriesuids: the seriesuids.csv list, or None if absent.
      problems: human-readable inconsistencies found while opening.
    """

    root: str
    annotations: Findings
    excluded: Findings
    candidates: Candidates
    seriesuids: list[str] | None
    problems: list[str]
    _scans: dict[str, tuple[int, str]]

    @classmethod
    def open(cls, root: str | os.PathLike, require_scans: bool = True) -> "Luna16Dataset":
        """Discovers scans and reads the tables.

        Args:
          root: dataset folder.
          require_scans: raise if no ``subset*/<uid>.mhd`` exists (False reads the tables
            alone, e.g. the reference standard without images).

        Raises:
          FileNotFoundError: no root, no annotations.csv, or no scans when required.
          TableError: a malformed table.
        """
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{root}: no such dataset folder")
        problems: list[str] = []
        scans: dict[str, tuple[int, str]] = {}
        duplicates = []
        for entry in sorted(os.listdir(root)):
            m = _SUBSET_RE.match(entry)
            folder = os.path.join(root, entry)
            if not m or not os.path.isdir(folder):
                continue
            for name in sorted(os.listdir(folder)):
                if not name.endswith(".mhd"):
                    continue
                uid = name[:-len(".mhd")]
                if uid in scans:
                    duplicates.append(uid)
                    continue
                scans[uid] = (int(m.group(1)), os.path.join(folder, name))
        if duplicates:
            problems.append(_summarise("scan in more than one subset (first one used)", duplicates))
        if require_scans and not scans:
            raise FileNotFoundError(f"{root}: no scans found (expected subset0..subset9/<uid>.mhd)")

        ann_path = os.path.join(root, "annotations.csv")
        if not os.path.isfile(ann_path):
            raise FileNotFoundError(f"{ann_path}: no such file (the LUNA16 annotations table)")
        annotations = read_findings_csv(ann_path)
        exc_path = os.path.join(root, "annotations_excluded.csv")
        excluded = read_findings_csv(exc_path) if os.path.isfile(exc_path) else Findings.empty()
        candidates = Candidates.empty()
        for name in ("candidates_V2.csv", "candidates.csv"):
            p = os.path.join(root, name)
            if os.path.isfile(p):
                candidates = read_candidates_csv(p)
                break
        uid_path = os.path.join(root, "seriesuids.csv")
        seriesuids = read_uid_list(uid_path) if os.path.isfile(uid_path) else None

        if scans:
            have = set(scans)
            for kind, table in (("annotations.csv rows whose UID has no scan", annotations.uid),
                                ("annotations_excluded.csv rows whose UID has no scan",
                                 excluded.uid),
                                ("candidates rows whose UID has no scan", candidates.uid)):
                missing = sorted(set(table.tolist()) - have)
                if missing:
                    problems.append(_summarise(kind, missing))
            if seriesuids is not None:
                listed = set(seriesuids)
                missing = sorted(listed - have)
                if missing:
                    problems.append(_summarise("seriesuids.csv UIDs with no scan", missing))
                extra = sorted(have - listed)
                if extra:
                    problems.append(_summarise("scans not listed in seriesuids.csv", extra))
        return cls(root, annotations, excluded, candidates, seriesuids, problems, scans)

    @property
    def uids(self) -> list[str]:
        """UIDs of the scans found, sorted by fold then UID."""
        return sorted(self._scans, key=lambda u: (self._scans[u][0], u))

    def uids_in_folds(self, folds: Sequence[int]) -> list[str]:
        folds = {int(f) for f in folds}
        return [u for u in self.uids if self._scans[u][0] in folds]

    def _check(self, uid: str) -> tuple[int, str]:
        try:
            return self._scans[uid]
        except KeyError:
            raise KeyError(f"{self.root}: no scan {uid!r}") from None

    def fold_of(self, uid: str) -> int:
        return self._check(uid)[0]

    def scan_path(self, uid: str) -> str:
        return self._check(uid)[1]

    def _optional(self, folder: str, uid: str) -> str | None:
        self._check(uid)
        p = os.path.join(self.root, folder, uid + ".mhd")
        return p if os.path.isfile(p) else None

    def lung_mask_path(self, uid: str) -> str | None:
        """``seg-lungs-LUNA16/<uid>.mhd`` or None if absent."""
        return self._optional(LUNG_MASK_DIR, uid)

    def nodule_mask_path(self, uid: str) -> str | None:
        """``nodule-masks/<uid>.mhd`` (instance labels) or None if absent."""
        return self._optional(NODULE_MASK_DIR, uid)
