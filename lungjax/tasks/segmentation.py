"""Dense segmentation task, 2D (B, H, W) or 3D (B, D, H, W): per-sample losses, metrics,
host outputs and the foreground probability map.

Model outputs are channels-last logits ``(B, *spatial, C)`` float:

* ``C == 1``: one sigmoid channel, the foreground logit;
* ``C >= 2``: softmax over C classes, class 0 = background; the foreground is every
  class > 0 (for C = 2, class 1).

Targets come as ``batch["mask"]``: ``(B, *spatial)`` (or with a trailing channel of 1),
uint8 / int / float32, 0 = background; with ``C >= 2`` its values are class indices in
``[0, C)``, with ``C == 1`` it is 0/1.

Losses (``loss=``):

* ``"bce"``: voxel-mean cross-entropy (sigmoid BCE for C = 1, softmax CE for C >= 2;
  the two agree for a sigmoid logit z and the 2-class logits (0, z));
* ``"dice"``: soft Dice loss per sample, ``1 - (2 sum(p y) + s) / (sum p + sum y + s)``
  with ``s = dice_smooth``, averaged over the foreground classes when C > 2;
* ``"bce_dice"``: their sum;
* ``"bce_then_dice"``: BCE while ``step < switch_step``, Dice from then on (Yu et al.
  2021: BCE for the first epochs). The step comes in the batch as ``batch["step"]``, a
  () integer scalar (or (B,), one per row), the number of optimizer updates already
  applied (``state.step`` before the update); the jitted train and eval steps add it,
  so the switch costs no recompilation.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import optax

from lungjax.registry import TASKS

LOSS_NAMES = ("bce", "dice", "bce_dice", "bce_then_dice")


@TASKS.register("segmentation")
class SegmentationTask:
    """Foreground segmentation of a patch, slice or volume.

    Args:
      num_classes: output channels C: 1 = sigmoid, >= 2 = softmax (0 = background).
      loss: one of ``LOSS_NAMES`` (see the module docstring).
      switch_step: with ``loss="bce_then_dice"``, the first step trained on Dice
        (> 0; steps per epoch x epochs when a paper counts epochs).
      dice_smooth: s of the soft Dice; keeps the loss and its gradient finite and the
        loss 0 for an empty prediction of an empty mask.
      threshold: foreground probability at which a voxel counts as foreground in the
        hard metrics (``dice``, ``iou``) and host outputs.
    """

    def __init__(self, num_classes: int = 1, loss: str = "bce_dice", switch_step: int = 0,
                 dice_smooth: float = 1.0, threshold: float = 0.5):
        if num_classes < 1:
            raise ValueError(f"task.num_classes must be >= 1, got {num_classes}")
        if loss not in LOSS_NAMES:
            raise ValueError(f"task.loss={loss!r}; expected one of {LOSS_NAMES}")
        if loss == "bce_then_dice" and switch_step <= 0:
            raise ValueError("task.loss='bce_then_dice' needs task.switch_step > 0 (the "
                             "first step trained on Dice)")
        if dice_smooth <= 0:
            raise ValueError(f"task.dice_smooth must be > 0, got {dice_smooth}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"task.threshold must be in (0, 1), got {threshold}")
        self.num_classes = num_classes
        self.loss = loss
        self.switch_step = int(switch_step)
        self.dice_smooth = float(dice_smooth)
        self.threshold = float(threshold)

    # -- shapes ------------------------------------------------------------------------

    def logits(self, outputs: jax.Array) -> jax.Array:
        """Checks and returns (B, *spatial, C) float32 logits."""
        if outputs.ndim < 3:
            raise ValueError(f"segmentation expects (B, *spatial, C) outputs, got shape "
                             f"{outputs.shape}")
        if outputs.shape[-1] != self.num_classes:
            raise ValueError(f"model gives {outputs.shape[-1]} channels, task expects "
                             f"{self.num_classes}")
        return outputs.astype(jnp.float32)

    def target(self, outputs: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
        """``batch["mask"]`` as (B, *spatial), same spatial shape as ``outputs``."""
        mask = batch["mask"]
        if mask.ndim == outputs.ndim and mask.shape[-1] == 1:
            mask = mask[..., 0]
        if mask.shape != outputs.shape[:-1]:
            raise ValueError(f"batch['mask'] has shape {mask.shape}; the model's output "
                             f"needs {outputs.shape[:-1]} (the model must keep the input size)")
        return mask

    # -- losses ------------------------------------------------------------------------

    def _cross_entropy(self, z: jax.Array, mask: jax.Array) -> jax.Array:
        axes = tuple(range(1, z.ndim - 1))
        if self.num_classes == 1:
            ce = optax.sigmoid_binary_cross_entropy(z[..., 0], mask.astype(jnp.float32))
        else:
            ce = optax.softmax_cross_entropy_with_integer_labels(z, mask.astype(jnp.int32))
        return jnp.mean(ce, axis=axes)

    def _soft_dice_loss(self, z: jax.Array, mask: jax.Array) -> jax.Array:
        axes = tuple(range(1, z.ndim - 1))
        s = self.dice_smooth
        if self.num_classes == 1:
            p = jax.nn.sigmoid(z)                                       # (B, *spatial, 1)
            y = mask.astype(jnp.float32)[..., None]
        else:
            p = jax.nn.softmax(z, axis=-1)[..., 1:]                     # foreground classes
            y = jax.nn.one_hot(mask.astype(jnp.int32), self.num_classes,
                               dtype=jnp.float32)[..., 1:]
        inter = jnp.sum(p * y, axis=axes)                               # (B, C')
        den = jnp.sum(p, axis=axes) + jnp.sum(y, axis=axes)
        return 1.0 - jnp.mean((2.0 * inter + s) / (den + s), axis=-1)

    def per_sample_loss(self, outputs: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
        """(B,) float32 loss of each sample (before weighting).

        ``loss="bce_then_dice"`` reads ``batch["step"]`` (() or (B,) int): BCE before
        ``switch_step``, Dice from it on.
        """
        z = self.logits(outputs)
        mask = self.target(outputs, batch)
        if self.loss == "bce":
            return self._cross_entropy(z, mask)
        if self.loss == "dice":
            return self._soft_dice_loss(z, mask)
        if self.loss == "bce_dice":
            return self._cross_entropy(z, mask) + self._soft_dice_loss(z, mask)
        if "step" not in batch:
            raise KeyError("task.loss='bce_then_dice' needs batch['step'] (the () int "
                           "optimizer step), added by the train and eval steps")
        return jnp.where(jnp.asarray(batch["step"]) < self.switch_step,
                         self._cross_entropy(z, mask), self._soft_dice_loss(z, mask))

    # -- probabilities and metrics -----------------------------------------------------

    def log_odds(self, outputs: jax.Array) -> jax.Array:
        """Foreground log-odds per voxel: (B, *spatial) float32 (C = 1: the logit;
        C >= 2: ``logsumexp(z[1:]) - z[0]``)."""
        z = outputs.astype(jnp.float32)
        if z.shape[-1] == 1:
            return z[..., 0]
        return jax.nn.logsumexp(z[..., 1:], axis=-1) - z[..., 0]

    def probabilities(self, outputs: jax.Array) -> jax.Array:
        """Foreground probability map: (B, *spatial) float32 in [0, 1]."""
        return jax.nn.sigmoid(self.log_odds(outputs))

    def _counts(self, outputs, batch) -> dict[str, jax.Array]:
        mask = self.target(outputs, batch)
        pred = self.probabilities(self.logits(outputs)) >= self.threshold
        truth = mask.astype(jnp.float32) >= 0.5                         # any class > 0
        axes = tuple(range(1, pred.ndim))
        tp = jnp.sum(pred & truth, axis=axes, dtype=jnp.int32)
        fp = jnp.sum(pred & ~truth, axis=axes, dtype=jnp.int32)
        fn = jnp.sum(~pred & truth, axis=axes, dtype=jnp.int32)
        return {"tp": tp, "fp": fp, "fn": fn}

    @staticmethod
    def _overlap(c: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        tp, fp, fn = (c[k].astype(jnp.float32) for k in ("tp", "fp", "fn"))
        # Both masks empty: a perfect answer (1), as lungjax.evaluation.segmentation.dice.
        d = jnp.where(tp + fp + fn > 0, 2 * tp / jnp.maximum(2 * tp + fp + fn, 1), 1.0)
        iou = jnp.where(tp + fp + fn > 0, tp / jnp.maximum(tp + fp + fn, 1), 1.0)
        return d, iou

    def per_sample_metrics(self, outputs, batch) -> dict[str, jax.Array]:
        """Per-sample (B,) float32 ``dice`` and ``iou`` of the mask thresholded at
        ``threshold``; the engine takes their weighted mean."""
        d, iou = self._overlap(self._counts(outputs, batch))
        return {"dice": d, "iou": iou}

    def host_outputs(self, outputs, batch) -> dict[str, jax.Array]:
        """What samplers and evaluators read on the host.

        Per sample (B,): ``dice``, ``iou`` (float32, at ``threshold``); ``tp``, ``fp``,
        ``fn`` (int32 voxel counts at ``threshold``); ``score`` (float32, the largest
        foreground probability: a slice or patch screening score); ``label`` (int32,
        1 = the target has foreground). Maps: ``probability`` (B, *spatial) float32
        foreground probability and ``mask`` (B, *spatial) uint8 0/1 target foreground.
        ``spacing`` (B, ndim) is passed through when the batch has it.
        """
        c = self._counts(outputs, batch)
        d, iou = self._overlap(c)
        prob = self.probabilities(self.logits(outputs))
        truth = self.target(outputs, batch).astype(jnp.float32) >= 0.5
        axes = tuple(range(1, prob.ndim))
        out = {"dice": d, "iou": iou, **c,
               "score": jnp.max(prob, axis=axes),
               "label": jnp.any(truth, axis=axes).astype(jnp.int32),
               "probability": prob, "mask": truth.astype(jnp.uint8)}
        if "spacing" in batch:
            out["spacing"] = batch["spacing"].astype(jnp.float32)
        return out
