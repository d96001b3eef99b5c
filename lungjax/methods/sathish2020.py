"""Sathish et al. (EMBC 2020): the Turing-test adversarial training step of the lung
segmenter (``config.train.step = "turing_test"``).

Each step, in one jitted sharded function (``lungjax.steps.make_alternating_step``):

1. discriminator: the segmenter's current foreground probability map P (B, H, W) and the
   ground-truth mask G (B, H, W) are stacked as a (B, H, W, 2) pair whose channel order
   is drawn per slice; the discriminator's two sigmoid outputs say which channel is G
   (labels (B, 2): (1, 0) when G is channel 0). Its loss J_adv is that binary cross
   entropy; one optimizer update.
2. segmenter: J_net = J_seg - alpha * J_adv, with J_seg the task's loss (weighted mean
   over the batch) and J_adv the updated discriminator's loss on a freshly shuffled pair
   built from the segmenter's live prediction (the segmenter is rewarded for masks the
   discriminator cannot tell from the truth); one optimizer update.

Config: ``config.sathish2020.alpha`` (the paper's 0.001); the segmenter is
``config.train.network`` (the task's network), the discriminator
``config.networks.discriminator`` with ``input_channels = 2``. The ground truth is the
batch's ``mask`` (``data.batch_mask_array = "lung"``: the store's lung mask).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from lungjax.registry import STEPS
from lungjax.state import step_key
from lungjax.steps import apply_gradients, model_rngs, rng_streams

SEGMENTER, DISCRIMINATOR = "segmenter", "discriminator"


def turing_pairs(truth: jax.Array, pred: jax.Array, key: jax.Array):
    """The discriminator's input and labels.

    Args:
      truth: (B, H, W) float32 ground-truth mask in {0, 1}.
      pred: (B, H, W) float32 predicted foreground probability.
      key: PRNG key drawing each slice's channel order.

    Returns:
      ``(pairs, labels)``: (B, H, W, 2) float32 with G in channel 0 where ``labels[:, 0]``
      is 1 (else in channel 1), and (B, 2) float32 one-hot labels "channel k is G".
    """
    gt_first = jax.random.bernoulli(key, 0.5, truth.shape[:1])
    sel = gt_first[:, None, None]
    pairs = jnp.stack([jnp.where(sel, truth, pred), jnp.where(sel, pred, truth)], axis=-1)
    g = gt_first.astype(jnp.float32)
    return pairs, jnp.stack([g, 1.0 - g], axis=-1)


def _weighted_mean(values: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.sum(w * values) / jnp.maximum(jnp.sum(w), 1e-8)


@STEPS.register("turing_test")
def turing_test_step(config, networks, task):
    """Step factory: ``[("discriminator", update), ("segmenter", update)]`` (see the
    module docstring). Reads ``config.sathish2020.alpha`` and ``config.rng_impl``; the
    stage's networks must be exactly the segmenter (``config.train.network``) and
    ``discriminator``."""
    names = list(networks)
    if len(names) != 2 or names[1] != DISCRIMINATOR:
        raise ValueError(f"config.train.step='turing_test' needs the segmenter "
                         f"(config.train.network) and config.networks.{DISCRIMINATOR}; the "
                         f"stage has {', '.join(names)}")
    seg_name = names[0]
    seg, disc = networks[seg_name], networks[DISCRIMINATOR]
    alpha = float(config.sathish2020.alpha)
    impl = config.rng_impl
    seg_streams, disc_streams = rng_streams(seg.model), rng_streams(disc.model)

    def segment(state, batch, params):
        """Segmenter forward in training mode: (logits, new model state)."""
        image = batch["image"]
        if image.ndim == 3:
            image = image[..., None]
        out, ms = seg.model.apply({"params": params, **state.model_state}, image, train=True,
                                  rngs=model_rngs(step_key(state, impl), seg_streams),
                                  mutable=list(state.model_state))
        return out, dict(ms)

    def truth_of(outputs, batch):
        return (task.target(outputs, batch).astype(jnp.float32) >= 0.5).astype(jnp.float32)

    def adversarial(d_state, d_params, pred, truth, key):
        """(B,) float32 per-slice BCE of the discriminator, its new model state, and
        (B,) 1.0 where it picked the ground-truth channel."""
        pairs, labels = turing_pairs(truth, pred, key)
        logits, ms = disc.model.apply({"params": d_params, **d_state.model_state}, pairs,
                                      train=True, rngs=model_rngs(key, disc_streams),
                                      mutable=list(d_state.model_state))
        bce = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels), axis=-1)
        right = (jnp.argmax(logits, -1) == jnp.argmax(labels, -1)).astype(jnp.float32)
        return bce, dict(ms), right

    def disc_update(states, batch):
        s, d = states[seg_name], states[DISCRIMINATOR]
        out, _ = segment(s, batch, s.params)
        pred = jax.lax.stop_gradient(task.probabilities(out))
        truth = truth_of(out, batch)
        w = batch["weight"].astype(jnp.float32)
        key = step_key(d, impl)

        def loss_fn(p):
            bce, ms, right = adversarial(d, p, pred, truth, key)
            return _weighted_mean(bce, w), (ms, right)

        (loss, (ms, right)), g = jax.value_and_grad(loss_fn, has_aux=True)(d.params)
        new = apply_gradients(d, disc.tx, g, model_state=ms, value=loss)
        return new, {"loss": loss, "accuracy": _weighted_mean(right, w)}, {}

    def seg_update(states, batch):
        s, d = states[seg_name], states[DISCRIMINATOR]
        batch = {**batch, "step": s.step}
        w = batch["weight"].astype(jnp.float32)
        # A key the discriminator's update did not use: a fresh channel order.
        key = jax.random.fold_in(step_key(d, impl), 1)

        def loss_fn(params):
            out, ms = segment(s, batch, params)
            losses = task.per_sample_loss(out, batch)
            j_seg = _weighted_mean(losses, w)
            bce, _, _ = adversarial(d, d.params, task.probabilities(out), truth_of(out, batch),
                                    key)
            j_adv = _weighted_mean(bce, w)
            return j_seg - alpha * j_adv, (j_seg, j_adv, losses, out, ms)

        (loss, (j_seg, j_adv, losses, out, ms)), g = jax.value_and_grad(
            loss_fn, has_aux=True)(s.params)
        new = apply_gradients(s, seg.tx, g, model_state=ms, value=j_seg)
        metrics = {"loss": loss, "seg_loss": j_seg, "adv_loss": j_adv,
                   "grad_norm": optax.tree.norm(g)}
        for k, v in task.per_sample_metrics(out, batch).items():
            metrics[k] = _weighted_mean(v, w)
        host = {"loss": losses}
        if "index" in batch:
            host["index"] = batch["index"]
        return new, metrics, host

    return [(DISCRIMINATOR, disc_update), (seg_name, seg_update)]
