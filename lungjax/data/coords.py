"""World <-> voxel coordinates: the one place that knows the convention.

Conventions used everywhere in lungjax:

* Volumes are numpy/JAX arrays in **(z, y, x)** axis order (what
  ``SimpleITK.GetArrayFromImage`` returns).
* World coordinates are **(x, y, z)** in millimetres, as in the LUNA16 CSV files
  (``coordX, coordY, coordZ``) and in MetaImage headers.
* Voxel coordinates are **(z, y, x)** floats; integer values are voxel centres.
* ``Geometry`` keeps ITK's own (x, y, z) order for spacing, origin and direction,
  so it can be copied to and from a SimpleITK image without reordering.

The mapping is ITK's: ``world = origin + direction @ (index_xyz * spacing)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Placement of a voxel grid in world space.

    Attributes:
      spacing: (3,) float64, voxel size in mm along (x, y, z).
      origin: (3,) float64, world (x, y, z) mm of the centre of voxel (0, 0, 0).
      direction: (3, 3) float64, column c is the world direction of index axis c
        (x, y, z); identity for a standard axial LUNA16 scan.
    """

    spacing: np.ndarray
    origin: np.ndarray
    direction: np.ndarray

    def __post_init__(self):
        spacing = np.asarray(self.spacing, dtype=np.float64).reshape(3)
        origin = np.asarray(self.origin, dtype=np.float64).reshape(3)
        direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise ValueError(f"spacing must be finite and positive, got {spacing.tolist()}")
        if not np.all(np.isfinite(origin)):
            raise ValueError(f"origin must be finite, got {origin.tolist()}")
        if abs(abs(np.linalg.det(direction)) - 1.0) > 1e-3:
            raise ValueError(f"direction must be orthonormal, got {direction.tolist()}")
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", direction)

    @classmethod
    def identity(cls, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> "Geometry":
        return cls(np.asarray(spacing), np.asarray(origin), np.eye(3))

    @classmethod
    def from_sitk(cls, image: Any) -> "Geometry":
        """Geometry of a ``SimpleITK.Image``."""
        return cls(
            np.asarray(image.GetSpacing()),
            np.asarray(image.GetOrigin()),
            np.asarray(image.GetDirection()).reshape(3, 3),
        )

    def apply_to_sitk(self, image: Any) -> None:
        """Writes this geometry into a ``SimpleITK.Image`` in place."""
        image.SetSpacing(tuple(float(v) for v in self.spacing))
        image.SetOrigin(tuple(float(v) for v in self.origin))
        image.SetDirection(tuple(float(v) for v in self.direction.reshape(-1)))

    @property
    def spacing_zyx(self) -> np.ndarray:
        """(3,) float64 voxel size in mm in array axis order (z, y, x)."""
        return self.spacing[::-1].copy()

    def to_json(self) -> dict:
        return {
            "spacing_xyz": self.spacing.tolist(),
            "origin_xyz": self.origin.tolist(),
            "direction": self.direction.reshape(-1).tolist(),
        }

    @classmethod
    def from_json(cls, d: dict) -> "Geometry":
        return cls(np.asarray(d["spacing_xyz"]), np.asarray(d["origin_xyz"]),
                   np.asarray(d["direction"]).reshape(3, 3))

    def shifted(self, offset_zyx) -> "Geometry":
        """Geometry of a sub-grid whose voxel (0, 0, 0) is ``offset_zyx`` of this one."""
        return Geometry(self.spacing, voxel_to_world(np.asarray(offset_zyx, np.float64), self),
                        self.direction)


def voxel_to_world(voxel_zyx: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Maps voxel coordinates to world millimetres.

    Args:
      voxel_zyx: (..., 3) float, voxel coordinates in (z, y, x) order.
      geometry: the grid's placement.

    Returns:
      (..., 3) float64 world coordinates in (x, y, z) mm.
    """
    v = np.asarray(voxel_zyx, dtype=np.float64)[..., ::-1]  # -> index (x, y, z)
    return geometry.origin + (v * geometry.spacing) @ geometry.direction.T


def world_to_voxel(world_xyz: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Maps world millimetres to (fractional) voxel coordinates.

    Args:
      world_xyz: (..., 3) float, world coordinates in (x, y, z) mm.
      geometry: the grid's placement.

    Returns:
      (..., 3) float64 voxel coordinates in (z, y, x) order.
    """
    w = np.asarray(world_xyz, dtype=np.float64) - geometry.origin
    # direction is orthonormal, so its inverse is its transpose.
    index_xyz = (w @ geometry.direction) / geometry.spacing
    return index_xyz[..., ::-1]


def inside_grid(voxels: np.ndarray, shape) -> np.ndarray:
    """(N,) bool: (N, 3) voxel coordinates fall within a grid of ``shape`` (half a voxel
    of slack: the voxel's own extent)."""
    voxels = np.asarray(voxels).reshape(-1, 3)
    return np.all((voxels >= -0.5) & (voxels <= np.asarray(shape) - 0.5), axis=1)


def within_sphere(points: np.ndarray, centres: np.ndarray, radii: np.ndarray,
                  spacing: np.ndarray | None = None) -> np.ndarray:
    """Whether each point lies strictly inside its sphere: |p - c| < r.

    The official LUNA16 evaluation's rule (``noduleCADEvaluationLUNA16.py``): a point at
    exactly the radius is outside. Every hit test in lungjax (FROC matching, screening
    figures, sampler exclusions) goes through this one function.

    The arguments broadcast against each other, so ``within_sphere(p[:, None], c[None],
    r[None])`` gives the (P, C) table of every point against every sphere, and
    ``within_sphere(p[i], c[j], r[j])`` tests given (point, sphere) pairs. The squared
    distance is (d0^2 + d1^2) + d2^2 in float64, in the axis order given, compared with
    r^2; no square root is taken.

    Args:
      points: (..., 3) world (x, y, z) mm, or voxel (z, y, x) with ``spacing``.
      centres: (..., 3) sphere centres, in the same frame and axis order as ``points``.
      radii: (...) sphere radii in mm.
      spacing: None for world points; for voxel points, the (3,) voxel size in mm in the
        points' axis order (z, y, x), which scales each coordinate difference to mm.

    Returns:
      (...) bool, the broadcast shape of points[..., 0], centres[..., 0] and radii.
    """
    d = np.asarray(points, np.float64) - np.asarray(centres, np.float64)
    if spacing is not None:
        d = d * np.asarray(spacing, np.float64)
    d2 = d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1] + d[..., 2] * d[..., 2]
    r = np.asarray(radii, np.float64)
    return d2 < r * r
