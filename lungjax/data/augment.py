"""Random 3D patch augmentation: pure numpy functions of (patch, rng).

Every transform works on one patch in (z, y, x) order and keeps track of where a
point of interest (a nodule centre) lands, so regression targets stay exact:

* flips along any of the three axes;
* rotations by 0/90/180/270 degrees in the transverse (y, x) plane;
* isotropic scaling (zoom about the patch centre, trilinear);
* translation within a radius, done before the crop (the crop centre moves), so a
  translated patch shows real anatomy instead of padding.

The order is fixed: crop (with translation) -> scale -> rotate -> flip. The
parameters of one draw are an ``AugmentParams``; ``draw_params`` samples them from an
``AugmentConfig`` and ``apply`` applies them. Translation and scaling decide what is
read from the store, so the pipeline calls ``read_size`` / ``resample`` around its
read; tests call the pieces on literal arrays.

Coordinates: point positions are absolute fractional voxel indices into the patch;
``relative_to_center`` gives offsets from the geometric centre ``(S - 1) / 2``, the
point every flip and rotation leaves in place.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from lungjax.configcheck import dataclass_from_mapping

_AXES = (0, 1, 2)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """What to randomise for one class of samples.

    Attributes:
      flip_axes: array axes (0 = z, 1 = y, 2 = x) each flipped with probability 1/2.
      rot90: rotate by k * 90 degrees in the (y, x) plane, k uniform in {0, 1, 2, 3}
        (only k in {0, 2} when the patch is not square in (y, x)).
      scale_range: (low, high) isotropic zoom factor drawn uniformly; (1, 1) = off.
        A factor above 1 magnifies (the patch shows a smaller region).
      translate_mm: radius in mm of the random shift of the crop centre for samples
        without a nodule diameter (negatives); 0 = off.
      translate_nodule_fraction: for samples with a diameter (positives), the shift
        radius is this fraction of the nodule radius; 0 = use ``translate_mm``.
    """

    flip_axes: tuple[int, ...] = ()
    rot90: bool = False
    scale_range: tuple[float, float] = (1.0, 1.0)
    translate_mm: float = 0.0
    translate_nodule_fraction: float = 0.0

    def __post_init__(self):
        axes = tuple(int(a) for a in self.flip_axes)
        if any(a not in _AXES for a in axes) or len(set(axes)) != len(axes):
            raise ValueError(f"augment.flip_axes must be distinct axes in (0, 1, 2), got {axes}")
        lo, hi = (float(v) for v in self.scale_range)
        if not (0 < lo <= hi):
            raise ValueError(f"augment.scale_range must satisfy 0 < low <= high, got {(lo, hi)}")
        if self.translate_mm < 0 or self.translate_nodule_fraction < 0:
            raise ValueError("augment.translate_mm and augment.translate_nodule_fraction "
                             "must be >= 0")
        object.__setattr__(self, "flip_axes", axes)
        object.__setattr__(self, "rot90", bool(self.rot90))
        object.__setattr__(self, "scale_range", (lo, hi))
        object.__setattr__(self, "translate_mm", float(self.translate_mm))
        object.__setattr__(self, "translate_nodule_fraction", float(self.translate_nodule_fraction))

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any] | None, name: str = "augment") -> "AugmentConfig":
        """Builds from a dict / ConfigDict, rejecting unknown fields by name."""
        return dataclass_from_mapping(cls, d, name)


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """One draw of augmentation parameters.

    Attributes:
      shift_zyx: (3,) int, voxel shift of the crop centre (applied before the crop).
      scale: zoom factor (1 = none).
      rot_k: number of 90-degree rotations in the (y, x) plane (np.rot90 sense).
      flips: (3,) bool, flip per axis (z, y, x), applied after the rotation.
    """

    shift_zyx: tuple[int, int, int] = (0, 0, 0)
    scale: float = 1.0
    rot_k: int = 0
    flips: tuple[bool, bool, bool] = (False, False, False)


IDENTITY = AugmentParams()


def random_ball_offset(rng: np.random.Generator, radius_zyx: Sequence[float]) -> np.ndarray:
    """Uniform integer offset among the lattice points of an ellipsoid.

    Args:
      rng: random generator.
      radius_zyx: (3,) float >= 0, semi-axes in voxels (z, y, x).

    Returns:
      (3,) int64 offset ``o`` with ``sum((o / r)^2) <= 1`` over axes with r > 0 and
      ``o = 0`` on axes with r = 0 (or r < 1: no lattice point off the axis).
    """
    r = np.asarray(radius_zyx, np.float64).reshape(3)
    if np.any(r < 0) or not np.all(np.isfinite(r)):
        raise ValueError(f"radius must be finite and >= 0, got {r.tolist()}")
    bound = np.floor(r).astype(np.int64)
    if not np.any(bound):
        return np.zeros(3, np.int64)
    safe = np.where(r > 0, r, 1.0)
    # Rejection from the bounding box is exact-uniform over lattice points; the
    # acceptance rate is >= ~0.5 in 3D so the loop ends quickly.
    while True:
        o = rng.integers(-bound, bound + 1)
        if np.sum((o / safe) ** 2) <= 1.0 + 1e-9:
            return o.astype(np.int64)


def draw_params(cfg: AugmentConfig, rng: np.random.Generator, *, spacing_zyx: Sequence[float],
                diameter_mm: float = 0.0, square_yx: bool = True,
                is_2d: bool = False) -> AugmentParams:
    """Draws one ``AugmentParams`` from ``cfg``.

    Args:
      cfg: what to randomise.
      rng: random generator (grain's per-element generator in the pipeline).
      spacing_zyx: (3,) mm voxel size of the stored grid, to turn mm radii into voxels.
      diameter_mm: nodule diameter of the sample (0 for negatives).
      square_yx: whether the output patch has H == W (else only 0/180 rotations).
      is_2d: single-slice patches: no z flip and no z shift.

    Returns:
      The parameters; draws happen in a fixed order so results are reproducible.
    """
    spacing = np.asarray(spacing_zyx, np.float64).reshape(3)
    if cfg.translate_nodule_fraction > 0 and diameter_mm > 0:
        radius_mm = cfg.translate_nodule_fraction * diameter_mm / 2.0
    else:
        radius_mm = cfg.translate_mm
    radius = radius_mm / spacing
    if is_2d:
        radius[0] = 0.0
    shift = random_ball_offset(rng, radius) if radius_mm > 0 else np.zeros(3, np.int64)
    lo, hi = cfg.scale_range
    scale = float(rng.uniform(lo, hi)) if hi > lo else lo
    rot_k = 0
    if cfg.rot90:
        rot_k = int(rng.integers(0, 4)) if square_yx else 2 * int(rng.integers(0, 2))
    flips = [False, False, False]
    for a in cfg.flip_axes:
        if not (is_2d and a == 0):
            flips[a] = bool(rng.integers(0, 2))
    return AugmentParams(tuple(int(v) for v in shift), scale, rot_k, tuple(flips))


# --------------------------------------------------------------------------- pieces


def flip(patch: np.ndarray, flips: Sequence[bool]) -> np.ndarray:
    """Flips a (z, y, x) patch along the axes where ``flips`` is True."""
    axes = tuple(a for a in _AXES if flips[a])
    return np.flip(patch, axis=axes) if axes else patch


def rot90_yx(patch: np.ndarray, k: int) -> np.ndarray:
    """Rotates a (z, y, x) patch by ``k`` quarter turns in the (y, x) plane (np.rot90)."""
    return np.rot90(patch, k % 4, axes=(1, 2))


def read_size(out_shape_zyx: Sequence[int], scale: float, is_2d: bool = False) -> tuple[int, ...]:
    """Size of the crop to read so that zooming by ``scale`` fills ``out_shape_zyx``.

    Zooming by s shows a region of S / s voxels; two extra voxels per axis cover
    the trilinear footprint at the borders. Unscaled reads are exactly the output
    size (a plain crop).
    """
    if scale == 1.0:
        return tuple(int(s) for s in out_shape_zyx)
    size = [int(math.ceil(s / scale)) + 2 for s in out_shape_zyx]
    if is_2d:
        size[0] = int(out_shape_zyx[0])
    return tuple(size)


def resample(crop: np.ndarray, out_shape_zyx: Sequence[int], scale: float,
             is_2d: bool = False, order: int = 1) -> np.ndarray:
    """Zooms ``crop`` by ``scale`` about its centre voxel into ``out_shape_zyx``.

    Output voxel ``o`` takes the trilinear value at input index
    ``R // 2 + (o - S // 2) / scale`` (per axis; R = crop size, S = output size),
    so the crop's centre voxel (the sample centre, see ``PatchStore.read_patch``)
    stays at the output's centre voxel. ``scale == 1`` with R == S is a copy.

    Args:
      crop: (R_z, R_y, R_x) float32, read with ``read_size``.
      out_shape_zyx: (S_z, S_y, S_x).
      scale: zoom factor.
      is_2d: do not scale along z.
      order: 1 = trilinear (images), 0 = nearest neighbour (masks and labels: no
        value is invented between classes).

    Returns:
      (S_z, S_y, S_x) float32.
    """
    out = tuple(int(s) for s in out_shape_zyx)
    if scale == 1.0 and crop.shape == out:
        return np.ascontiguousarray(crop, dtype=np.float32)
    inv = np.full(3, 1.0 / scale)
    if is_2d:
        inv[0] = 1.0
    r = np.asarray(crop.shape, np.float64)
    s = np.asarray(out, np.float64)
    offset = (r // 2) - (s // 2) * inv
    # mode="nearest" only matters within one voxel of the crop border; the crop
    # already carries the store's zero padding where the scan ends.
    return ndimage.affine_transform(np.asarray(crop, np.float32), inv, offset=offset,
                                    output_shape=out, order=order, mode="nearest")


def map_point(point_zyx: np.ndarray, crop_shape: Sequence[int], out_shape: Sequence[int],
              params: AugmentParams, is_2d: bool = False) -> np.ndarray:
    """Where a crop voxel position lands in the augmented patch.

    Args:
      point_zyx: (..., 3) float, absolute voxel index in the crop as read (before
        scaling); the crop's centre voxel is ``crop_shape // 2``.
      crop_shape: (3,) size of the crop as read.
      out_shape: (3,) size of the final patch (after rotation).
      params: the transform applied by ``apply``.
      is_2d: z was not scaled.

    Returns:
      (..., 3) float64 absolute voxel index in the augmented patch.
    """
    p = np.asarray(point_zyx, np.float64).copy()
    r = np.asarray(crop_shape, np.float64)
    out = np.asarray(out_shape, np.float64)
    k = params.rot_k % 4
    pre = out.copy()  # shape before the rotation
    if k % 2:
        pre[1], pre[2] = out[2], out[1]
    sc = np.full(3, params.scale)
    if is_2d:
        sc[0] = 1.0
    if params.scale != 1.0 or tuple(r) != tuple(pre):
        p = (pre // 2) + (p - r // 2) * sc
    z, y, x = p[..., 0], p[..., 1], p[..., 2]
    h, w = pre[1], pre[2]
    # Index maps of np.rot90(m, k, axes=(1, 2)).
    if k == 1:
        y, x = w - 1 - x, y
    elif k == 2:
        y, x = h - 1 - y, w - 1 - x
    elif k == 3:
        y, x = x, h - 1 - y
    p = np.stack([z, y, x], axis=-1)
    for a in _AXES:
        if params.flips[a]:
            p[..., a] = out[a] - 1 - p[..., a]
    return p


def relative_to_center(point_zyx: np.ndarray, shape_zyx: Sequence[int]) -> np.ndarray:
    """(..., 3) offset of an absolute voxel index from the geometric centre (S - 1) / 2."""
    return np.asarray(point_zyx, np.float64) - (np.asarray(shape_zyx, np.float64) - 1.0) / 2.0


def apply(crop: np.ndarray, out_shape_zyx: Sequence[int], params: AugmentParams,
          is_2d: bool = False, order: int = 1) -> np.ndarray:
    """Scale -> rotate -> flip a crop read at ``read_size`` around the shifted centre.

    Args:
      crop: (R_z, R_y, R_x) float32, the crop as read (translation already applied
        by moving its centre).
      out_shape_zyx: (S_z, S_y, S_x), final patch shape.
      params: the draw.
      is_2d: single-slice patch (no z scaling).
      order: interpolation of the zoom, 1 = trilinear (images), 0 = nearest (masks);
        the same params applied to an image and to its mask keep them aligned.

    Returns:
      (S_z, S_y, S_x) float32, C-contiguous.
    """
    out = tuple(int(s) for s in out_shape_zyx)
    pre = rotated_input_shape(out, params.rot_k)
    x = resample(crop, pre, params.scale, is_2d, order)
    x = rot90_yx(x, params.rot_k)
    x = flip(x, params.flips)
    return np.ascontiguousarray(x, dtype=np.float32)


def rotated_input_shape(out_shape_zyx: Sequence[int], rot_k: int) -> tuple[int, int, int]:
    """Shape before a (y, x) rotation by ``rot_k`` quarter turns that yields ``out_shape``."""
    d, h, w = (int(s) for s in out_shape_zyx)
    return (d, w, h) if rot_k % 2 else (d, h, w)
