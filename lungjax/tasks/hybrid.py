"""Dou et al. (MICCAI 2017) hybrid loss: regression targets, decoding, losses and the task.

Regression target of a candidate patch (paper, Eq. 2). For a patch of size S centred at
the candidate P and a ground-truth nodule G (centre, diameter G_d)::

    T_a = 2 (G_a - P_a) / S_a            a in (z, y, x)
    T_d = log(G_d / sqrt(S_x^2 + S_y^2 + S_z^2))

with all lengths in mm. **Order of the 4 regression outputs here: (T_z, T_y, T_x, T_d)**,
the array axis order of lungjax (the paper lists x, y, z, d). Because G - P and S are
measured in the same grid, T_a equals 2 * (offset in voxels) / (size in voxels) on any
spacing; only T_d needs the spacing.

"P" is the patch's geometric centre ``(S - 1) / 2`` in patch voxel indices: the point
flips and 90-degree rotations leave in place, and the one ``lungjax.data.pipeline``
measures its ``offset_zyx`` from. A patch read with ``PatchStore.read_patch(uid, c, S)``
(start = c - S // 2) has its geometric centre at store voxel ``c - S // 2 + (S - 1) / 2``
(``c - 0.5`` on even sizes); ``decode_to_world`` accounts for it.

Loss (Eq. 1, 3, 4)::

    L = (1/N) sum_i NLL_i  +  lambda / N_reg * sum_i 1(Y_i = 1) sum_a smoothL1(T_ia - T^_ia)
        + beta * ||W||^2

``N_reg`` is the number of positives (``reg_normalizer="positives"``, default) or of all
samples (``"batch"``); lambda = 0.5. Every function takes per-sample weights, so padding,
online sample filtering and sampler masks reuse them: N = sum(w), N_reg = sum(w * pos).
A positive with no diameter (``diameter_mm <= 0``) has no regression target and only
enters the classification term.

Weight decay: the beta * ||W||^2 term is left out of the loss and applied in the optimizer,
``optax.add_decayed_weights(2 * beta, mask=decay_mask)`` chained before Adam/SGD (the
gradient of beta * ||W||^2 is 2 * beta * W); the engine's ``config.optimizer.weight_decay``
is that same transformation, so the paper's beta = 1e-4 is ``weight_decay = 2e-4``.
``l2_penalty`` computes the term itself for reporting or for tests.

Augmentation: ``lungjax.data.pipeline`` measures the nodule offset *after* augmentation
(``lungjax.data.augment.map_point``), so targets built from a batch's ``offset_zyx`` and
``diameter_mm`` already follow translation, scaling, rotation and flips.
``transform_targets`` applies the same maps to targets directly (for code that computes
targets before augmenting) and is tested against ``augment.map_point``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lungjax.data.coords import Geometry, voxel_to_world
from lungjax.registry import TASKS
from lungjax.tasks.losses import smooth_l1

REGRESSION_ORDER = ("z", "y", "x", "log_diameter")
LAMBDA = 0.5  # paper
BETA = 1e-4  # paper, as optimizer weight decay 2 * BETA (module docstring)
REG_NORMALIZERS = ("positives", "batch")


# --------------------------------------------------------------------------- targets


def encode_targets(offset_zyx, diameter_mm, patch_size_zyx: Sequence[float],
                   spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0)) -> jax.Array:
    """Regression targets from nodule offsets.

    Args:
      offset_zyx: (..., 3) float, nodule centre G minus the patch's geometric centre P,
        in voxels of the patch grid (z, y, x).
      diameter_mm: (...,) float nodule diameter in mm; <= 0 means "no nodule" and gives
        T_d = 0 (such samples must carry no regression loss).
      patch_size_zyx: (3,) patch size S in voxels.
      spacing_zyx: (3,) mm per voxel of the patch grid.

    Returns:
      (..., 4) float32 (T_z, T_y, T_x, T_d).
    """
    off = jnp.asarray(offset_zyx, jnp.float32)
    d = jnp.asarray(diameter_mm, jnp.float32)
    size = jnp.asarray(patch_size_zyx, jnp.float32)
    size_mm = size * jnp.asarray(spacing_zyx, jnp.float32)
    t_xyz = 2.0 * off / size
    norm = jnp.sqrt(jnp.sum(size_mm ** 2))
    t_d = jnp.where(d > 0, jnp.log(jnp.where(d > 0, d, 1.0) / norm), 0.0)
    return jnp.concatenate([t_xyz, t_d[..., None]], axis=-1)


def regression_targets(gt_center_zyx, gt_diameter_mm, patch_center_zyx,
                       patch_size_zyx: Sequence[float],
                       spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0)) -> jax.Array:
    """The paper's Eq. 2 from positions: ``encode_targets(G - P, G_d, S, spacing)``.

    Args:
      gt_center_zyx: (..., 3) ground-truth centre G, voxel coordinates (z, y, x) in any
        grid with spacing ``spacing_zyx``.
      gt_diameter_mm: (...,) diameter G_d in mm.
      patch_center_zyx: (..., 3) patch centre P in the same grid.
      patch_size_zyx: (3,) S in voxels of that grid.
      spacing_zyx: (3,) mm per voxel.

    Returns:
      (..., 4) float32 (T_z, T_y, T_x, T_d).
    """
    off = jnp.asarray(gt_center_zyx, jnp.float32) - jnp.asarray(patch_center_zyx, jnp.float32)
    return encode_targets(off, gt_diameter_mm, patch_size_zyx, spacing_zyx)


def decode_targets(t, patch_size_zyx: Sequence[float],
                   spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0)):
    """Inverse of ``encode_targets``.

    Args:
      t: (..., 4) float (T_z, T_y, T_x, T_d).
      patch_size_zyx, spacing_zyx: as for ``encode_targets``.

    Returns:
      ``(offset_zyx, diameter_mm)``: (..., 3) float32 voxels from the patch's geometric
      centre, and (...,) float32 mm.
    """
    t = jnp.asarray(t, jnp.float32)
    size = jnp.asarray(patch_size_zyx, jnp.float32)
    norm = jnp.sqrt(jnp.sum((size * jnp.asarray(spacing_zyx, jnp.float32)) ** 2))
    return t[..., :3] * size / 2.0, jnp.exp(t[..., 3]) * norm


def patch_geometric_center(read_center_zyx, patch_size_zyx: Sequence[int]) -> np.ndarray:
    """Store voxel of the geometric centre of a patch read at integer centre ``c``.

    ``PatchStore.read_patch`` starts at ``c - S // 2``, so the centre ``(S - 1) / 2`` of the
    patch is store voxel ``c - S // 2 + (S - 1) / 2``. (..., 3) float64.
    """
    c = np.asarray(read_center_zyx, np.float64)
    s = np.asarray(patch_size_zyx, np.int64)
    return c - s // 2 + (s - 1) / 2.0


def decode_to_world(t, read_center_zyx, patch_size_zyx: Sequence[int], geometry: Geometry):
    """Predicted nodule centre (world mm) and diameter (mm) from a patch's regression.

    Args:
      t: (N, 4) or (4,) predicted (T_z, T_y, T_x, T_d).
      read_center_zyx: (N, 3) or (3,) integer store voxel the patch was read around.
      patch_size_zyx: (3,) S in voxels.
      geometry: the store grid's ``Geometry`` (``ScanRecord.geometry``).

    Returns:
      ``(world_xyz, diameter_mm)``: (N, 3) float64 world (x, y, z) mm and (N,) float64 mm
      (no leading axis for a single (4,) input).
    """
    t = np.asarray(t, np.float64)
    spacing = geometry.spacing_zyx
    off, diam = decode_targets(t, patch_size_zyx, spacing)
    vox = patch_geometric_center(read_center_zyx, patch_size_zyx) + np.asarray(off, np.float64)
    return voxel_to_world(vox, geometry), np.asarray(diam, np.float64)


def _half_voxel(size) -> np.ndarray:
    """S // 2 - (S - 1) / 2: 0.5 on even sizes, 0 on odd ones."""
    s = np.asarray(size, np.float64)
    return s // 2 - (s - 1) / 2.0


def transform_targets(t, params, patch_size_zyx: Sequence[int]) -> np.ndarray:
    """Targets of an augmented patch from those of the plain patch at the same read centre.

    Follows ``lungjax.data.augment``'s order: crop-centre shift -> zoom about the crop's
    centre voxel -> rotation in (y, x) -> flips (``augment.map_point`` on points).

    Args:
      t: (..., 4) targets (T_z, T_y, T_x, T_d) of the unaugmented (patch_size_zyx) patch
        read around integer voxel c.
      params: ``lungjax.data.augment.AugmentParams`` (shift_zyx, scale, rot_k, flips) of
        a 3D patch.
      patch_size_zyx: (3,) output patch size S (after rotation) in voxels.

    Returns:
      (..., 4) float64 targets in the augmented patch. T_d gains log(scale) (a zoom by s
      makes the nodule s times larger in patch voxels).
    """
    t = np.asarray(t, np.float64)
    out = np.asarray(patch_size_zyx, np.float64)
    k = int(params.rot_k) % 4
    pre = out.copy()
    if k % 2:
        pre[1], pre[2] = out[2], out[1]
    # Offset from the read centre voxel c in the unaugmented patch, then after the shift.
    u = t[..., :3] * out / 2.0 - _half_voxel(out) - np.asarray(params.shift_zyx, np.float64)
    # Zoom maps crop voxel c + u to pre // 2 + u * s; relative to the geometric centre:
    q = _half_voxel(pre) + u * float(params.scale)
    z, y, x = q[..., 0], q[..., 1], q[..., 2]
    # np.rot90(axes=(1, 2)) about the centre, on offsets: k=1 (y, x) -> (-x, y).
    if k == 1:
        y, x = -x, y
    elif k == 2:
        y, x = -y, -x
    elif k == 3:
        y, x = x, -y
    q = np.stack([z, y, x], axis=-1)
    q = np.where(np.asarray(params.flips, bool), -q, q)
    t_d = t[..., 3] + np.log(float(params.scale))
    return np.concatenate([2.0 * q / out, t_d[..., None]], axis=-1)


# --------------------------------------------------------------------------- losses


def localization_loss(pred, target) -> jax.Array:
    """Eq. 3 without the indicator: sum over the 4 outputs of smooth-L1. (B, 4) -> (B,)."""
    return jnp.sum(smooth_l1(jnp.asarray(pred, jnp.float32) - jnp.asarray(target, jnp.float32)),
                   axis=-1)


def classification_loss(logits, labels) -> jax.Array:
    """Eq. 1 per sample: -log softmax(logits)[label]. (B, K) float, (B,) int -> (B,) float32."""
    return optax.softmax_cross_entropy_with_integer_labels(
        jnp.asarray(logits, jnp.float32), jnp.asarray(labels, jnp.int32))


def hybrid_loss_terms(logits, regression, labels, targets, weights=None, *,
                      regress_mask=None, lam: float = LAMBDA,
                      reg_normalizer: str = "positives",
                      positive_class: int = 1) -> dict[str, jax.Array]:
    """Per-sample pieces of the hybrid loss and their weighted total.

    Args:
      logits: (B, K) float classification logits.
      regression: (B, 4) float predicted targets, or None (classification only).
      labels: (B,) int class labels.
      targets: (B, 4) float regression targets (ignored where the sample is not regressed).
      weights: (B,) float >= 0 per-sample weights (padding 0, sample filtering); None = 1.
      regress_mask: (B,) bool, samples with a regression target; None = every positive.
        It is and-ed with ``labels == positive_class`` (the indicator of Eq. 3).
      lam: lambda of Eq. 4.
      reg_normalizer: "positives" (N_reg = weighted number of regressed samples) or
        "batch" (N_reg = N).
      positive_class: the nodule class.

    Returns:
      dict of float32 arrays:
        ``cls`` (B,) NLL; ``loc`` (B,) smooth-L1 sum (0 where not regressed);
        ``per_sample`` (B,) = cls + lam * (N / N_reg) * loc, so that
        ``sum(w * per_sample) / sum(w)`` is the loss (how the engine reduces it);
        ``loss`` () that weighted mean; ``cls_loss`` () and ``loc_loss`` () its two terms
        (``loc_loss`` before lambda); ``n_reg`` () = N_reg; ``reg_scale`` () = N / N_reg
        (0 when nothing is regressed); ``regressed`` (B,) 0/1 regression indicator.
    """
    if reg_normalizer not in REG_NORMALIZERS:
        raise ValueError(f"reg_normalizer must be one of {REG_NORMALIZERS}, got "
                         f"{reg_normalizer!r}")
    labels = jnp.asarray(labels)
    b = labels.shape[0]
    w = (jnp.ones((b,), jnp.float32) if weights is None
         else jnp.asarray(weights, jnp.float32))
    cls = classification_loss(logits, labels)
    n = jnp.sum(w)
    if regression is None:
        pos = jnp.zeros((b,), jnp.float32)
        loc = jnp.zeros((b,), jnp.float32)
        scale = jnp.float32(0.0)
        n_reg = jnp.float32(0.0)
    else:
        pos = labels == positive_class
        if regress_mask is not None:
            pos = pos & jnp.asarray(regress_mask, bool)
        pos = pos.astype(jnp.float32)
        loc = pos * localization_loss(regression, targets)
        n_reg = jnp.sum(w * pos) if reg_normalizer == "positives" else n
        # N / N_reg turns the engine's mean over N into the paper's sum / N_reg; no
        # regressed sample in the batch means no localization term (not 0 / 0).
        scale = jnp.where(n_reg > 0, n / jnp.where(n_reg > 0, n_reg, 1.0), 0.0)
    per_sample = cls + lam * scale * loc
    n_safe = jnp.maximum(n, 1e-8)
    cls_loss = jnp.sum(w * cls) / n_safe
    loc_loss = jnp.sum(w * scale * loc) / n_safe
    return {"cls": cls, "loc": loc, "per_sample": per_sample,
            "loss": cls_loss + lam * loc_loss, "cls_loss": cls_loss, "loc_loss": loc_loss,
            "n_reg": n_reg, "reg_scale": scale, "regressed": pos}


def hybrid_loss(logits, regression, labels, targets, weights=None, **kw) -> jax.Array:
    """Scalar hybrid loss (Eq. 4 without the weight-decay term); see ``hybrid_loss_terms``."""
    return hybrid_loss_terms(logits, regression, labels, targets, weights, **kw)["loss"]


def decay_mask(params: Any) -> Any:
    """Pytree of bools, True on weight tensors ("kernel"): biases and batch-norm scales
    and offsets are not decayed (the usual reading of ||W||^2)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def l2_penalty(params: Any, beta: float = BETA, mask: Any = None) -> jax.Array:
    """beta * sum ||W||^2 over the leaves selected by ``mask`` (default ``decay_mask``)."""
    mask = decay_mask(params) if mask is None else mask
    sq = jax.tree_util.tree_map(lambda p, m: jnp.sum(jnp.square(p)) if m else 0.0, params, mask)
    return beta * sum(jax.tree_util.tree_leaves(sq))


# --------------------------------------------------------------------------- task


def split_outputs(outputs) -> tuple[jax.Array, jax.Array | None]:
    """Model outputs -> ((B, K) logits, (B, 4) regression or None).

    Accepts the hybrid network's ``{"logits", "regression"}`` dict or a plain logits array
    (the classification-only ablations); (B, 1, 1, 1, K) arrays are squeezed.
    """
    if isinstance(outputs, Mapping):
        if "logits" not in outputs:
            raise ValueError(f"model outputs have no 'logits' entry (keys {sorted(outputs)})")
        logits, reg = outputs["logits"], outputs.get("regression")
    else:
        logits, reg = outputs, None
    if logits.ndim > 2:
        if any(s != 1 for s in logits.shape[1:-1]):
            raise ValueError(f"hybrid task expects one output per patch, got {logits.shape}")
        logits = logits.reshape(logits.shape[0], logits.shape[-1])
    return logits, reg


@TASKS.register("hybrid")
class HybridTask:
    """Stage-2 task: classification + (for the hybrid network) regression on positives.

    Batch fields (``lungjax.data.pipeline``): ``label`` (B,) int32, ``offset_zyx`` (B, 3)
    float32 voxels from the patch's geometric centre, ``diameter_mm`` (B,) float32 (0 for
    negatives), optional ``weight`` (B,). With a classification-only model the task is
    plain cross entropy, so all three ablations can share it.

    Args:
      num_classes: K.
      positive_class: the nodule class.
      lam: lambda (0.5 in the paper).
      reg_normalizer: "positives" | "batch" (see ``hybrid_loss_terms``).
      patch_size_zyx: S in voxels (``config.data.patch_size_zyx``).
      spacing_zyx: mm per voxel of the store grid (``config.data.spacing_zyx``).

    With online sample filtering on, the engine multiplies the weights after the
    per-sample losses are formed, so N / N_reg is then computed over all samples of the
    batch rather than the kept ones (the paper uses no filtering in this stage).
    """

    def __init__(self, num_classes: int = 2, positive_class: int = 1, lam: float = LAMBDA,
                 reg_normalizer: str = "positives",
                 patch_size_zyx: Sequence[int] = (24, 60, 60),
                 spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0)):
        if not 0 <= positive_class < num_classes:
            raise ValueError(f"task.positive_class={positive_class} outside [0, {num_classes})")
        if reg_normalizer not in REG_NORMALIZERS:
            raise ValueError(f"task.reg_normalizer must be one of {REG_NORMALIZERS}, got "
                             f"{reg_normalizer!r}")
        if len(patch_size_zyx) != 3 or len(spacing_zyx) != 3:
            raise ValueError("task.patch_size_zyx and task.spacing_zyx need 3 entries (z, y, x)")
        self.num_classes = num_classes
        self.positive_class = positive_class
        self.lam = float(lam)
        self.reg_normalizer = reg_normalizer
        self.patch_size_zyx = tuple(int(s) for s in patch_size_zyx)
        self.spacing_zyx = tuple(float(s) for s in spacing_zyx)

    def targets(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """(B, 4) regression targets from the batch's offsets and diameters."""
        return encode_targets(batch["offset_zyx"], batch["diameter_mm"], self.patch_size_zyx,
                              self.spacing_zyx)

    def _terms(self, outputs, batch):
        logits, reg = split_outputs(outputs)
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"model gives {logits.shape[-1]} classes, task expects "
                             f"{self.num_classes}")
        targets = mask = None
        if reg is not None:
            targets = self.targets(batch)
            mask = jnp.asarray(batch["diameter_mm"]) > 0
        return logits, reg, hybrid_loss_terms(
            logits, reg, batch["label"], targets, batch.get("weight"), regress_mask=mask,
            lam=self.lam, reg_normalizer=self.reg_normalizer, positive_class=self.positive_class)

    def per_sample_loss(self, outputs, batch: Mapping[str, jax.Array]) -> jax.Array:
        """(B,) float32; its weighted mean is the hybrid loss (``hybrid_loss_terms``)."""
        return self._terms(outputs, batch)[2]["per_sample"]

    def per_sample_metrics(self, outputs, batch) -> dict[str, jax.Array]:
        """(B,) float32 values whose weighted means are the reported metrics.

        ``cls_loss`` and ``loc_loss`` average to the two terms of the loss;
        ``diameter_abs_err_mm`` is |predicted - true| diameter scaled like ``loc_loss``,
        so its mean is over regressed samples.
        """
        logits, reg, terms = self._terms(outputs, batch)
        label = batch["label"]
        out = {
            "accuracy": (jnp.argmax(logits, -1) == label).astype(jnp.float32),
            "positive_fraction": (label == self.positive_class).astype(jnp.float32),
            "cls_loss": terms["cls"],
        }
        if reg is not None:
            _, diam = decode_targets(reg, self.patch_size_zyx, self.spacing_zyx)
            w_reg = terms["reg_scale"] * terms["regressed"]
            out["loc_loss"] = terms["reg_scale"] * terms["loc"]
            out["diameter_abs_err_mm"] = w_reg * jnp.abs(diam - batch["diameter_mm"])
        return out

    def probabilities(self, outputs) -> jax.Array:
        """(B,) float32 probability of ``positive_class``."""
        logits, _ = split_outputs(outputs)
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., self.positive_class]

    def decode(self, outputs) -> dict[str, jax.Array]:
        """Probability plus, for the hybrid network, the regressed nodule.

        Returns:
          ``score`` (B,) float32 and, with a regression head, ``offset_zyx`` (B, 3) voxels
          from the patch's geometric centre and ``diameter_mm`` (B,).
        """
        _, reg = split_outputs(outputs)
        out = {"score": self.probabilities(outputs)}
        if reg is not None:
            out["offset_zyx"], out["diameter_mm"] = decode_targets(
                reg, self.patch_size_zyx, self.spacing_zyx)
        return out

    def host_outputs(self, outputs, batch) -> dict[str, jax.Array]:
        """Per-sample (B,) arrays for samplers and evaluators (score, label, diameter)."""
        dec = self.decode(outputs)
        host = {"score": dec["score"], "label": jnp.asarray(batch["label"]).astype(jnp.int32)}
        if "diameter_mm" in dec:
            host["pred_diameter_mm"] = dec["diameter_mm"]
        return host
