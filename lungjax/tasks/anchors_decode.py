"""xie2018 inference: network outputs -> scored spheres -> NMS across both heads.

Conventions are those of ``lungjax.tasks.anchors``: (z, y, x) voxels of the input the
network saw (patch or whole preprocessed volume), diameters in voxels, outputs per head
(B, D/s, H/s, W/s, A, 5) with (logit, dz, dy, dx, dd).

* :func:`decode_dense` (jit-able): every anchor -> (score, centre, diameter);
* :func:`select_candidates` (host): threshold on noduleness, then one of
  ``"iou"``: greedy NMS with the sphere IoU (:func:`sphere_nms`, the default),
  ``"soft"``: Gaussian soft-NMS (Bodla et al. 2017; the paper's option for dense nodules),
  ``"distance"``: ``lungjax.tasks.nms.nms_points`` (suppression within a radius);
* :func:`decode_volume`: every anchor of a whole volume, in one pass or in overlapping
  tiles (the tiling of ``lungjax.tasks.screening.plan_axis_tiles``);
  :func:`detect_volume`: that + selection;
* :func:`to_marks`: detections of a stored scan -> LUNA16 marks in world mm;
  :func:`detect_store`: that for scans of a prepared store (the evaluate mode's loop).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lungjax.data.coords import Geometry, voxel_to_world
from lungjax.data.tables import Marks
from lungjax.tasks.anchors import (AnchorConfig, anchor_table, decode, flatten_outputs,
                                   sphere_iou)
from lungjax.tasks import screening
from lungjax.tasks.nms import nms_points


@dataclasses.dataclass(frozen=True)
class Detections:
    """Scored spheres, highest score first.

    Attributes:
      centre_zyx: (K, 3) float64 centres, input voxels (z, y, x).
      diameter: (K,) float64 diameters, voxels.
      score: (K,) float64 noduleness in [0, 1] (after soft-NMS: the decayed score).
    """

    centre_zyx: np.ndarray
    diameter: np.ndarray
    score: np.ndarray

    def __len__(self) -> int:
        return len(self.score)

    def select(self, index) -> "Detections":
        return Detections(self.centre_zyx[index], self.diameter[index], self.score[index])

    def shifted(self, delta_zyx) -> "Detections":
        """The same detections with ``delta_zyx`` added to the centres."""
        return Detections(self.centre_zyx + np.asarray(delta_zyx, np.float64), self.diameter,
                          self.score)

    @staticmethod
    def empty() -> "Detections":
        return Detections(np.zeros((0, 3)), np.zeros((0,)), np.zeros((0,)))


def decode_dense(outputs: Sequence[jax.Array], cfg: AnchorConfig):
    """Every anchor of a batch of outputs, decoded (pure, jit-able).

    Args:
      outputs: per-head (B, D/s, H/s, W/s, A, 5) network outputs.
      cfg: the anchors (``heads`` in output order).

    Returns:
      scores: (B, N) float32 sigmoid noduleness.
      centres: (B, N, 3) float32 decoded centres, input voxels.
      diameters: (B, N) float32 decoded diameters, voxels.
    """
    s0 = cfg.heads[0][0]
    shape = tuple(int(n) * s0 for n in outputs[0].shape[1:4])
    anc_c, anc_d = anchor_table(cfg, shape, xp=jnp)
    flat = flatten_outputs(outputs).astype(jnp.float32)
    centre, diam = decode(anc_c, anc_d, flat[..., 1:])
    return jax.nn.sigmoid(flat[..., 0]), centre, diam


def _order(scores: np.ndarray) -> np.ndarray:
    """Indices by decreasing score, ties by lower index."""
    return np.lexsort((np.arange(len(scores)), -scores))


def sphere_nms(centres, diameters, scores, iou_threshold: float = 0.1,
               max_keep: int | None = None) -> np.ndarray:
    """Greedy NMS: keep the best sphere, drop those overlapping it by IoU > threshold.

    Args:
      centres: (K, 3) float; diameters: (K,) float > 0; scores: (K,) float.
      iou_threshold: spheres with a higher IoU than this with a kept one are dropped.
      max_keep: stop after this many (None: all).

    Returns:
      (K',) int64 indices of the kept spheres, highest score first (ties: lower index).
    """
    c = np.asarray(centres, np.float64).reshape(-1, 3)
    d = np.asarray(diameters, np.float64).reshape(-1)
    s = np.asarray(scores, np.float64).reshape(-1)
    if not (len(c) == len(d) == len(s)):
        raise ValueError(f"sphere_nms: {len(c)} centres, {len(d)} diameters, {len(s)} scores")
    order = _order(s)
    alive = np.ones(len(s), bool)
    kept = []
    for i in order:
        if not alive[i]:
            continue
        kept.append(i)
        if max_keep is not None and len(kept) >= max_keep:
            break
        rest = np.flatnonzero(alive)
        alive[rest[sphere_iou(c[i], d[i], c[rest], d[rest]) > iou_threshold]] = False
        alive[i] = False
    return np.asarray(kept, np.int64)


def soft_nms(centres, diameters, scores, sigma: float = 0.5, score_threshold: float = 1e-3,
             max_keep: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian soft-NMS with the sphere IoU (Bodla et al. 2017).

    Repeatedly takes the highest (decayed) score and multiplies every remaining score by
    exp(-IoU^2 / sigma); spheres whose score falls below ``score_threshold`` are dropped.

    Returns:
      (indices (K',) int64, decayed scores (K',) float64), in the order taken.
    """
    c = np.asarray(centres, np.float64).reshape(-1, 3)
    d = np.asarray(diameters, np.float64).reshape(-1)
    s = np.asarray(scores, np.float64).reshape(-1).copy()
    if sigma <= 0:
        raise ValueError(f"soft_nms: sigma must be > 0, got {sigma}")
    alive = s >= score_threshold
    idx, out = [], []
    while alive.any() and (max_keep is None or len(idx) < max_keep):
        rest = np.flatnonzero(alive)
        i = rest[_order(s[rest])[0]]
        idx.append(i)
        out.append(s[i])
        alive[i] = False
        rest = np.flatnonzero(alive)
        s[rest] *= np.exp(-sphere_iou(c[i], d[i], c[rest], d[rest]) ** 2 / sigma)
        alive[rest] = s[rest] >= score_threshold
    return np.asarray(idx, np.int64), np.asarray(out, np.float64)


def select_candidates(scores, centres, diameters, *, threshold: float = 0.5,
                      method: str = "iou", iou_threshold: float = 0.1,
                      radius: float = 5.0, sigma: float = 0.5,
                      max_candidates: int | None = None,
                      pre_nms_top_k: int | None = 10000) -> Detections:
    """Threshold + suppression of decoded anchors of ONE input (all heads together).

    Args:
      scores: (N,) noduleness; centres: (N, 3) voxels; diameters: (N,) voxels (from
        :func:`decode_dense`, one batch row).
      threshold: minimum noduleness (inclusive).
      method: "iou" (sphere-IoU NMS), "soft" (soft-NMS) or "distance" (centres within
        ``radius`` voxels suppress each other; ``lungjax.tasks.nms.nms_points``).
      iou_threshold: for "iou". sigma: for "soft" (its floor is ``threshold``).
      max_candidates: cap on the result (None: no cap).
      pre_nms_top_k: only the best this many above the threshold enter NMS (bounds the
        host time of an untrained network; None: all).

    Returns:
      :class:`Detections`, highest score first.
    """
    s = np.asarray(scores, np.float64).reshape(-1)
    c = np.asarray(centres, np.float64).reshape(-1, 3)
    d = np.asarray(diameters, np.float64).reshape(-1)
    if not (len(s) == len(c) == len(d)):
        raise ValueError(f"select_candidates: {len(s)} scores, {len(c)} centres, {len(d)} "
                         "diameters")
    keep = np.flatnonzero(s >= threshold)
    keep = keep[_order(s[keep])]
    if pre_nms_top_k is not None:
        keep = keep[:pre_nms_top_k]
    s, c, d = s[keep], c[keep], d[keep]
    if method == "iou":
        k = sphere_nms(c, d, s, iou_threshold, max_candidates)
        return Detections(c[k], d[k], s[k])
    if method == "soft":
        k, new = soft_nms(c, d, s, sigma, max(threshold, 1e-6), max_candidates)
        return Detections(c[k], d[k], new)
    if method == "distance":
        k = nms_points(c, s, radius, max_points=max_candidates)
        return Detections(c[k], d[k], s[k])
    raise ValueError(f"select_candidates: method must be 'iou', 'soft' or 'distance', "
                     f"got {method!r}")


@functools.lru_cache(maxsize=16)
def _decoder(apply_fn: Callable, cfg: AnchorConfig, with_variables: bool, jit: bool):
    """network + :func:`decode_dense` as one (jitted) function, cached so that every scan
    of a run reuses the compilation."""
    if with_variables:
        fn = lambda v, x: decode_dense(apply_fn(v, x), cfg)  # noqa: E731
    else:
        fn = lambda x: decode_dense(apply_fn(x), cfg)  # noqa: E731
    return jax.jit(fn) if jit else fn


def detect_volume(apply_fn: Callable, volume_zyx: np.ndarray, cfg: AnchorConfig, *,
                  multiple: int = 16, tile_zyx: Sequence[int] | None = None, halo: int = 32,
                  variables: Any = None, jit: bool = True, threshold: float = 0.5,
                  lung_mask: np.ndarray | None = None, score_map: bool = False,
                  **select_kw):
    """Detections of a whole volume (a preprocessed, lung-cropped scan):
    :func:`decode_volume` then :func:`select_candidates`.

    Args:
      apply_fn, volume_zyx, cfg, multiple, tile_zyx, halo, variables, jit: see
        :func:`decode_volume`.
      threshold: noduleness a detection needs; anchors below it are already dropped
        tile by tile.
      lung_mask: (D, H, W) mask of the volume; when given, anchors whose centre voxel lies
        outside it are dropped before suppression (so they neither suppress nor take a
        place under the cap).
      score_map: also return :func:`decode_volume`'s finest-head noduleness map.
      **select_kw: the other :func:`select_candidates` arguments (method, ...).

    Returns:
      :class:`Detections` in the volume's voxels; centres outside the volume are dropped.
      With ``score_map``: (Detections, (map, its OutputMapping)).
    """
    sc, ce, di, *dense = decode_volume(apply_fn, volume_zyx, cfg, multiple=multiple,
                                       tile_zyx=tile_zyx, halo=halo, variables=variables,
                                       jit=jit, threshold=threshold, score_map=score_map)
    if lung_mask is not None:
        mask = np.asarray(lung_mask)
        if mask.shape != np.shape(volume_zyx):
            raise ValueError(f"lung_mask shape {mask.shape} differs from the volume's "
                             f"{np.shape(volume_zyx)}")
        keep = screening.inside_mask(mask, ce)
        sc, ce, di = np.asarray(sc)[keep], np.asarray(ce)[keep], np.asarray(di)[keep]
    det = select_candidates(sc, ce, di, threshold=threshold, **select_kw)
    return (det, dense[0]) if score_map else det


def decode_volume(apply_fn: Callable, volume_zyx: np.ndarray, cfg: AnchorConfig, *,
                  multiple: int = 16, tile_zyx: Sequence[int] | None = None, halo: int = 32,
                  variables: Any = None, jit: bool = True, threshold: float | None = None,
                  score_map: bool = False):
    """Every decoded anchor of a whole volume, in one pass or tile by tile.

    The volume is zero-padded at its far end (0 = air after windowing) to a multiple of
    ``multiple`` (the network's coarsest stride). Without ``tile_zyx`` it runs in one pass.
    With it, the padded volume is cut by ``lungjax.tasks.screening.plan_axis_tiles`` (the
    tiling the screening stage uses): per axis ``ceil(extent / tile)`` tiles, each owning
    a core of whole ``multiple``-voxel blocks and run on one window of the same shape for
    every tile (one compilation) that holds its core plus ``halo`` voxels of context where
    the volume has them; windows never leave the padded volume. A cell belongs to the tile
    whose core holds its anchor centre, so every cell is scored exactly once. Tiled
    results equal the one-pass results (to float rounding) whenever ``halo`` covers the
    receptive field of the network's outputs (beyond it, context is cut) and the network
    is local (no group norm over the whole input). Peak memory is that of one window,
    about ``(tile + 2 * halo)^3`` voxels of activations.

    Args:
      apply_fn: (1, D, H, W, 1) float32 -> per-head outputs; with ``variables``,
        ``apply_fn(variables, x)``.
      volume_zyx: (D, H, W) float32 in the training range ([0, 1]).
      cfg: the anchors.
      multiple: the coarsest stride; windows start and end on multiples of it.
      tile_zyx: most voxels of a tile's core per axis (None: one pass).
      halo: voxels of context on each side of a core (rounded up to a multiple of
        ``multiple``).
      jit: jit ``apply_fn`` + decoding (compiled once per function, anchors and tile
        shape: pass the same function object for every scan).
      threshold: drop anchors scoring below it, tile by tile (what selection would drop;
        keeps the host memory of a tiled pass bounded by the candidates); None keeps all.
      score_map: also return the finest head's noduleness map (every cell, before the
        threshold): its best anchor's score per cell.

    Returns:
      scores: (N,) float32 noduleness; centres: (N, 3) float64 decoded centres, voxels of
      the volume (z, y, x); diameters: (N,) float32 voxels. Anchors are grouped by tile
      (one pass: :func:`anchor_table` order); those whose centre decodes outside the
      volume are dropped. With ``score_map`` a fourth item: ((ceil(D/s), ceil(H/s),
      ceil(W/s)) float32 map, the finest head's ``AnchorConfig.head_mapping``), s its
      stride.
    """
    vol = np.asarray(volume_zyx, np.float32)
    if vol.ndim != 3:
        raise ValueError(f"decode_volume expects a (D, H, W) volume, got shape {vol.shape}")
    multiple, halo = int(multiple), int(halo)
    if multiple < 1 or halo < 0:
        raise ValueError(f"decode_volume: multiple {multiple} must be >= 1 and halo {halo} >= 0")
    if tile_zyx is not None and len(tile_zyx) != 3:
        raise ValueError(f"tile_zyx must be 3 values (z, y, x), got {tuple(tile_zyx)}")
    run = _decoder(apply_fn, cfg, variables is not None, jit)
    if variables is not None:
        run = functools.partial(run, variables)
    shape = np.asarray(vol.shape)
    blocks = [-(-int(n) // multiple) for n in shape]
    halo = -(-halo // multiple) * multiple
    axes = [screening.plan_axis_tiles(b, b * multiple, multiple, -halo, multiple + halo,
                                      None if tile_zyx is None else int(t))
            for b, t in zip(blocks, tile_zyx if tile_zyx is not None else (None,) * 3)]
    padded = np.zeros([b * multiple for b in blocks], np.float32)
    padded[:shape[0], :shape[1], :shape[2]] = vol
    window = [ax[0][3] - ax[0][2] for ax in axes]
    anc_c, _ = anchor_table(cfg, window)
    floor = -np.inf if threshold is None else float(threshold)
    parts = []
    if score_map:  # the finest head: its anchors' block of the table, its cell grid
        head = int(np.argmin([s for s, _ in cfg.heads]))
        stride, n_anchor = int(cfg.heads[head][0]), len(cfg.heads[head][1])
        grids = cfg.grid_shapes(window)
        first = sum(int(np.prod(g)) * len(d) for g, (_, d) in zip(grids[:head], cfg.heads))
        cells = tuple(grids[head])
        dense = np.zeros([n // stride for n in padded.shape], np.float32)
    for tile in itertools.product(*axes):
        lo = np.asarray([t[2] for t in tile])
        core_lo = np.asarray([t[0] for t in tile]) * multiple
        core_hi = np.asarray([t[1] for t in tile]) * multiple
        x = padded[tuple(slice(t[2], t[3]) for t in tile)]
        sc, ce, di = (np.asarray(v)[0] for v in run(x[None, ..., None]))
        if score_map:  # windows start on multiples of the coarsest stride, so of this one
            block = sc[first:first + int(np.prod(cells)) * n_anchor].reshape(*cells, n_anchor)
            a, b = (core_lo - lo) // stride, (core_hi - lo) // stride
            dense[tuple(slice(int(i), int(j)) for i, j in zip(core_lo // stride,
                                                                 core_hi // stride))] = \
                block[a[0]:b[0], a[1]:b[1], a[2]:b[2]].max(axis=-1)
        # Cores are whole blocks, so a cell lies in a core iff its anchor centre does.
        pos = anc_c + lo
        keep = np.all((pos >= core_lo) & (pos < core_hi), axis=1) & (sc >= floor)
        parts.append((sc[keep], ce[keep].astype(np.float64) + lo, di[keep]))
    sc = np.concatenate([p[0] for p in parts])
    ce = np.concatenate([p[1] for p in parts])
    di = np.concatenate([p[2] for p in parts])
    inside = np.all((ce >= -0.5) & (ce < shape - 0.5), axis=1)
    if score_map:
        keep = tuple(slice(0, -(-int(n) // stride)) for n in shape)
        return sc[inside], ce[inside], di[inside], (dense[keep], cfg.head_mapping(head))
    return sc[inside], ce[inside], di[inside]


def to_marks(uid: str, det: Detections, geometry: Geometry) -> tuple[Marks, np.ndarray]:
    """LUNA16 submission rows of one scan.

    Args:
      uid: the scan's series UID.
      det: detections in voxels of the grid described by ``geometry`` (for a store scan,
        ``ScanRecord.geometry``: voxel (0, 0, 0) of the stored volume).
      geometry: that grid's placement.

    Returns:
      marks: world (x, y, z) mm centres with the scores as probabilities.
      diameter_mm: (K,) float64 diameters in mm (voxels x the grid's mean spacing; the
        store's grid is isotropic).
    """
    xyz = voxel_to_world(det.centre_zyx, geometry)
    spacing = float(np.mean(np.asarray(geometry.spacing, np.float64)))
    return Marks(np.full(len(det), uid), xyz, det.score), det.diameter * spacing


def detect_store(apply_fn: Callable, store: Any, uids: Sequence[str], cfg: AnchorConfig, *,
                 variables: Any = None, tile_zyx: Sequence[int] | None = None, halo: int = 32,
                 multiple: int = 16, max_candidates: int | None = 100,
                 lung_only: bool = False,
                 **select_kw) -> tuple[Marks, dict[str, dict[str, float]]]:
    """Whole-scan detection over scans of a prepared ``PatchStore`` (LUNA16 marks).

    Args:
      apply_fn: as in :func:`detect_volume` (``apply_fn(variables, x)`` with variables).
      store: a ``lungjax.data.store.PatchStore`` (``scan(uid).geometry``,
        ``read_volume(uid)``).
      uids: scans, in order.
      cfg: the anchors.
      variables, tile_zyx, halo, multiple: see :func:`detect_volume`.
      max_candidates: marks kept per scan (LUNA16's evaluation reads at most 100).
      lung_only: keep detections inside the store's lung mask (its "lung" array) only.
      **select_kw: :func:`select_candidates` arguments (threshold, method, ...).

    Returns:
      marks: every scan's detections in world mm.
      seconds: per uid {"read", "detect", "total"} wall seconds.
    """
    parts, seconds = [], {}
    for uid in uids:
        t0 = time.perf_counter()
        rec = store.scan(uid)
        volume = store.read_volume(uid)
        lung = store.read_volume(uid, "lung") if lung_only else None
        t1 = time.perf_counter()
        det = detect_volume(apply_fn, volume, cfg, multiple=multiple, tile_zyx=tile_zyx,
                            halo=halo, variables=variables, max_candidates=max_candidates,
                            lung_mask=lung, **select_kw)
        parts.append(to_marks(uid, det, rec.geometry)[0])
        t2 = time.perf_counter()
        seconds[uid] = {"read": t1 - t0, "detect": t2 - t1, "total": t2 - t0}
    if not parts:
        return Marks(np.zeros((0,), str), np.zeros((0, 3)), np.zeros((0,))), seconds
    return (Marks(np.concatenate([m.uid for m in parts]), np.concatenate([m.xyz for m in parts]),
                  np.concatenate([m.probability for m in parts])), seconds)
