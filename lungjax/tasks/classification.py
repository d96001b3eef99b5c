"""Patch classification task: per-sample losses, metrics and probabilities.

Binary (K = 2, one class named positive) or multi-class (K > 2, softmax) with optional
class weights. A task turns model outputs and a batch into per-sample losses (the engine weights and
reduces them, which is what online sample filtering and host-side samplers need), per-sample
metric values, and the probabilities a predictor exports. Models may be fully convolutional:
outputs of shape (B, 1, ..., 1, K) (one cell per training patch) are accepted and squeezed.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import optax

from lungjax.registry import LOSSES, TASKS


@LOSSES.register("softmax_cross_entropy")
def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0):
    """(B, K) float logits, (B,) int labels -> (B,) float32 negative log-likelihood."""
    num_classes = logits.shape[-1]
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if label_smoothing:
        onehot = optax.smooth_labels(onehot, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), onehot)


@LOSSES.register("sigmoid_focal")
def sigmoid_focal(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0,
                  gamma: float = 2.0):
    """Focal loss on the foreground logit difference; (B, 2) logits -> (B,) float32."""
    del label_smoothing
    z = (logits[:, 1] - logits[:, 0]).astype(jnp.float32)
    return optax.sigmoid_focal_loss(z, labels.astype(jnp.float32), gamma=gamma)


@TASKS.register("classification")
class ClassificationTask:
    """K-way classification of a patch (``batch["label"]``: (B,) int32 in [0, K)).

    Args:
      num_classes: K >= 2.
      loss: a LOSSES name.
      label_smoothing: passed to the loss.
      positive_class: the class whose probability is the "score" (nodule-ness,
        malignancy).
      class_weights: () for none, else K floats: each sample's loss is multiplied by
        the weight of its label. The engine divides the weighted sum by the sum of the
        *sample* weights, so a batch's loss is ``sum_i cw[y_i] l_i / N`` (a fixed scale
        per class, not renormalised by the batch's class mix).
    """

    def __init__(self, num_classes: int = 2, loss: str = "softmax_cross_entropy",
                 label_smoothing: float = 0.0, positive_class: int = 1,
                 class_weights: tuple[float, ...] = ()):
        if num_classes < 2:
            raise ValueError(f"task.num_classes must be >= 2, got {num_classes}")
        if not 0 <= positive_class < num_classes:
            raise ValueError(f"task.positive_class={positive_class} outside [0, {num_classes})")
        class_weights = tuple(float(w) for w in class_weights)
        if class_weights and (len(class_weights) != num_classes
                              or any(not w >= 0 for w in class_weights)):
            raise ValueError(f"task.class_weights must be {num_classes} non-negative values "
                             f"(or empty), got {class_weights}")
        self.num_classes = num_classes
        self.loss_fn = LOSSES.get(loss)
        self.label_smoothing = label_smoothing
        self.positive_class = positive_class
        self.class_weights = class_weights

    def logits(self, outputs: jax.Array) -> jax.Array:
        """(B, [1, ..., 1,] K) -> (B, K); a larger spatial output is an error here."""
        if outputs.ndim > 2:
            spatial = outputs.shape[1:-1]
            if any(s != 1 for s in spatial):
                raise ValueError(
                    f"classification expects one output cell per patch, got spatial {spatial}; "
                    "the training patch must equal the model's receptive field")
            outputs = outputs.reshape(outputs.shape[0], outputs.shape[-1])
        if outputs.shape[-1] != self.num_classes:
            raise ValueError(f"model gives {outputs.shape[-1]} classes, task expects "
                             f"{self.num_classes}")
        return outputs

    def per_sample_loss(self, outputs: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
        """(B,) float32 loss of each sample (before sample weighting; class weights
        applied)."""
        loss = self.loss_fn(self.logits(outputs), batch["label"],
                            label_smoothing=self.label_smoothing)
        if not self.class_weights:
            return loss  # unweighted: the same ops as before class weights existed
        cw = jnp.asarray(self.class_weights, jnp.float32)
        return loss * cw[batch["label"]]

    def per_sample_metrics(self, outputs, batch) -> dict[str, jax.Array]:
        """Per-sample (B,) float32 values; the engine takes their weighted mean."""
        logits = self.logits(outputs)
        label = batch["label"]
        correct = (jnp.argmax(logits, -1) == label).astype(jnp.float32)
        pos = (label == self.positive_class).astype(jnp.float32)
        return {"accuracy": correct, "positive_fraction": pos}

    def probabilities(self, outputs: jax.Array) -> jax.Array:
        """Probability of ``positive_class`` per output cell: (B, ...) float32.

        Works on fully convolutional outputs too: (B, D', H', W', K) -> (B, D', H', W').
        """
        return jax.nn.softmax(outputs.astype(jnp.float32), axis=-1)[..., self.positive_class]

    def decode(self, outputs) -> dict[str, jax.Array]:
        """A patch classifier's result per sample: ``score`` (B,) float32, the probability
        of ``positive_class`` (a candidate-scoring stage writes it as the mark's)."""
        return {"score": self.probabilities(self.logits(outputs))}

    def log_odds(self, outputs: jax.Array) -> jax.Array:
        """Log-odds of ``positive_class`` per output cell: (B, ...) float32,
        ``logit[pos] - logsumexp(logit[others])`` = ``log(p / (1 - p))``.

        Screening ranks cells by it: the float32 probability saturates at 1.0 once the
        log-odds pass ~17, and a whole scan's worth of such ties would be cut by position
        instead of by score.
        """
        z = outputs.astype(jnp.float32)
        pos = z[..., self.positive_class]
        others = jnp.delete(z, self.positive_class, axis=-1, assume_unique_indices=True)
        return pos - jax.nn.logsumexp(others, axis=-1)

    def host_outputs(self, outputs, batch) -> dict[str, jax.Array]:
        """Per-sample arrays the host needs (samplers, evaluators): ``score`` (B,) float32
        probability of ``positive_class``, ``label`` (B,) int32, and with K > 2
        ``probabilities`` (B, K) float32 (softmax over the classes)."""
        logits = self.logits(outputs)
        out = {"score": self.probabilities(logits), "label": batch["label"].astype(jnp.int32)}
        if self.num_classes > 2:
            out["probabilities"] = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        return out
