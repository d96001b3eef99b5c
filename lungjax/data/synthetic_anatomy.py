"""Synthetic chest anatomy for the generated dataset: body, fat, bone, lungs, trachea
and a branching pulmonary vessel tree, rendered with partial-volume edges.

Everything here works in the *grid frame*: millimetres along the array axes
(z, y, x), with (0, 0, 0) at the centre of voxel (0, 0, 0). Because generated scans
have an identity direction matrix, the grid frame is the world frame shifted by the
origin and with its axes reversed; ``lungjax.data.coords`` does the final mapping.

Anatomical orientation follows LUNA16/DICOM (LPS): x grows towards the patient's
left (so the right lung has the smaller x), y grows towards the back, z grows
towards the head.

Shapes are analytic signed distances (negative inside, in mm, approximate away from
the surface), so an occupancy with a soft one-voxel edge is ``clip(0.5 - sd / h)``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

# Hounsfield values of the tissues (means; per-scan values are drawn around them).
AIR_HU = -1000.0
FAT_HU = -100.0
SOFT_TISSUE_HU = 40.0
LUNG_HU = -850.0
BONE_HU = 450.0

RIGHT, LEFT = -1, 1  # side sign along x (LPS: patient's left has the larger x)


@dataclasses.dataclass(frozen=True)
class Tubes:
    """Truncated cones (capsules with linearly varying radius) in the grid frame.

    Attributes:
      p0: (N, 3) float64 start points, grid mm (z, y, x).
      p1: (N, 3) float64 end points.
      r0: (N,) float64 radius at p0, mm.
      r1: (N,) float64 radius at p1, mm.
      branch: (N,) bool, True where the segment starts a new branch (its start is a
        bifurcation of the tree).
    """

    p0: np.ndarray
    p1: np.ndarray
    r0: np.ndarray
    r1: np.ndarray
    branch: np.ndarray

    def __len__(self) -> int:
        return len(self.r0)


@dataclasses.dataclass(frozen=True)
class Chest:
    """Parameters of one synthetic chest, all in grid mm.

    The chest's own frame is u = x - xc (left-right), v = y - yc (front-back),
    w = z - z0 (height above the lowest point of the lungs).
    """

    xc: float
    yc: float
    z0: float
    body_a: float  # half width of the body
    body_b: float  # half depth
    body_p: float  # superellipse exponent (2 = ellipse; larger = squarer)
    fat: float  # subcutaneous fat thickness
    lung_x: float  # |u| of each lung's centre
    lung_y: float  # v of the lungs' centre
    lung_a: float  # lung half width
    lung_b: float  # lung half depth
    lung_h: float  # lung height (w from 0 to lung_h)
    dome: float  # height of the diaphragm dome above the costophrenic recess
    apex: float  # height over which the lung tapers to its apex
    heart: tuple  # (u, v, w, a, b, c) ellipsoid
    spine_v: float
    spine_r: float
    trachea_v: float
    trachea_r: float
    carina_w: float
    hilum_w: float
    lung_hu: float
    soft_hu: float
    fat_hu: float
    vessel_hu: float

    # ---- shapes -------------------------------------------------------------

    def body_sd(self, y, x, inset: float = 0.0):
        """Signed distance (mm, approximate) to the body outline shrunk by ``inset``."""
        a, b = self.body_a - inset, self.body_b - inset
        p = self.body_p
        rho = (np.abs((x - self.xc) / a) ** p + np.abs((y - self.yc) / b) ** p) ** (1.0 / p)
        return (rho - 1.0) * min(a, b)

    def lung_centre_x(self, side: int) -> float:
        return self.xc + side * self.lung_x

    def lung_sd(self, z, y, x, side: int):
        """Signed distance (mm, approximate) to one lung; broadcasts z, y, x."""
        u = (x - self.lung_centre_x(side)) / self.lung_a
        v = (y - (self.yc + self.lung_y)) / self.lung_b
        w = z - self.z0
        rho = np.sqrt(u * u + v * v)
        # Cross-section shrinks like a dome towards the apex.
        taper = np.sqrt(np.clip((self.lung_h - w) / self.apex, 0.0, 1.0))
        m = min(self.lung_a, self.lung_b)
        sd = (rho - taper) * m
        # Diaphragm: the floor rises towards the middle of each lung.
        floor = self.dome * (1.0 - np.minimum(rho, 1.0) ** 2)
        sd = np.maximum(sd, floor - w)
        # Heart and spine push into the lungs.
        hu, hv, hw, ha, hb, hc = self.heart
        rho_h = np.sqrt(((x - self.xc - hu) / ha) ** 2 + ((y - self.yc - hv) / hb) ** 2
                        + ((w - hw) / hc) ** 2)
        sd = np.maximum(sd, (1.0 - rho_h) * min(ha, hb, hc))
        d_spine = np.sqrt((x - self.xc) ** 2 + (y - self.yc - self.spine_v) ** 2)
        sd = np.maximum(sd, self.spine_r + 6.0 - d_spine)
        return sd

    def lung_box(self, side: int, margin: float = 2.0):
        """(lo, hi) grid-mm bounds (z, y, x) of one lung."""
        cx = self.lung_centre_x(side)
        cy = self.yc + self.lung_y
        lo = np.array([self.z0, cy - self.lung_b, cx - self.lung_a]) - margin
        hi = np.array([self.z0 + self.lung_h, cy + self.lung_b, cx + self.lung_a]) + margin
        return lo, hi

    def hilum(self, side: int) -> np.ndarray:
        """(3,) grid mm (z, y, x) where the main bronchus and vessels enter a lung."""
        return np.array([self.z0 + self.hilum_w, self.yc + self.lung_y - 0.1 * self.lung_b,
                         self.lung_centre_x(side) - side * 0.55 * self.lung_a])


def draw_chest(rng: np.random.Generator, extent_mm: np.ndarray, scale: float) -> Chest:
    """Draws the parameters of a chest that fits a field of view.

    Args:
      rng: random generator (consumed).
      extent_mm: (3,) float, field of view (z, y, x) in mm of the grid.
      scale: overall size factor; 1.0 is a small adult chest (body ~ 224 mm wide).

    Returns:
      The chest, centred in x and y, its lungs centred in z.
    """
    s = scale

    def u(lo, hi):
        return float(rng.uniform(lo, hi))

    lung_h = 140.0 * s * u(0.92, 1.08)
    return Chest(
        xc=extent_mm[2] / 2 + u(-3, 3), yc=extent_mm[1] / 2 + u(-3, 3),
        z0=(extent_mm[0] - lung_h) / 2 + u(-2, 2),
        body_a=112.0 * s * u(0.96, 1.04), body_b=85.0 * s * u(0.95, 1.05), body_p=u(2.1, 2.6),
        fat=u(6.0, 14.0) * s,
        lung_x=44.0 * s, lung_y=3.0 * s, lung_a=40.0 * s * u(0.95, 1.03),
        lung_b=50.0 * s * u(0.95, 1.03), lung_h=lung_h, dome=24.0 * s * u(0.8, 1.2),
        apex=0.4 * lung_h,
        heart=(14.0 * s, -22.0 * s, 0.25 * lung_h, 40.0 * s * u(0.9, 1.1), 34.0 * s,
               0.27 * lung_h),
        spine_v=85.0 * s - 34.0 * s, spine_r=15.0 * s,
        trachea_v=-8.0 * s, trachea_r=8.0 * s * u(0.85, 1.1), carina_w=0.66 * lung_h,
        hilum_w=0.55 * lung_h,
        lung_hu=LUNG_HU + u(-40, 40), soft_hu=SOFT_TISSUE_HU + u(-10, 10),
        fat_hu=FAT_HU + u(-15, 15), vessel_hu=SOFT_TISSUE_HU + u(-15, 25),
    )


# ---- tube structures ---------------------------------------------------------

def _unit(v):
    return v / np.linalg.norm(v)


def _rotate_away(d: np.ndarray, angle: float, rng: np.random.Generator) -> np.ndarray:
    """Unit vector at ``angle`` radians from unit ``d``, around a random axis."""
    a = rng.standard_normal(3)
    a -= a.dot(d) * d
    a = _unit(a)
    return np.cos(angle) * d + np.sin(angle) * a


def grow_vessel_tree(chest: Chest, side: int, rng: np.random.Generator,
                     min_radius: float = 0.4) -> Tubes:
    """Grows one lung's vessel tree from its hilum.

    Each branch heads for a point drawn from a cloud spread through the lung (so the
    tree fills the lung rather than piling up along the pleura), in a few slightly
    bent segments whose length scales with its radius. At its end it forks into a
    thicker child that keeps close to its heading and a thinner one that turns
    further. A branch stops where it would leave the lung or gets thinner than
    ``min_radius`` mm (below CT resolution).

    Returns:
      The tree's segments (grid mm).
    """
    s = chest.lung_a / 40.0
    hilum = chest.hilum(side)
    lo, hi = chest.lung_box(side, margin=0.0)
    pool = rng.uniform(lo, hi, size=(6000, 3))
    pool = pool[chest.lung_sd(pool[:, 0], pool[:, 1], pool[:, 2], side) < -3.0]
    flip = np.array([1.0, 1.0, side])
    roots = [  # (heading, radius): upper, middle and lower lobe arteries and veins
        (_unit(np.array([1.0, 0.1, 0.45]) * flip), 3.6 * s),
        (_unit(np.array([0.15, 0.45, 1.0]) * flip), 3.2 * s),
        (_unit(np.array([-0.3, -0.6, 0.8]) * flip), 3.0 * s),
        (_unit(np.array([-1.0, 0.25, 0.4]) * flip), 3.8 * s),
        (_unit(np.array([-0.6, 0.8, 0.3]) * flip), 3.4 * s),
    ]
    p0s, p1s, r0s, r1s, branch = [], [], [], [], []
    stack = [(hilum + rng.normal(0, 2.0 * s, 3), d, r, 0.8) for d, r in roots]
    max_segments = 12000
    n_sub = 3
    while stack and len(r0s) < max_segments:
        q, d, r, max_angle = stack.pop()
        want = r * rng.uniform(5.0, 8.0) + 2.0
        # Choose where to head: a pulling point ahead, reachable inside the lung.
        picks = pool[rng.integers(0, len(pool), 64)] - q
        dist = np.linalg.norm(picks, axis=1) + 1e-6
        cosang = picks @ d / dist
        order = np.argsort(-(cosang > np.cos(max_angle)).astype(float) * (1.0 + rng.random(len(picks))))
        end = None
        for j in order[:10]:
            if cosang[j] <= np.cos(max_angle) or dist[j] < 2.0 * r:
                break
            length = min(want, 0.8 * dist[j])
            cand = q + picks[j] / dist[j] * length
            if chest.lung_sd(cand[0], cand[1], cand[2], side) < -r - 0.5:
                end, heading = cand, picks[j] / dist[j]
                break
        if end is None:
            continue
        r_end = r * 0.95
        for k in range(n_sub):
            # Gentle bends between the branch's ends.
            t1 = (k + 1) / n_sub
            q_next = q + (end - q) / (n_sub - k)
            if k < n_sub - 1:
                q_next = q_next + rng.normal(0, 0.06 * length, 3)
            p0s.append(q), p1s.append(q_next)
            r0s.append(r + (r_end - r) * k / n_sub), r1s.append(r + (r_end - r) * t1)
            branch.append(k == 0)
            q = q_next
        for frac, angle in ((rng.uniform(0.78, 0.9), 0.8), (rng.uniform(0.58, 0.78), 1.3)):
            rc = r_end * frac
            if rc >= min_radius:
                stack.append((q, _rotate_away(heading, 0.5 * angle, rng), rc, angle))
    return Tubes(np.asarray(p0s).reshape(-1, 3), np.asarray(p1s).reshape(-1, 3),
                 np.asarray(r0s), np.asarray(r1s), np.asarray(branch, bool))


def airway_tubes(chest: Chest, top_mm: float) -> Tubes:
    """Trachea from above the field of view down to the carina, and the two main bronchi."""
    tz = top_mm + 20.0
    top = np.array([tz, chest.yc + chest.trachea_v, chest.xc])
    carina = np.array([chest.z0 + chest.carina_w, chest.yc + chest.trachea_v, chest.xc])
    p0, p1, r0, r1 = [top], [carina], [chest.trachea_r], [chest.trachea_r]
    for side in (RIGHT, LEFT):
        h = chest.hilum(side)
        end = carina + 0.85 * (h - carina)
        p0.append(carina), p1.append(end), r0.append(0.75 * chest.trachea_r)
        r1.append(0.55 * chest.trachea_r)
    return Tubes(np.asarray(p0), np.asarray(p1), np.asarray(r0), np.asarray(r1),
                 np.zeros(len(r0), bool))


def rib_tubes(chest: Chest, rng: np.random.Generator, n_ribs: int = 9) -> Tubes:
    """Ribs as bent tubes around the lungs, sloping down towards the front."""
    p0, p1, r0, r1 = [], [], [], []
    inset = chest.fat + 9.0 * chest.lung_a / 40.0
    a, b = chest.body_a - inset, chest.body_b - inset
    radius = 3.6 * chest.lung_a / 40.0
    drop = 0.25 * chest.lung_h
    phis = np.linspace(np.deg2rad(80), np.deg2rad(-60), 12)
    for k in range(n_ribs):
        zk = chest.z0 + chest.lung_h * (0.2 + 0.95 * k / (n_ribs - 1)) + rng.uniform(-2, 2)
        for side in (RIGHT, LEFT):
            pts = []
            for j, phi in enumerate(phis):
                z = zk - drop * j / (len(phis) - 1)
                pts.append([z, chest.yc + b * np.sin(phi), chest.xc + side * a * np.cos(phi)])
            pts = np.asarray(pts)
            p0.extend(pts[:-1]), p1.extend(pts[1:])
            r0.extend([radius] * (len(pts) - 1)), r1.extend([radius] * (len(pts) - 1))
    return Tubes(np.asarray(p0), np.asarray(p1), np.asarray(r0), np.asarray(r1),
                 np.zeros(len(r0), bool))


def render_tubes(field: np.ndarray, spacing_zyx: np.ndarray, tubes: Tubes,
                 soft: float) -> None:
    """Adds tubes to an occupancy field in place (pointwise maximum).

    Args:
      field: (Z, Y, X) float32 occupancy in [0, 1], updated in place.
      spacing_zyx: (3,) voxel size in mm.
      tubes: segments in grid mm.
      soft: width in mm of the partial-volume ramp at the tube wall (about one voxel).
    """
    shape = np.asarray(field.shape)
    sp = np.asarray(spacing_zyx, np.float64)
    for p0, p1, r0, r1 in zip(tubes.p0, tubes.p1, tubes.r0, tubes.r1):
        reach = max(r0, r1) + soft
        lo = np.maximum(np.floor((np.minimum(p0, p1) - reach) / sp).astype(int), 0)
        hi = np.minimum(np.ceil((np.maximum(p0, p1) + reach) / sp).astype(int) + 1, shape)
        if np.any(hi <= lo):
            continue
        z = (np.arange(lo[0], hi[0]) * sp[0] - p0[0]).astype(np.float32)[:, None, None]
        y = (np.arange(lo[1], hi[1]) * sp[1] - p0[1]).astype(np.float32)[None, :, None]
        x = (np.arange(lo[2], hi[2]) * sp[2] - p0[2]).astype(np.float32)[None, None, :]
        d = (p1 - p0).astype(np.float32)
        t = (z * d[0] + y * d[1] + x * d[2]) / max(float(d @ d), 1e-9)
        np.clip(t, 0.0, 1.0, out=t)
        dist = np.sqrt((z - t * d[0]) ** 2 + (y - t * d[1]) ** 2 + (x - t * d[2]) ** 2)
        occ = np.clip(0.5 + (r0 + t * (r1 - r0) - dist) / soft, 0.0, 1.0)
        view = field[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        np.maximum(view, occ, out=view)


# ---- the volume ----------------------------------------------------------------

@dataclasses.dataclass
class Anatomy:
    """A rendered chest before nodules and noise.

    Attributes:
      hu: (Z, Y, X) float32 Hounsfield units.
      lung_occ: (2, Z, Y, X) float32 occupancy of the right (0) and left (1) lung.
      airway_occ: (Z, Y, X) float32 occupancy of the trachea and main bronchi lumen.
      vessels: per side (right, left) the vessel tree segments.
    """

    hu: np.ndarray
    lung_occ: np.ndarray
    airway_occ: np.ndarray
    vessels: tuple


def _grid_axes(shape, spacing_zyx, lo=(0, 0, 0), hi=None):
    hi = shape if hi is None else hi
    return tuple((np.arange(lo[a], hi[a]) * spacing_zyx[a]).astype(np.float32) for a in range(3))


def _texture(rng, shape, spacing_zyx, cell_mm: float, std: float) -> np.ndarray:
    """Smooth random field (float32, given std) with features of about ``cell_mm``."""
    coarse_shape = np.maximum(np.ceil(np.asarray(shape) * spacing_zyx / cell_mm).astype(int) + 2, 2)
    coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape).astype(np.float32), 1.0)
    coarse *= std / max(float(coarse.std()), 1e-6)
    factors = np.asarray(shape) / coarse_shape
    return ndimage.zoom(coarse, factors, order=1, grid_mode=True, mode="nearest")[
        :shape[0], :shape[1], :shape[2]]


def render_anatomy(chest: Chest, shape, spacing_zyx, rng: np.random.Generator) -> Anatomy:
    """Renders the chest on a grid.

    Args:
      chest: the chest's parameters.
      shape: (Z, Y, X) grid size.
      spacing_zyx: (3,) voxel size in mm.
      rng: random generator (consumed).

    Returns:
      The anatomy, noise-free.
    """
    shape = tuple(int(n) for n in shape)
    sp = np.asarray(spacing_zyx, np.float64)
    h_xy = float(sp[1:].mean())
    soft = float(np.cbrt(np.prod(sp)))
    _, gy, gx = _grid_axes(shape, sp)
    y2, x2 = gy[:, None], gx[None, :]

    # Body (z-invariant): air outside, fat under the skin, soft tissue within.
    body = np.clip(0.5 - chest.body_sd(y2, x2) / h_xy, 0, 1)
    inner = np.clip(0.5 - chest.body_sd(y2, x2, inset=chest.fat) / h_xy, 0, 1)
    slice_hu = AIR_HU + body * (chest.fat_hu - AIR_HU) + inner * (chest.soft_hu - chest.fat_hu)
    # Vertebral body (cortex brighter than marrow) and sternum.
    d_spine = np.sqrt((x2 - chest.xc) ** 2 + (y2 - chest.yc - chest.spine_v) ** 2)
    spine = np.clip(0.5 + (chest.spine_r - d_spine) / h_xy, 0, 1)
    marrow = np.clip(0.5 + (chest.spine_r - 2.5 - d_spine) / h_xy, 0, 1)
    slice_hu += spine * (BONE_HU + 150 - slice_hu) + marrow * (250.0 - BONE_HU - 150)
    sternum_r = np.sqrt(((x2 - chest.xc) / (12.0 * chest.lung_a / 40)) ** 2
                        + ((y2 - chest.yc + chest.body_b - chest.fat - 9.0) / 5.0) ** 2)
    slice_hu += np.clip(0.5 + (1 - sternum_r) * 5.0 / h_xy, 0, 1) * (BONE_HU - slice_hu)
    hu = np.repeat(slice_hu[None].astype(np.float32), shape[0], axis=0)

    bone = np.zeros(shape, np.float32)
    render_tubes(bone, sp, rib_tubes(chest, rng), soft)
    hu += bone * (BONE_HU - hu)

    # Lungs: parenchyma with a gravity gradient (denser at the back) and texture.
    lung_occ = np.zeros((2,) + shape, np.float32)
    for i, side in enumerate((RIGHT, LEFT)):
        lo_mm, hi_mm = chest.lung_box(side)
        lo = np.clip(np.floor(lo_mm / sp).astype(int), 0, shape)
        hi = np.clip(np.ceil(hi_mm / sp).astype(int) + 1, 0, shape)
        gz, gyb, gxb = _grid_axes(shape, sp, lo, hi)
        sd = chest.lung_sd(gz[:, None, None], gyb[None, :, None], gxb[None, None, :], side)
        occ = np.clip(0.5 - sd / soft, 0, 1).astype(np.float32)
        occ *= 1.0 - bone[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        lung_occ[i, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = occ
    any_lung = lung_occ.max(axis=0)
    texture = _texture(rng, shape, sp, cell_mm=6.0, std=18.0)
    back = np.clip((gy - (chest.yc + chest.lung_y - chest.lung_b)) / (2 * chest.lung_b), 0, 1)
    lung_hu = chest.lung_hu + texture + (back * 60.0 - 20.0)[None, :, None]
    hu += any_lung * (lung_hu - hu)

    # Vessels, inside the lungs only (outside they merge with soft tissue anyway).
    vessels = tuple(grow_vessel_tree(chest, side, rng) for side in (RIGHT, LEFT))
    vessel_occ = np.zeros(shape, np.float32)
    for tree in vessels:
        render_tubes(vessel_occ, sp, tree, soft)
    vessel_occ *= np.clip(2.0 * any_lung, 0, 1)
    hu += vessel_occ * (chest.vessel_hu - hu)

    airway = np.zeros(shape, np.float32)
    render_tubes(airway, sp, airway_tubes(chest, shape[0] * sp[0]), soft)
    hu += airway * (AIR_HU - hu)
    lung_occ *= 1.0 - airway
    return Anatomy(hu=hu, lung_occ=lung_occ, airway_occ=airway, vessels=vessels)
