"""xie2018 detector pieces: regression anchors, sphere IoU, target assignment, box coding,
OHEM loss, decoding and sphere-IoU NMS (the network itself is ``lungjax.models.resnet_fpn``).

Conventions (one for the whole module):

* Coordinates are (z, y, x) voxels of the patch or volume the network saw, on an isotropic
  grid of ``voxel_mm`` mm (the store resamples to 1 mm, so voxels = mm by default). Voxel
  ``i`` is the centre of the i-th voxel; a patch of size S has its geometric centre at
  (S - 1) / 2.
* A nodule, an anchor and a detection are SPHERES: a centre (z, y, x) and a diameter. The
  paper outputs <n, x, y, z, d> (one diameter, "roughly of spherical shape") and gives no
  overlap formula; we use the exact sphere intersection-over-union (:func:`sphere_iou`).
  :func:`cube_iou` (axis-aligned cubes of side d, DeepLung / grt123 style) is an option
  (``AnchorConfig.iou="cube"``).
* Cell ``c`` (z, y, x) of a head with stride ``s`` is centred at voxel
  ``(s - 1) / 2 + s * c`` (the centre of the s^3 block it covers; a patch flip maps cells
  onto cells), i.e. ``lungjax.tasks.screening.OutputMapping((s,)*3, ((s-1)/2,)*3)``.
  Its anchors are spheres at that centre with the head's diameters.
* Network outputs per head: (B, D/s, H/s, W/s, A, 5) with (logit, dz, dy, dx, dd);
  anchors are flattened head by head in (z, y, x, a) row-major order, giving N anchors per
  patch. Regression deltas (Faster R-CNN style, one scale for a sphere):
  ``dz = (gz - az) / ad`` (likewise y, x), ``dd = log(gd / ad)``.

Targets (the paper's eta+ = 0.3, eta- = 0.001): an anchor is positive when its IoU with a
nodule exceeds ``pos_iou``, negative below ``neg_iou``, ignored in between (and ignored
when it overlaps an excluded finding more than ``neg_iou``). As in Faster R-CNN's RPN, the
best anchor of each nodule is also made positive (``force_best``): small nodules whose
centre falls between cells otherwise get no positive at all (two 3 mm spheres 1.7 mm
apart have IoU 0.13). Loss per patch: binary cross entropy over the positives and the
``ohem_k`` = 5 highest-scoring negatives (online hard example mining), averaged over those
anchors, + ``reg_weight`` * smooth L1 of the 4 deltas summed, averaged over positives.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lungjax.registry import TASKS
from lungjax.tasks.losses import smooth_l1
from lungjax.tasks.screening import OutputMapping

# ---------------------------------------------------------------------------
# Anchor configuration and grids.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AnchorConfig:
    """Anchors of every head and the target / loss rules.

    Attributes:
      heads: ((stride, (diameter_mm, ...)), ...) in the network's output order
        (``XieFPN.heads()``).
      voxel_mm: isotropic grid spacing of the patches (mm per voxel).
      iou: "sphere" (default) or "cube".
      pos_iou: IoU above which an anchor is positive (paper: 0.3).
      neg_iou: IoU below which an anchor is negative (paper: 0.001).
      force_best: also make each nodule's best anchor positive (when its IoU > 0).
      ohem_k: negatives per patch that enter the loss, highest noduleness first (paper: 5).
      reg_weight: weight of the regression loss.
      smooth_l1_beta: transition point of the smooth L1 (1: Faster R-CNN).
    """

    heads: tuple = ((2, (3.0, 5.0, 7.0, 10.0)), (4, (13.0, 17.0, 22.0, 30.0, 40.0)))
    voxel_mm: float = 1.0
    iou: str = "sphere"
    pos_iou: float = 0.3
    neg_iou: float = 0.001
    force_best: bool = True
    ohem_k: int = 5
    reg_weight: float = 1.0
    smooth_l1_beta: float = 1.0

    def __post_init__(self):
        heads = tuple((int(s), tuple(float(d) for d in ds)) for s, ds in self.heads)
        if not heads or any(s < 1 or not ds or min(ds) <= 0 for s, ds in heads):
            raise ValueError(f"AnchorConfig.heads must be ((stride >= 1, (diameters > 0, ...)), "
                             f"...), got {self.heads}")
        object.__setattr__(self, "heads", heads)
        if self.iou not in ("sphere", "cube"):
            raise ValueError(f"AnchorConfig.iou must be 'sphere' or 'cube', got {self.iou!r}")
        if not 0.0 <= self.neg_iou <= self.pos_iou <= 1.0:
            raise ValueError(f"AnchorConfig needs 0 <= neg_iou <= pos_iou <= 1, got "
                             f"neg_iou={self.neg_iou}, pos_iou={self.pos_iou}")
        if self.voxel_mm <= 0 or self.ohem_k < 0:
            raise ValueError(f"AnchorConfig: voxel_mm must be > 0 and ohem_k >= 0, got "
                             f"{self.voxel_mm}, {self.ohem_k}")

    @classmethod
    def from_model(cls, model, **kw) -> "AnchorConfig":
        """The anchors of a ``lungjax.models.resnet_fpn.XieFPN`` (its ``heads()``) + rule fields."""
        return cls(heads=model.heads(), **kw)

    def head_mapping(self, i: int) -> OutputMapping:
        """Cell -> voxel mapping of head ``i`` (cell c at (s - 1) / 2 + s * c)."""
        s = self.heads[i][0]
        return OutputMapping((s, s, s), ((s - 1) / 2.0,) * 3)

    def grid_shapes(self, input_zyx: Sequence[int]) -> list[tuple[int, int, int]]:
        """(D/s, H/s, W/s) of each head for an input of (D, H, W) voxels."""
        out = []
        for s, _ in self.heads:
            if any(int(n) % s for n in input_zyx):
                raise ValueError(f"input shape {tuple(input_zyx)} is not a multiple of head "
                                 f"stride {s}")
            out.append(tuple(int(n) // s for n in input_zyx))
        return out

    def num_anchors(self, input_zyx: Sequence[int]) -> int:
        """N, the number of anchors of a patch of this shape (all heads)."""
        return sum(int(np.prod(g)) * len(ds)
                   for g, (_, ds) in zip(self.grid_shapes(input_zyx), self.heads))


def anchor_table(cfg: AnchorConfig, input_zyx: Sequence[int], xp: Any = np):
    """Every anchor of a patch, flattened head by head in (z, y, x, a) order.

    Args:
      cfg: the anchors.
      input_zyx: (D, H, W) patch shape in voxels.
      xp: ``numpy`` (host) or ``jax.numpy`` (inside a jitted step: built from iotas, so
        no large constant enters the program).

    Returns:
      centres: (N, 3) float32 anchor centres, patch voxels (z, y, x), i.e.
        ``cfg.head_mapping(i).cells_to_voxels(cell)`` for each head i.
      diameters: (N,) float32 anchor diameters in voxels.
    """
    cs, ds = [], []
    for g, (s, diam) in zip(cfg.grid_shapes(input_zyx), cfg.heads):
        cells = xp.stack(xp.meshgrid(*[xp.arange(n, dtype=xp.float32) for n in g],
                                     indexing="ij"), -1)
        centre = (s - 1) / 2.0 + s * cells  # (d, h, w, 3); = head_mapping(i)
        a = len(diam)
        cs.append(xp.broadcast_to(centre.reshape(-1, 1, 3), (centre.size // 3, a, 3))
                  .reshape(-1, 3))
        dv = xp.asarray(np.asarray(diam, np.float32) / np.float32(cfg.voxel_mm))
        ds.append(xp.tile(dv, int(np.prod(g))))
    return (xp.concatenate(cs).astype(xp.float32), xp.concatenate(ds).astype(xp.float32))


def flatten_outputs(outputs: Sequence[jax.Array]) -> jax.Array:
    """Per-head (B, d, h, w, A, 5) -> (B, N, 5), in :func:`anchor_table` order."""
    return jnp.concatenate([o.reshape(o.shape[0], -1, o.shape[-1]) for o in outputs], axis=1)


# ---------------------------------------------------------------------------
# Overlap.
# ---------------------------------------------------------------------------


def _xp(*arrays):
    """numpy for host arrays (float64, exact tests and host NMS), jax.numpy otherwise."""
    if any(isinstance(a, jax.Array) for a in arrays):  # tracers are jax.Arrays too
        return jnp, jnp.float32
    return np, np.float64


def sphere_intersection(c1, d1, c2, d2):
    """Volume shared by two balls, broadcasting.

    Closed form (lens volume): for radii r1, r2 at centre distance t with
    |r1 - r2| < t < r1 + r2, V = pi (r1 + r2 - t)^2 (t^2 + 2 t (r1 + r2) - 3 (r1 - r2)^2)
    / (12 t); one ball inside the other gives the smaller ball; apart gives 0.

    Args:
      c1, c2: (..., 3) centres; d1, d2: (...) diameters (same units). numpy inputs give
        a float64 numpy result, jax inputs a float32 jax result.

    Returns:
      (...) intersection volume.
    """
    xp, dt = _xp(c1, d1, c2, d2)
    c1, c2, d1, d2 = (xp.asarray(v, dt) for v in (c1, c2, d1, d2))
    r1, r2 = d1 / 2.0, d2 / 2.0
    t = xp.sqrt(xp.sum((c1 - c2) ** 2, axis=-1))
    small = xp.minimum(r1, r2)
    inside = t <= xp.abs(r1 - r2)
    apart = t >= r1 + r2
    ts = xp.where(inside | apart, 1.0, t)  # keep the lens formula finite where unused
    lens = (np.pi * (r1 + r2 - ts) ** 2
            * (ts ** 2 + 2.0 * ts * (r1 + r2) - 3.0 * (r1 - r2) ** 2) / (12.0 * ts))
    full = 4.0 / 3.0 * np.pi * small ** 3
    return xp.where(apart, 0.0, xp.where(inside, full, lens))


def sphere_iou(c1, d1, c2, d2):
    """Intersection over union of two balls (centres (..., 3), diameters (...)) -> (...)."""
    xp, dt = _xp(c1, d1, c2, d2)
    inter = sphere_intersection(c1, d1, c2, d2)
    v1 = np.pi / 6.0 * xp.asarray(d1, dt) ** 3
    v2 = np.pi / 6.0 * xp.asarray(d2, dt) ** 3
    return inter / xp.maximum(v1 + v2 - inter, 1e-12)


def cube_iou(c1, d1, c2, d2):
    """IoU of axis-aligned cubes of side d centred at c (shapes as :func:`sphere_iou`)."""
    xp, dt = _xp(c1, d1, c2, d2)
    c1, c2, d1, d2 = (xp.asarray(v, dt) for v in (c1, c2, d1, d2))
    lo = xp.maximum(c1 - d1[..., None] / 2, c2 - d2[..., None] / 2)
    hi = xp.minimum(c1 + d1[..., None] / 2, c2 + d2[..., None] / 2)
    inter = xp.prod(xp.clip(hi - lo, 0.0, None), axis=-1)
    return inter / xp.maximum(d1 ** 3 + d2 ** 3 - inter, 1e-12)


def iou_fn(kind: str):
    return {"sphere": sphere_iou, "cube": cube_iou}[kind]


# ---------------------------------------------------------------------------
# Box coding.
# ---------------------------------------------------------------------------


def encode(anchor_zyx, anchor_d, target_zyx, target_d):
    """Regression deltas (dz, dy, dx, dd) of targets w.r.t. anchors: (..., 4) float32."""
    anchor_d = jnp.asarray(anchor_d, jnp.float32)
    dc = (jnp.asarray(target_zyx, jnp.float32) - anchor_zyx) / anchor_d[..., None]
    dd = jnp.log(jnp.maximum(jnp.asarray(target_d, jnp.float32), 1e-6) / anchor_d)
    return jnp.concatenate([dc, dd[..., None]], axis=-1)


def decode(anchor_zyx, anchor_d, deltas):
    """Inverse of :func:`encode`: -> (centre (..., 3), diameter (...)) float32."""
    anchor_d = jnp.asarray(anchor_d, jnp.float32)
    deltas = jnp.asarray(deltas, jnp.float32)
    centre = anchor_zyx + deltas[..., :3] * anchor_d[..., None]
    # Clip dd so an untrained head cannot overflow exp (e^8 ~ 3000x the anchor).
    return centre, anchor_d * jnp.exp(jnp.clip(deltas[..., 3], -8.0, 8.0))


# ---------------------------------------------------------------------------
# Target assignment.
# ---------------------------------------------------------------------------


def assign_targets(anchor_zyx, anchor_d, nodule_zyx, nodule_d, cfg: AnchorConfig,
                   ignore_zyx=None, ignore_d=None):
    """Labels and regression targets of every anchor of one patch (pure, jit-able).

    Args:
      anchor_zyx: (N, 3) float anchor centres, patch voxels (:func:`anchor_table`).
      anchor_d: (N,) float anchor diameters, voxels.
      nodule_zyx: (M, 3) float nodule centres, patch voxels (may lie outside the patch).
      nodule_d: (M,) float nodule diameters in voxels; <= 0 marks padding (fixed M).
      cfg: IoU kind and thresholds.
      ignore_zyx, ignore_d: optional (K, 3), (K,) excluded findings (LUNA16 "irrelevant
        findings"): anchors overlapping one by more than ``neg_iou`` are not negatives.

    Returns:
      labels: (N,) int32, 1 positive, 0 negative, -1 ignored.
      targets: (N, 4) float32 deltas to the matched nodule (zeros where label != 1).
      matched: (N,) int32 index of the nodule with the highest IoU (-1 if none overlaps).
      max_iou: (N,) float32 highest IoU with any nodule.
    """
    anchor_zyx = jnp.asarray(anchor_zyx, jnp.float32)
    anchor_d = jnp.asarray(anchor_d, jnp.float32)
    nodule_zyx = jnp.asarray(nodule_zyx, jnp.float32).reshape(-1, 3)
    nodule_d = jnp.asarray(nodule_d, jnp.float32).reshape(-1)
    n, m = anchor_zyx.shape[0], nodule_zyx.shape[0]
    iou = iou_fn(cfg.iou)
    if m == 0:
        labels = jnp.zeros((n,), jnp.int32)
        matched = jnp.full((n,), -1, jnp.int32)
        max_iou = jnp.zeros((n,), jnp.float32)
        targets = jnp.zeros((n, 4), jnp.float32)
    else:
        valid = nodule_d > 0
        ious = iou(anchor_zyx[:, None, :], anchor_d[:, None], nodule_zyx[None, :, :],
                   jnp.where(valid, nodule_d, 1.0)[None, :])
        ious = jnp.where(valid[None, :], ious, 0.0)  # (N, M)
        matched = jnp.argmax(ious, axis=1).astype(jnp.int32)
        max_iou = jnp.max(ious, axis=1)
        labels = jnp.where(max_iou > cfg.pos_iou, 1,
                           jnp.where(max_iou < cfg.neg_iou, 0, -1)).astype(jnp.int32)
        if cfg.force_best:
            best = jnp.argmax(ious, axis=0)  # (M,) best anchor of each nodule
            ok = valid & (ious[best, jnp.arange(m)] > 0)
            # Padding / non-overlapping nodules scatter to index n: dropped.
            where = jnp.where(ok, best, n)
            labels = labels.at[where].set(1, mode="drop")
            matched = matched.at[where].set(jnp.arange(m, dtype=jnp.int32), mode="drop")
        targets = encode(anchor_zyx, anchor_d, nodule_zyx[matched], nodule_d[matched])
        targets = jnp.where((labels == 1)[:, None], targets, 0.0)
        matched = jnp.where(max_iou > 0, matched, -1)
    if ignore_zyx is not None and np.shape(ignore_zyx)[0] > 0:
        iz = jnp.asarray(ignore_zyx, jnp.float32).reshape(-1, 3)
        idm = jnp.asarray(ignore_d, jnp.float32).reshape(-1)
        ov = iou(anchor_zyx[:, None, :], anchor_d[:, None], iz[None], jnp.maximum(idm, 1e-6)[None])
        ov = jnp.where((idm > 0)[None, :], ov, 0.0)
        labels = jnp.where((labels == 0) & (jnp.max(ov, axis=1) >= cfg.neg_iou), -1, labels)
    return labels, targets, matched, max_iou


# ---------------------------------------------------------------------------
# Loss with online hard example mining.
# ---------------------------------------------------------------------------


def ohem_mask(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """The ``k`` negatives (label 0) with the highest logits of each patch.

    Args:
      logits: (B, N) float noduleness logits.
      labels: (B, N) int32 in {1, 0, -1}.
      k: negatives kept per patch (fewer when a patch has fewer negatives).

    Returns:
      (B, N) bool, True for the selected negatives. Ties: lower anchor index first.
    """
    n = logits.shape[-1]
    k = int(min(k, n))
    if k == 0:
        return jnp.zeros(labels.shape, bool)
    neg = labels == 0
    score = jnp.where(neg, jax.lax.stop_gradient(logits).astype(jnp.float32), -jnp.inf)
    vals, idx = jax.lax.top_k(score, k)  # (B, k)
    rows = jnp.arange(logits.shape[0])[:, None]
    sel = jnp.zeros(labels.shape, bool).at[rows, idx].set(vals > -jnp.inf)
    return sel & neg


def detection_loss(outputs_flat: jax.Array, labels: jax.Array, targets: jax.Array,
                   cfg: AnchorConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-patch loss: OHEM cross entropy + smooth L1 on positives.

    Args:
      outputs_flat: (B, N, 5) float network outputs (:func:`flatten_outputs`).
      labels: (B, N) int32 targets from :func:`assign_targets`.
      targets: (B, N, 4) float32 regression targets.
      cfg: ``ohem_k``, ``reg_weight``, ``smooth_l1_beta``.

    Returns:
      loss: (B,) float32 per patch.
      parts: dict of (B,) float32: "cls", "reg", "num_pos", "num_hard_neg",
        "pos_accuracy" (positives with p > 0.5, NaN-free: 0 without positives),
        "hard_neg_prob" (mean probability of the selected negatives).
    """
    logits = outputs_flat[..., 0].astype(jnp.float32)
    pos = labels == 1
    hard = ohem_mask(logits, labels, cfg.ohem_k)
    sel = (pos | hard).astype(jnp.float32)
    bce = optax.sigmoid_binary_cross_entropy(logits, pos.astype(jnp.float32))
    n_sel = jnp.sum(sel, axis=1)
    cls = jnp.sum(bce * sel, axis=1) / jnp.maximum(n_sel, 1.0)
    posf = pos.astype(jnp.float32)
    n_pos = jnp.sum(posf, axis=1)
    reg_el = smooth_l1(outputs_flat[..., 1:].astype(jnp.float32) - targets, cfg.smooth_l1_beta)
    reg = jnp.sum(jnp.sum(reg_el, axis=-1) * posf, axis=1) / jnp.maximum(n_pos, 1.0)
    prob = jax.nn.sigmoid(logits)
    hardf = hard.astype(jnp.float32)
    n_hard = jnp.sum(hardf, axis=1)
    parts = {
        "cls": cls, "reg": reg, "num_pos": n_pos, "num_hard_neg": n_hard,
        "pos_accuracy": jnp.sum((prob > 0.5) * posf, axis=1) / jnp.maximum(n_pos, 1.0),
        "hard_neg_prob": jnp.sum(prob * hardf, axis=1) / jnp.maximum(n_hard, 1.0),
    }
    return cls + cfg.reg_weight * reg, parts


# ---------------------------------------------------------------------------
# The engine-facing task.
# ---------------------------------------------------------------------------


@TASKS.register("xie2018_detection")
class AnchorDetectionTask:
    """Anchor-based single-stage detection of nodules in patches (xie2018).

    Targets are assigned inside the jitted step from the nodules of each patch, read from
    the batch (patch voxels, sizes in mm; ``M`` fixed per batch, diameter <= 0 = padding):

    * ``nodules_zyx`` (B, M, 3) float32 centres and ``nodules_diameter_mm`` (B, M), every
      nodule that overlaps the patch (preferred: a second nodule near the first one is
      otherwise trained as background);
    * else ``offset_zyx`` (B, 3) (nodule centre minus the patch centre (S - 1) / 2) and
      ``diameter_mm`` (B,) (0 for negative patches), one nodule per patch;
    * optional ``excluded_zyx`` (B, K, 3) / ``excluded_diameter_mm`` (B, K): findings whose
      anchors are ignored rather than negatives.

    Args: the fields of :class:`AnchorConfig` (``heads`` must match the model's heads).
    """

    def __init__(self, heads=AnchorConfig.heads, voxel_mm: float = 1.0, iou: str = "sphere",
                 pos_iou: float = 0.3, neg_iou: float = 0.001, force_best: bool = True,
                 ohem_k: int = 5, reg_weight: float = 1.0, smooth_l1_beta: float = 1.0):
        self.cfg = AnchorConfig(heads=tuple(heads), voxel_mm=voxel_mm, iou=iou,
                                pos_iou=pos_iou, neg_iou=neg_iou, force_best=force_best,
                                ohem_k=ohem_k, reg_weight=reg_weight,
                                smooth_l1_beta=smooth_l1_beta)

    # -- helpers -------------------------------------------------------------
    def input_shape(self, outputs: Sequence[jax.Array]) -> tuple[int, int, int]:
        """(D, H, W) of the patch that gave ``outputs`` (checked against every head)."""
        if len(outputs) != len(self.cfg.heads):
            raise ValueError(f"model gives {len(outputs)} heads, task.heads has "
                             f"{len(self.cfg.heads)}")
        shape = None
        for o, (s, diam) in zip(outputs, self.cfg.heads):
            if o.ndim != 6 or o.shape[-2:] != (len(diam), 5):
                raise ValueError(f"head of stride {s}: output shape {o.shape}, expected "
                                 f"(B, d, h, w, {len(diam)}, 5)")
            this = tuple(int(n) * s for n in o.shape[1:4])
            if shape is not None and this != shape:
                raise ValueError(f"heads disagree on the input shape: {shape} vs {this}; "
                                 "task.heads strides do not match the model")
            shape = this
        return shape

    def _nodules(self, batch: Mapping[str, jax.Array], input_zyx):
        vox = self.cfg.voxel_mm
        if "nodules_zyx" in batch:
            c = jnp.asarray(batch["nodules_zyx"], jnp.float32)
            d = jnp.asarray(batch["nodules_diameter_mm"], jnp.float32) / vox
            return c.reshape(c.shape[0], -1, 3), d.reshape(d.shape[0], -1)
        if "offset_zyx" in batch and "diameter_mm" in batch:
            centre = (jnp.asarray(input_zyx, jnp.float32) - 1.0) / 2.0
            c = centre + jnp.asarray(batch["offset_zyx"], jnp.float32).reshape(-1, 3)
            d = jnp.asarray(batch["diameter_mm"], jnp.float32).reshape(-1) / vox
            return c[:, None, :], d[:, None]
        raise KeyError("xie2018_detection needs batch['nodules_zyx'] + "
                       "batch['nodules_diameter_mm'] or batch['offset_zyx'] + "
                       f"batch['diameter_mm']; batch has {sorted(batch)}")

    def targets(self, outputs, batch):
        """(labels (B, N) int32, targets (B, N, 4) float32) for a batch."""
        shape = self.input_shape(outputs)
        anc_c, anc_d = anchor_table(self.cfg, shape, xp=jnp)
        nod_c, nod_d = self._nodules(batch, shape)
        if "excluded_zyx" in batch:
            ex_c = jnp.asarray(batch["excluded_zyx"], jnp.float32)
            ex_d = jnp.asarray(batch["excluded_diameter_mm"], jnp.float32) / self.cfg.voxel_mm

            def fn(c, d, ec, ed):
                return assign_targets(anc_c, anc_d, c, d, self.cfg, ec, ed)[:2]

            return jax.vmap(fn)(nod_c, nod_d, ex_c.reshape(ex_c.shape[0], -1, 3),
                                ex_d.reshape(ex_d.shape[0], -1))
        fn = lambda c, d: assign_targets(anc_c, anc_d, c, d, self.cfg)[:2]  # noqa: E731
        return jax.vmap(fn)(nod_c, nod_d)

    def _loss(self, outputs, batch):
        labels, targets = self.targets(outputs, batch)
        return detection_loss(flatten_outputs(outputs), labels, targets, self.cfg)

    # -- engine protocol -------------------------------------------------------
    def per_sample_loss(self, outputs, batch) -> jax.Array:
        """(B,) float32 loss of each patch."""
        return self._loss(outputs, batch)[0]

    def per_sample_metrics(self, outputs, batch) -> dict[str, jax.Array]:
        """(B,) float32 values: cls, reg, num_pos, num_hard_neg, pos_accuracy,
        hard_neg_prob (the engine takes their weighted means)."""
        return self._loss(outputs, batch)[1]

    def probabilities(self, outputs) -> jax.Array:
        """Decoded dense predictions (B, N, 5) float32: (score, z, y, x, d), centres and
        diameters in input voxels, anchors in :func:`anchor_table` order (what the
        exported predictor returns; ``lungjax.tasks.anchors_decode`` thresholds and
        suppresses them)."""
        shape = self.input_shape(outputs)
        anc_c, anc_d = anchor_table(self.cfg, shape, xp=jnp)
        flat = flatten_outputs(outputs).astype(jnp.float32)
        centre, diam = decode(anc_c, anc_d, flat[..., 1:])
        return jnp.concatenate([jax.nn.sigmoid(flat[..., :1]), centre, diam[..., None]], -1)

    def host_outputs(self, outputs, batch) -> dict[str, jax.Array]:
        """(B,) per patch: "score" = highest anchor probability, "label" (batch label, or
        1 when the patch has a nodule)."""
        flat = flatten_outputs(outputs)
        score = jax.nn.sigmoid(jnp.max(flat[..., 0].astype(jnp.float32), axis=1))
        if "label" in batch:
            label = jnp.asarray(batch["label"]).astype(jnp.int32).reshape(-1)
        else:
            label = (jnp.max(self._nodules(batch, self.input_shape(outputs))[1], axis=1)
                     > 0).astype(jnp.int32)
        return {"score": score, "label": label}
