"""Column tables for findings (reference nodules, excluded findings) and marks
(a system's detections), with LUNA16 CSV reading and writing.

Both are plain dataclasses of numpy columns so that the evaluation code can stay
vectorised and free of pandas.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Iterable, Sequence

import numpy as np

from lungjax.atomic import atomic_write_text

XYZ_COLUMNS = ("coordX", "coordY", "coordZ")


class TableError(ValueError):
    """A CSV table is malformed; the message names the file, row and field."""


@dataclasses.dataclass(frozen=True)
class Findings:
    """Reference findings in world coordinates.

    Attributes:
      uid: (N,) str, series instance UID of each finding.
      xyz: (N, 3) float64, world centre (x, y, z) in mm.
      diameter_mm: (N,) float64; -1 means unknown (LUNA16's excluded findings).
    """

    uid: np.ndarray
    xyz: np.ndarray
    diameter_mm: np.ndarray

    def __post_init__(self):
        object.__setattr__(self, "uid", np.asarray(self.uid, dtype=str).reshape(-1))
        object.__setattr__(self, "xyz", np.asarray(self.xyz, dtype=np.float64).reshape(-1, 3))
        object.__setattr__(self, "diameter_mm",
                           np.asarray(self.diameter_mm, dtype=np.float64).reshape(-1))
        if not (len(self.uid) == len(self.xyz) == len(self.diameter_mm)):
            raise ValueError("Findings columns differ in length")

    def __len__(self) -> int:
        return len(self.uid)

    def select(self, mask_or_index) -> "Findings":
        return Findings(self.uid[mask_or_index], self.xyz[mask_or_index],
                        self.diameter_mm[mask_or_index])

    def for_uid(self, uid: str) -> "Findings":
        return self.select(self.uid == uid)

    @classmethod
    def empty(cls) -> "Findings":
        return cls(np.zeros((0,), str), np.zeros((0, 3)), np.zeros((0,)))


@dataclasses.dataclass(frozen=True)
class Marks:
    """A system's detections (a LUNA16 submission).

    Attributes:
      uid: (M,) str, series instance UID.
      xyz: (M, 3) float64, world (x, y, z) in mm.
      probability: (M,) float64, higher = more likely a nodule.
    """

    uid: np.ndarray
    xyz: np.ndarray
    probability: np.ndarray

    def __post_init__(self):
        object.__setattr__(self, "uid", np.asarray(self.uid, dtype=str).reshape(-1))
        object.__setattr__(self, "xyz", np.asarray(self.xyz, dtype=np.float64).reshape(-1, 3))
        object.__setattr__(self, "probability",
                           np.asarray(self.probability, dtype=np.float64).reshape(-1))
        if not (len(self.uid) == len(self.xyz) == len(self.probability)):
            raise ValueError("Marks columns differ in length")

    def __len__(self) -> int:
        return len(self.uid)

    def select(self, mask_or_index) -> "Marks":
        return Marks(self.uid[mask_or_index], self.xyz[mask_or_index],
                     self.probability[mask_or_index])

    @classmethod
    def concatenate(cls, parts: Sequence["Marks"]) -> "Marks":
        if not parts:
            return cls(np.zeros((0,), str), np.zeros((0, 3)), np.zeros((0,)))
        return cls(np.concatenate([p.uid for p in parts]), np.concatenate([p.xyz for p in parts]),
                   np.concatenate([p.probability for p in parts]))


def _read_rows(path: str | os.PathLike, required: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise TableError(f"{path}: empty file, expected a header with {list(required)}")
        missing = [c for c in required if c not in header]
        if missing:
            raise TableError(f"{path}: missing column(s) {missing}; header is {header}")
        rows = [r for r in reader if r and any(v.strip() for v in r)]
    return header, rows


def _float_column(path, header, rows, name) -> np.ndarray:
    col = header.index(name)
    out = np.empty(len(rows), np.float64)
    for i, r in enumerate(rows):
        try:
            out[i] = float(r[col])
        except (ValueError, IndexError):
            value = r[col] if col < len(r) else "<missing>"
            raise TableError(f"{path}: row {i + 2}: column {name!r} is not a number: {value!r}")
    return out


def _uid_xyz(path, header, rows) -> tuple[np.ndarray, np.ndarray]:
    """(uid (N,) str, world xyz (N, 3) float64) of a LUNA16-style table's rows."""
    uid_col = header.index("seriesuid")
    uid = np.asarray([r[uid_col].strip() for r in rows], dtype=str)
    xyz = np.stack([_float_column(path, header, rows, c) for c in XYZ_COLUMNS], axis=-1) \
        if rows else np.zeros((0, 3))
    return uid, xyz


def read_findings_csv(path: str | os.PathLike) -> Findings:
    """Reads a LUNA16 ``annotations.csv`` / ``annotations_excluded.csv``.

    Columns: seriesuid, coordX, coordY, coordZ, diameter_mm.
    """
    header, rows = _read_rows(path, ("seriesuid",) + XYZ_COLUMNS + ("diameter_mm",))
    uid, xyz = _uid_xyz(path, header, rows)
    diameter = _float_column(path, header, rows, "diameter_mm")
    return Findings(uid, xyz, diameter)


def read_marks_csv(path: str | os.PathLike) -> Marks:
    """Reads a LUNA16 submission: seriesuid, coordX, coordY, coordZ, probability."""
    header, rows = _read_rows(path, ("seriesuid",) + XYZ_COLUMNS + ("probability",))
    uid, xyz = _uid_xyz(path, header, rows)
    prob = _float_column(path, header, rows, "probability")
    return Marks(uid, xyz, prob)


def read_points_csv(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Reads a list of points (e.g. nodule centres): seriesuid, coordX, coordY, coordZ
    (world mm; other columns ignored). Returns (uid (N,) str, xyz (N, 3) float64)."""
    return _uid_xyz(path, *_read_rows(path, ("seriesuid",) + XYZ_COLUMNS))


def read_uid_list(path: str | os.PathLike) -> list[str]:
    """Reads ``seriesuids.csv``: one UID per line, no header."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        uids = [line.strip().split(",")[0] for line in f if line.strip()]
    return [u for u in uids if u != "seriesuid"]


def csv_text(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """CSV text (one "\\n" per row) of a header and rows, as every table lungjax writes."""
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def write_findings_csv(path: str | os.PathLike, findings: Findings) -> None:
    rows = ((u, f"{x:.6f}", f"{y:.6f}", f"{z:.6f}", f"{d:.6f}")
            for u, (x, y, z), d in zip(findings.uid, findings.xyz, findings.diameter_mm))
    atomic_write_text(path, csv_text(("seriesuid",) + XYZ_COLUMNS + ("diameter_mm",), rows))


def write_marks_csv(path: str | os.PathLike, marks: Marks, extra: dict | None = None) -> None:
    """Writes a LUNA16 submission CSV; ``extra`` adds columns (e.g. diameter_mm) after
    the standard five, which the challenge's evaluation ignores."""
    extra = extra or {}
    header = ("seriesuid",) + XYZ_COLUMNS + ("probability",) + tuple(extra)
    cols = [np.asarray(v) for v in extra.values()]
    rows = ([u, f"{x:.6f}", f"{y:.6f}", f"{z:.6f}", f"{p:.8g}"] + [f"{c[i]:.6g}" for c in cols]
            for i, (u, (x, y, z), p) in enumerate(zip(marks.uid, marks.xyz, marks.probability)))
    atomic_write_text(path, csv_text(header, rows))
