"""Nodules for the generated dataset: real LIDC consensus shapes resampled onto the
scan grid, placed inside the lungs, with a density chosen from the LIDC texture and
calcification scores; plus the small findings that LUNA16 lists as excluded.

Grid conventions as in ``synthetic_anatomy``: arrays (z, y, x); positions are voxel
coordinates (z, y, x) unless named ``*_mm``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

# Densities (HU) by LIDC texture class: ground glass (texture <= 2), part solid
# (2 < texture < 4: ground glass with a solid core), solid (>= 4).
GGO_HU = (-600.0, -300.0)
SOLID_HU = (0.0, 100.0)
CALCIFIED_HU = (250.0, 600.0)


@dataclasses.dataclass
class PlacedNodule:
    """A library nodule rendered on the scan grid.

    Attributes:
      library_index: row in the LIDC nodule library.
      lo: (3,) int, voxel index (z, y, x) of the patch's first voxel.
      occ: (pz, py, px) float32 occupancy in [0, 1] (partial volume).
      centre_zyx: (3,) float64 occupancy-weighted centre, voxel coordinates.
      diameter_mm: equivalent-sphere diameter of the rendered nodule (occupancy sum).
      density: "ground_glass" | "part_solid" | "solid".
      calcified: whether the core is calcified (LIDC calcification score < 6).
      side: 0 right lung, 1 left lung.
      juxtapleural: placed touching the lung wall.
    """

    library_index: int
    lo: np.ndarray
    occ: np.ndarray
    centre_zyx: np.ndarray
    diameter_mm: float
    density: str
    calcified: bool
    side: int
    juxtapleural: bool

    @property
    def slices(self) -> tuple:
        return tuple(slice(a, a + n) for a, n in zip(self.lo, self.occ.shape))


def density_class(texture: float) -> str:
    """LIDC median texture score (1 non-solid ... 5 solid) -> density class."""
    if texture <= 2.0:
        return "ground_glass"
    if texture < 4.0:
        return "part_solid"
    return "solid"


def resample_mask(mask: np.ndarray, src_spacing_zyx, dst_spacing_zyx, centre_zyx,
                  angle: float, flip_x: bool, volume_shape) -> tuple[np.ndarray, np.ndarray]:
    """Resamples a binary mask onto the scan grid around a given centre.

    The mask is rotated by ``angle`` about the z axis (and optionally mirrored in x)
    only: out-of-plane rotation would smear the thick LIDC slices across the nodule.

    Args:
      mask: (Z, Y, X) bool in its native grid.
      src_spacing_zyx: (3,) its voxel size, mm.
      dst_spacing_zyx: (3,) the scan's voxel size, mm.
      centre_zyx: (3,) float, where the mask's centre of mass lands, scan voxels.
      angle: rotation about z, radians.
      flip_x: mirror left-right.
      volume_shape: (3,) scan shape, to clip the patch.

    Returns:
      (lo, occ): (3,) int first voxel of the patch and (pz, py, px) float32
      occupancy in [0, 1], smoothed by about half a millimetre of partial volume.
    """
    src_sp = np.asarray(src_spacing_zyx, np.float64)
    dst_sp = np.asarray(dst_spacing_zyx, np.float64)
    pts = np.argwhere(mask)
    c_src = pts.mean(axis=0)
    reach_mm = np.sqrt((((pts - c_src) * src_sp) ** 2).sum(axis=1)).max() + 2.0 * src_sp.max()
    centre = np.asarray(centre_zyx, np.float64)
    lo = np.maximum(np.floor(centre - reach_mm / dst_sp).astype(int), 0)
    hi = np.minimum(np.ceil(centre + reach_mm / dst_sp).astype(int) + 1, volume_shape)
    grids = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
    off = [(g - c) * s for g, c, s in zip(grids, centre, dst_sp)]  # mm, (z, y, x)
    cos, sin = np.cos(angle), np.sin(angle)
    oy = cos * off[1] + sin * off[2]
    ox = -sin * off[1] + cos * off[2]
    if flip_x:
        ox = -ox
    coords = np.stack([off[0] / src_sp[0] + c_src[0], oy / src_sp[1] + c_src[1],
                       ox / src_sp[2] + c_src[2]])
    occ = ndimage.map_coordinates(mask.astype(np.float32), coords, order=1, cval=0.0)
    occ = ndimage.gaussian_filter(occ, 0.5 / dst_sp, mode="constant")
    return lo, np.clip(occ, 0.0, 1.0).astype(np.float32)


def _placement_depth(lung: np.ndarray, spacing_zyx, step_mm: float = 2.0):
    """Depth inside the lung (mm to the nearest non-lung voxel) on a coarse grid.

    Returns:
      (depth, stride): (cz, cy, cx) float32 depth of voxels ``lung[::s0, ::s1, ::s2]``
      and the (3,) int stride.
    """
    sp = np.asarray(spacing_zyx, np.float64)
    stride = np.maximum(np.round(step_mm / sp).astype(int), 1)
    sub = lung[::stride[0], ::stride[1], ::stride[2]]
    depth = ndimage.distance_transform_edt(np.pad(sub, 1), sampling=sp * stride)[1:-1, 1:-1, 1:-1]
    return depth.astype(np.float32), stride


def place_nodules(rng: np.random.Generator, library, rows, lung_side: np.ndarray,
                  spacing_zyx, *, juxtapleural_fraction: float, max_tries: int = 40):
    """Places library nodules inside the lungs, apart from one another.

    Args:
      rng: random generator (consumed).
      library: ``lungjax.data.lidc.NoduleLibrary``.
      rows: library rows to place, in order; a row that does not fit is skipped.
      lung_side: (Z, Y, X) int8, 0 outside, 1 right lung, 2 left lung.
      spacing_zyx: (3,) scan voxel size, mm.
      juxtapleural_fraction: share of nodules placed touching the lung wall.
      max_tries: placements tried per nodule.

    Returns:
      List of PlacedNodule.
    """
    sp = np.asarray(spacing_zyx, np.float64)
    depth, stride = _placement_depth(lung_side > 0, sp)
    side_coarse = lung_side[::stride[0], ::stride[1], ::stride[2]]
    placed: list[PlacedNodule] = []
    voxel_mm3 = float(np.prod(sp))
    for row in rows:
        mask = library.mask(row)
        radius = 0.5 * float(library.diameter_mm[row])
        pts = np.argwhere(mask)
        extent = np.sqrt((((pts - pts.mean(0)) * library.spacing_zyx[row]) ** 2).sum(1)).max()
        juxta = bool(rng.random() < juxtapleural_fraction)
        if juxta:  # centre about one radius deep: the nodule touches the pleura
            ok = (depth > 0.6 * radius) & (depth < max(radius, 1.5))
        else:
            ok = depth > extent + 2.0
        cells = np.argwhere(ok)
        for _ in range(max_tries if len(cells) else 0):
            cell = cells[rng.integers(len(cells))]
            centre = cell * stride + rng.uniform(-0.5, 0.5, 3) * stride
            if any(np.linalg.norm((centre - p.centre_zyx) * sp)
                   < extent + 0.5 * p.diameter_mm + 4.0 for p in placed):
                continue
            lo, occ = resample_mask(mask, library.spacing_zyx[row], sp, centre,
                                    rng.uniform(0, 2 * np.pi), bool(rng.random() < 0.5),
                                    lung_side.shape)
            inside = occ >= 0.5
            if inside.sum() < 2:
                break  # too small to show at this resolution: skip this row
            grids = np.indices(occ.shape).reshape(3, -1).T + lo
            w = occ.reshape(-1)
            placed.append(PlacedNodule(
                library_index=int(row), lo=lo, occ=occ,
                centre_zyx=(grids * w[:, None]).sum(0) / w.sum(),
                # Volume from the occupancy sum, which resampling preserves.
                diameter_mm=float(np.cbrt(6.0 * occ.sum() * voxel_mm3 / np.pi)),
                density=density_class(float(library.texture[row])),
                calcified=bool(library.calcification[row] < 5.5),
                side=int(side_coarse[tuple(cell)]) - 1, juxtapleural=juxta))
            break
    return placed


def render_nodule(hu: np.ndarray, nodule: PlacedNodule, spacing_zyx,
                  rng: np.random.Generator) -> None:
    """Draws a nodule into a HU volume in place.

    The density is blended by partial volume and combined with a maximum, so vessels
    running through a ground-glass nodule stay visible, as they do on real CT.
    """
    sp = np.asarray(spacing_zyx, np.float64)
    occ = nodule.occ
    core_depth = ndimage.distance_transform_edt(occ >= 0.5, sampling=sp)
    radius = 0.5 * nodule.diameter_mm
    if nodule.density == "solid":
        value = np.full(occ.shape, rng.uniform(*SOLID_HU), np.float32)
    else:
        value = np.full(occ.shape, rng.uniform(*GGO_HU), np.float32)
        if nodule.density == "part_solid":
            core = np.clip((core_depth - 0.45 * radius) / 0.8 + 0.5, 0, 1)
            value += core * (rng.uniform(*SOLID_HU) - value)
    if nodule.calcified:
        core = np.clip((core_depth - 0.35 * radius) / 0.8 + 0.5, 0, 1)
        value += core * (rng.uniform(*CALCIFIED_HU) - value)
    value += rng.normal(0.0, 12.0, occ.shape).astype(np.float32)
    view = hu[nodule.slices]
    np.maximum(view, view + occ * (value - view), out=view)


def render_blob(hu: np.ndarray, centre_zyx, diameter_mm: float, value_hu: float,
                spacing_zyx) -> None:
    """Draws a small sphere (an excluded finding) into a HU volume in place."""
    sp = np.asarray(spacing_zyx, np.float64)
    r = 0.5 * diameter_mm
    centre = np.asarray(centre_zyx, np.float64)
    lo = np.maximum(np.floor(centre - (r + 2) / sp).astype(int), 0)
    hi = np.minimum(np.ceil(centre + (r + 2) / sp).astype(int) + 1, hu.shape)
    axes = [(np.arange(a, b) - c) * s for a, b, c, s in zip(lo, hi, centre, sp)]
    dist = np.sqrt(axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2
                   + axes[2][None, None, :] ** 2)
    soft = float(np.cbrt(np.prod(sp)))
    occ = np.clip(0.5 + (r - dist) / soft, 0, 1).astype(np.float32)
    view = hu[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    np.maximum(view, view + occ * (value_hu - view), out=view)
