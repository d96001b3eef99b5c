"""One generated scan: geometry drawn from real LIDC scans, anatomy, nodules, excluded
findings, candidate points, and the volumes and records that are written to disk.

Positions are voxel coordinates (z, y, x) until the final conversion to world
(x, y, z) mm through ``lungjax.data.coords``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lungjax.data import synthetic_anatomy as anatomy_lib
from lungjax.data import synthetic_nodules as nodules_lib
from lungjax.data.coords import Geometry, voxel_to_world

SCORE_NAMES = ("malignancy", "texture", "subtlety", "internal_structure", "calcification",
               "sphericity", "margin", "lobulation", "spiculation")


@dataclasses.dataclass(frozen=True)
class Preset:
    """Size and content of a generated dataset.

    Attributes:
      name: preset name.
      n_scans: number of scans, spread round-robin over subset0..subset9.
      chest_scale: (lo, hi) size of the chest; 1.0 = a small adult (lungs ~ 170 x 100 x
        140 mm, a few million voxels at 1 mm).
      max_voxels: geometries (spacing drawn from real LIDC scans) whose grid would exceed
        this many voxels are redrawn, which keeps generation and preprocessing fast.
      nodules_mean: mean number of library nodules in a scan with nodules (1 + Poisson);
        ignored when ``nodule_count`` is set.
      max_nodules: cap per scan.
      nodule_count: (lo, hi) inclusive range of library nodules per scan, drawn
        uniformly; () = the Poisson rule above.
      p_no_nodules: share of scans without nodules.
      max_diameter_mm: largest library nodule used (small chests hold small nodules).
      juxtapleural_fraction: share of nodules placed touching the pleura.
      n_micro: (lo, hi) count of sub-3 mm nodules per scan (excluded, diameter -1).
      n_faint: (lo, hi) count of faint 3-6 mm opacities per scan (excluded, with diameter).
      n_vessel_candidates: class-0 candidates on vessels per scan.
      n_random_candidates: class-0 candidates at random lung points per scan.
    """

    name: str
    n_scans: int
    chest_scale: tuple
    max_voxels: int
    nodules_mean: float
    max_nodules: int
    p_no_nodules: float
    max_diameter_mm: float
    juxtapleural_fraction: float = 0.25
    nodule_count: tuple = ()
    n_micro: tuple = (1, 4)
    n_faint: tuple = (0, 2)
    n_vessel_candidates: int = 120
    n_random_candidates: int = 40


PRESETS = {
    "tiny": Preset("tiny", n_scans=5, chest_scale=(0.55, 0.6), max_voxels=2_500_000,
                   nodules_mean=2.0, max_nodules=3, p_no_nodules=0.0, max_diameter_mm=14.0,
                   n_micro=(1, 2), n_faint=(0, 1), n_vessel_candidates=40,
                   n_random_candidates=15),
    # 5 scans per subset with 6-8 nodules each: every held-out subset carries at least
    # 30 nodules (before the few that render under 3 mm and are excluded), so a held-out
    # CPM moves by ~0.03 per nodule instead of ~0.1.
    "default": Preset("default", n_scans=50, chest_scale=(0.9, 1.05), max_voxels=16_000_000,
                      nodules_mean=7.0, max_nodules=8, p_no_nodules=0.0,
                      max_diameter_mm=30.0, nodule_count=(6, 8)),
}


@dataclasses.dataclass
class GeneratedScan:
    """A generated scan in memory.

    Attributes:
      hu: (Z, Y, X) int16 Hounsfield units.
      lung_label: (Z, Y, X) uint8, 3 right lung, 4 left lung, 5 trachea (LUNA16 values).
      nodule_label: (Z, Y, X) uint8 instance labels, 0 background, k = nodules[k - 1].
      geometry: placement of the grid (identity direction).
      nodules: one dict per annotated nodule (world centre, diameter, scores, label).
      excluded: one dict per excluded finding (world centre, diameter or -1, kind).
      candidates: (K, 3) world (x, y, z) mm and (K,) int class, as lists of dicts.
    """

    hu: np.ndarray
    lung_label: np.ndarray
    nodule_label: np.ndarray
    geometry: Geometry
    nodules: list
    excluded: list
    candidates: list


MIN_ANNOTATED_MM = 3.0  # LUNA16: nodules >= 3 mm ...
MIN_READERS = 3  # ... marked by at least 3 of the 4 LIDC readers


def is_annotated(diameter_mm: float, n_readers: int) -> bool:
    """LUNA16's rule for ``annotations.csv``; every other finding is excluded."""
    return diameter_mm >= MIN_ANNOTATED_MM and n_readers >= MIN_READERS


def lidc_geometries(library) -> np.ndarray:
    """(S, 3) float64 voxel sizes (z, y, x) mm of the distinct LIDC scans in a library."""
    _, first = np.unique(library.scan_uid, return_index=True)
    return np.asarray(library.spacing_zyx)[np.sort(first)]


def _draw_grid(rng, preset: Preset, geometries: np.ndarray, scale: float):
    """Voxel size from a real LIDC scan and a grid that holds the chest."""
    extent = np.array([140.0 * 1.08 + 24.0, 2 * 85.0 * 1.05 + 8.0, 2 * 112.0 * 1.04 + 8.0]) * scale
    extent[1] = extent[2] = max(extent[1], extent[2])  # square slices, as in LIDC
    best = None
    for _ in range(100):
        sp = geometries[rng.integers(len(geometries))]
        shape = np.ceil(extent / sp).astype(int)
        if np.prod(shape) <= preset.max_voxels:
            return sp, shape
        if best is None or np.prod(shape) < np.prod(best[1]):
            best = (sp, shape)
    return best


def _pick_rows(rng, library, preset: Preset, n: int) -> np.ndarray:
    ok = np.flatnonzero(library.diameter_mm <= preset.max_diameter_mm)
    return rng.choice(ok, size=min(n, len(ok)), replace=False)


def _points_in(rng, mask: np.ndarray, n: int) -> np.ndarray:
    cells = np.argwhere(mask)
    if len(cells) == 0 or n <= 0:
        return np.zeros((0, 3))
    return cells[rng.integers(len(cells), size=n)] + rng.uniform(-0.5, 0.5, (n, 3))


def generate_scan(rng: np.random.Generator, preset: Preset, library) -> GeneratedScan:
    """Generates one scan.

    Args:
      rng: the scan's own random generator (consumed).
      preset: dataset preset.
      library: ``lungjax.data.lidc.NoduleLibrary`` of real LIDC consensus nodules.

    Returns:
      The scan, its masks and its findings (world coordinates).
    """
    scale = float(rng.uniform(*preset.chest_scale))
    sp, shape = _draw_grid(rng, preset, lidc_geometries(library), scale)
    chest = anatomy_lib.draw_chest(rng, shape * sp, scale)
    anat = anatomy_lib.render_anatomy(chest, shape, sp, rng)
    hu = anat.hu

    lung_side = np.zeros(shape, np.int8)
    lung_side[anat.lung_occ[0] >= 0.5] = 1
    lung_side[anat.lung_occ[1] >= 0.5] = 2

    # Annotated nodules: real LIDC shapes, sizes and scores.
    n_nod = 0
    if rng.random() >= preset.p_no_nodules:
        if preset.nodule_count:
            n_nod = int(rng.integers(preset.nodule_count[0], preset.nodule_count[1] + 1))
        else:
            n_nod = int(min(preset.max_nodules, 1 + rng.poisson(preset.nodules_mean - 1)))
    rows = _pick_rows(rng, library, preset, 3 * n_nod)  # spares for rows that do not fit
    placed = nodules_lib.place_nodules(rng, library, rows, lung_side, sp,
                                       juxtapleural_fraction=preset.juxtapleural_fraction)
    placed = placed[:n_nod]
    for nod in placed:
        nodules_lib.render_nodule(hu, nod, sp, rng)
    # LUNA16's reference standard: a nodule is annotated when at least 3 readers marked it
    # and it is at least 3 mm across; the others are excluded findings (neither hits nor
    # FPs). A library nodule can render under 3 mm (equivalent-sphere diameter at this
    # scan's resolution), so the rule is applied to what was rendered.
    rendered = placed
    keep = [is_annotated(n.diameter_mm, int(library.n_readers[n.library_index]))
            for n in rendered]
    placed = [n for n, k in zip(rendered, keep) if k]
    small = [n for n, k in zip(rendered, keep) if not k]
    nodule_label = np.zeros(shape, np.uint8)
    for k, nod in enumerate(placed, start=1):
        view = nodule_label[nod.slices]
        view[nod.occ >= 0.5] = k

    # Excluded findings: sub-3 mm nodules (no diameter, as LUNA16 lists them) and faint
    # opacities that the readers did not agree on (with a diameter).
    lung = lung_side > 0
    depth_ok = lung & (nodule_label == 0)
    excluded = [dict(kind="small_nodule", zyx=n.centre_zyx,
                     diameter_mm=-1.0 if n.diameter_mm < MIN_ANNOTATED_MM
                     else round(n.diameter_mm, 3)) for n in small]
    for kind, count, diam, value in (
            ("micro_nodule", rng.integers(preset.n_micro[0], preset.n_micro[1] + 1),
             (1.6, 2.9), nodules_lib.SOLID_HU),
            ("faint_opacity", rng.integers(preset.n_faint[0], preset.n_faint[1] + 1),
             (3.0, 6.0), (-650.0, -500.0))):
        for c in _points_in(rng, depth_ok, int(count)):
            if any(np.linalg.norm((c - n.centre_zyx) * sp) < n.diameter_mm + 6
                   for n in rendered):
                continue
            d = float(rng.uniform(*diam))
            nodules_lib.render_blob(hu, c, d, float(rng.uniform(*value)), sp)
            excluded.append(dict(kind=kind, zyx=c, diameter_mm=-1.0 if kind == "micro_nodule"
                                 else round(d, 3)))

    # CT noise, then integer HU as in a real scan.
    hu += rng.normal(0.0, rng.uniform(14.0, 28.0), shape).astype(np.float32)
    hu_i16 = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    lung_label = np.zeros(shape, np.uint8)
    lung_label[lung_side == 1] = 3
    lung_label[lung_side == 2] = 4
    for nod in placed:  # the nodule belongs to its lung, even where it bulges into the wall
        view = lung_label[nod.slices]
        view[(nod.occ >= 0.5) & (view == 0)] = 3 + nod.side
    lung_label[anat.airway_occ >= 0.5] = 5

    origin = np.array([-shape[2] * sp[2] / 2 + rng.uniform(-15, 15),
                       -shape[1] * sp[1] / 2 + rng.uniform(-15, 15),
                       rng.uniform(-400.0, -50.0)])
    geometry = Geometry(spacing=sp[::-1], origin=origin, direction=np.eye(3))

    nodules = []
    for k, nod in enumerate(placed, start=1):
        row = nod.library_index
        rec = dict(label=k, xyz=voxel_to_world(nod.centre_zyx, geometry).tolist(),
                   diameter_mm=nod.diameter_mm, density=nod.density, calcified=nod.calcified,
                   juxtapleural=nod.juxtapleural, library_index=row,
                   n_readers=int(library.n_readers[row]),
                   lidc_scan_uid=str(library.scan_uid[row]),
                   lidc_patient_id=str(library.patient_id[row]),
                   lidc_diameter_mm=float(library.diameter_mm[row]))
        rec.update({name: float(getattr(library, name)[row]) for name in SCORE_NAMES})
        nodules.append(rec)
    for e in excluded:
        e["xyz"] = voxel_to_world(e.pop("zyx"), geometry).tolist()

    candidates = _candidates(rng, preset, anat, placed, excluded, lung, sp, geometry)
    return GeneratedScan(hu_i16, lung_label, nodule_label, geometry, nodules, excluded,
                         candidates)


def _candidates(rng, preset, anat, placed, excluded, lung, sp, geometry) -> list:
    """LUNA16-style candidates: class 1 near each annotated nodule, class 0 on vessel
    bifurcations and segments (the look-alikes), at random lung points and on the
    excluded findings."""
    out = []
    for nod in placed:
        for _ in range(int(rng.integers(1, 4))):
            jitter_mm = rng.normal(0, 0.12 * nod.diameter_mm, 3)
            out.append((nod.centre_zyx + jitter_mm / sp, 1))
    # Vessel points, bifurcations first: thick enough to look like a nodule in section.
    p0 = np.concatenate([t.p0 for t in anat.vessels])
    p1 = np.concatenate([t.p1 for t in anat.vessels])
    r0 = np.concatenate([t.r0 for t in anat.vessels])
    fork = np.concatenate([t.branch for t in anat.vessels])
    thick = np.flatnonzero(r0 >= 0.8)
    if len(thick):
        weights = np.where(fork[thick], 3.0, 1.0)
        pick = rng.choice(thick, size=preset.n_vessel_candidates, p=weights / weights.sum())
        t = np.where(fork[pick], 0.0, rng.uniform(0, 1, len(pick)))[:, None]
        pts_mm = p0[pick] + t * (p1[pick] - p0[pick])
        out.extend((p / sp, 0) for p in pts_mm)
    out.extend((p, 0) for p in _points_in(rng, lung, preset.n_random_candidates))
    cands = []
    for zyx, cls in out:
        if not np.all((zyx >= -0.5) & (zyx <= np.asarray(lung.shape) - 0.5)):
            continue
        if cls == 0 and any(np.linalg.norm((zyx - n.centre_zyx) * sp) < 0.5 * n.diameter_mm + 3
                            for n in placed):
            continue  # LUNA16 never labels a point inside a nodule as class 0
        cands.append(dict(xyz=voxel_to_world(zyx, geometry).tolist(), label=cls))
    for e in excluded:
        cands.append(dict(xyz=list(e["xyz"]), label=0))
    return cands
