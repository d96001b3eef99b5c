"""Factories of pure step functions: train, eval, predict.

Every step returns ``(state, metrics, host_outputs)``:

* ``metrics``: dict of () float32 scalars, means over the global batch;
* ``host_outputs``: dict of (B,) arrays, one value per sample of the global batch, in batch
  order (per-sample losses, scores, labels, the sample ``index`` the pipeline attached).
  They feed host-side samplers (hard-negative mining) and evaluators; the loop fetches
  them one step late so dispatch stays asynchronous.

Batches are dicts: ``image`` (B, D, H, W, C) or (B, H, W, C) float32 (a missing channel
axis is added), ``label`` (B,) int32, optional ``weight`` (B,) float32 (0 = padding),
optional ``index`` (B,) int64/int32 sample ids.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from lungjax.state import TrainState, plateau_scale, step_key


def _image(batch: Mapping[str, jax.Array], spatial_dims: int) -> jax.Array:
    x = batch["image"]
    if x.ndim == spatial_dims + 1:  # (B, *spatial) -> channels-last with one channel
        x = x[..., None]
    if x.ndim != spatial_dims + 2:
        raise ValueError(f"batch['image'] has shape {x.shape}; expected (B, {spatial_dims} "
                         "spatial axes, C)")
    return x


def _weights(batch: Mapping[str, jax.Array]) -> jax.Array:
    if "weight" in batch:
        return batch["weight"].astype(jnp.float32)
    return jnp.ones(batch["label"].shape[:1], jnp.float32)


def hash_uniform(seed: jax.Array, n: int) -> jax.Array:
    """(n,) float32 in [0, 1) from a uint32 seed, by an integer hash of (seed, i).

    Used instead of ``jax.random`` where the same values are needed whatever the device
    sharding (XLA's RngBitGenerator does not promise that) and to keep compile time low.
    """
    x = jnp.arange(n, dtype=jnp.uint32) * jnp.uint32(0x9E3779B9) + seed.astype(jnp.uint32)
    # murmur3 finaliser: a good avalanche for consecutive inputs.
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    x = x ^ (x >> 16)
    return (x >> 8).astype(jnp.float32) / jnp.float32(1 << 24)


def online_sample_filter(losses: jax.Array, seed: jax.Array, hard_fraction: float = 0.5,
                         easy_keep: float = 0.5) -> jax.Array:
    """Dou et al.'s online sample filtering (OSF) mask.

    Sorts the batch by loss; the ``hard_fraction`` with the highest loss are kept (hard
    samples), and a random ``easy_keep`` share of the remaining ones (easy samples); the
    others get weight 0 for this update.

    Args:
      losses: (B,) float32 per-sample losses (no gradient flows through the selection).
      seed: () uint32 seed for the random choice of easy samples.
      hard_fraction: share of the batch kept as hard samples.
      easy_keep: share of the remaining samples kept.

    Returns:
      (B,) float32 mask of 0/1, with round(B*h) + round((B - round(B*h)) * e) ones.
    """
    b = losses.shape[0]
    n_hard = int(round(b * hard_fraction))
    n_keep = n_hard + int(round((b - n_hard) * easy_keep))
    losses = jax.lax.stop_gradient(losses)
    # Rank by loss, descending; ties broken by position so the choice is deterministic.
    order = jnp.argsort(-losses, stable=True)
    hard = jnp.zeros((b,), bool).at[order[:n_hard]].set(True)
    # Hard samples sort first (key -1), then the rest in a random order (key in [0, 1)).
    key = jnp.where(hard, -1.0, hash_uniform(seed, b))
    keep = jnp.argsort(key, stable=True)[:n_keep]
    return jnp.zeros((b,), jnp.float32).at[keep].set(1.0)


def _apply(model, state_or_vars, params, model_state, image, train, rngs):
    mutable = [k for k in model_state] if train else False
    variables = {"params": params, **model_state}
    if mutable:
        outputs, new_state = model.apply(variables, image, train=True, rngs=rngs,
                                         mutable=mutable)
        return outputs, dict(new_state)
    return model.apply(variables, image, train=train, rngs=rngs), model_state


def make_train_step(model, task, tx: optax.GradientTransformation, *, spatial_dims: int = 3,
                    osf: Mapping[str, Any] | None = None, rng_impl: str = "rbg",
                    state_shardings: Any = None, mesh: Any = None, donate: bool = True):
    """Returns a jitted ``train_step(state, batch) -> (state, metrics, host_outputs)``.

    Args:
      model: Flax module ``(x, train) -> outputs``.
      task: a task object (``per_sample_loss``, ``per_sample_metrics``, ``host_outputs``).
      tx: the optimizer.
      spatial_dims: 3 for volumes, 2 for slices.
      osf: ``dict(enabled, hard_fraction, easy_keep)`` for online sample filtering,
        applied inside the step; None or ``enabled=False`` trains on every sample.
      state_shardings / mesh: when given, the step is jitted with explicit shardings
        (state as ``state_shardings``, batch split on "data", outputs replicated); else
        plain ``jax.jit``.
      donate: donate the input state (its buffers are reused for the output).
      rng_impl: PRNG implementation of ``state.rng`` (dropout and other model noise).

    The optimizer's ``update`` receives ``value=`` the batch's mean loss over every
    weighted sample (``loss_all``: with OSF the selected samples change from step to step,
    so their mean is a poorer progress signal), read by a plateau schedule and ignored by
    other optimizers. With a plateau schedule the metrics include ``lr_scale``.
    """
    use_osf = bool(osf and osf.get("enabled", True))
    tx = optax.with_extra_args_support(tx)

    def train_step(state: TrainState, batch):
        dropout_rng = step_key(state, rng_impl)
        osf_seed = state.rng[0] ^ (state.step.astype(jnp.uint32) * jnp.uint32(2654435761))
        image = _image(batch, spatial_dims)
        w = _weights(batch)

        def loss_fn(params):
            outputs, new_model_state = _apply(model, None, params, state.model_state, image,
                                              True, {"dropout": dropout_rng,
                                                     # RReLU slopes (xie2018) draw apart
                                                     "rrelu": jax.random.fold_in(
                                                         dropout_rng, 1)})
            losses = task.per_sample_loss(outputs, batch)
            sel = w
            if use_osf:
                sel = w * online_sample_filter(losses, osf_seed, osf.get("hard_fraction", 0.5),
                                               osf.get("easy_keep", 0.5))
            loss = jnp.sum(sel * losses) / jnp.maximum(jnp.sum(sel), 1e-8)
            return loss, (outputs, losses, sel, new_model_state)

        (loss, (outputs, losses, sel, new_ms)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        wsum = jnp.maximum(jnp.sum(w), 1e-8)
        loss_all = jnp.sum(w * losses) / wsum
        updates, opt_state = tx.update(grads, state.opt_state, state.params, value=loss_all)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, model_state=new_ms,
                                  opt_state=opt_state)
        metrics = {
            "loss": loss,
            "loss_all": loss_all,
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
            "selected_fraction": jnp.sum(sel) / wsum,
        }
        scale = plateau_scale(opt_state)
        if scale is not None:
            metrics["lr_scale"] = scale.astype(jnp.float32)
        for k, v in task.per_sample_metrics(outputs, batch).items():
            metrics[k] = jnp.sum(w * v) / wsum
        host = {"loss": losses, "selected": sel, **task.host_outputs(outputs, batch)}
        if "index" in batch:
            host["index"] = batch["index"]
        return new_state, metrics, host

    return _jit(train_step, state_shardings, mesh, donate)


def apply_gradients(state: TrainState, tx: optax.GradientTransformation, grads,
                    model_state=None, value: jax.Array | None = None) -> TrainState:
    """One optimizer update of ``state`` (for hand-written steps, e.g. adversarial ones).

    ``value``: the () training loss, required by a plateau schedule (``make_plateau``),
    ignored by other optimizers.
    """
    extra = {} if value is None else {"value": value}
    updates, opt_state = optax.with_extra_args_support(tx).update(
        grads, state.opt_state, state.params, **extra)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state,
                         model_state=state.model_state if model_state is None else model_state)


def make_alternating_step(updates, *, state_shardings: Any = None, mesh: Any = None,
                          donate: bool = True):
    """Jitted step over several networks updated in turn, each with its own optimizer.

    For methods such as an adversarial segmenter: first the discriminator update, then
    the segmenter update that sees the new discriminator.

    Args:
      updates: sequence of ``(name, fn)``; ``fn(states, batch) -> (new_state, metrics,
        host_outputs)`` where ``states`` is the dict of every network's ``TrainState``
        as updated by the functions before it, and ``new_state`` replaces ``states[name]``.
      state_shardings / mesh / donate: as in ``make_train_step`` (``state_shardings`` is
        the dict of per-network shardings).

    Returns:
      ``step(states, batch) -> (states, metrics, host_outputs)``; metric and host-output
      names are prefixed "<name>/".
    """
    updates = list(updates)

    def step(states, batch):
        metrics, host = {}, {}
        for name, fn in updates:
            new, m, h = fn(states, batch)
            states = {**states, name: new}
            metrics.update({f"{name}/{k}": v for k, v in m.items()})
            host.update({f"{name}/{k}": v for k, v in h.items()})
        return states, metrics, host

    return _jit(step, state_shardings, mesh, donate)


def make_eval_step(model, task, *, spatial_dims: int = 3, state_shardings: Any = None,
                   mesh: Any = None):
    """Returns ``eval_step(state, batch) -> (state, metrics, host_outputs)``.

    ``metrics`` here are weighted SUMS plus ``"weight"`` (the sum of weights) so the
    caller can accumulate over batches of an epoch and divide once; the state is returned
    unchanged.
    """

    def eval_core(state: TrainState, batch):
        image = _image(batch, spatial_dims)
        w = _weights(batch)
        outputs, _ = _apply(model, None, state.params, state.model_state, image, False, {})
        losses = task.per_sample_loss(outputs, batch)
        metrics = {"loss": jnp.sum(w * losses), "weight": jnp.sum(w)}
        for k, v in task.per_sample_metrics(outputs, batch).items():
            metrics[k] = jnp.sum(w * v)
        host = {"loss": losses, "weight": w, **task.host_outputs(outputs, batch)}
        if "index" in batch:
            host["index"] = batch["index"]
        return metrics, host

    core = _jit(eval_core, state_shardings, mesh, donate=False, returns_state=False)

    def eval_step(state, batch):
        metrics, host = core(state, batch)
        return state, metrics, host

    return eval_step


def make_predict_fn(model, task, spatial_dims: int = 3, output: str = "probability") -> Callable:
    """Pure ``predict(variables, image) -> scores`` for export and screening.

    ``image``: (B, *spatial[, C]) float32 in [0, 1]; the result is the task's
    probability per output cell, e.g. (B, D', H', W') float32 for the FCN, or with
    ``output="log_odds"`` its log-odds (``task.log_odds``: no saturation at 1.0).
    """
    if output not in ("probability", "log_odds"):
        raise ValueError(f"output must be 'probability' or 'log_odds', got {output!r}")
    score = task.probabilities if output == "probability" else task.log_odds

    def predict(variables, image):
        x = _image({"image": image}, spatial_dims)
        return score(model.apply(variables, x, train=False))

    return predict


def make_predict_step(model, task, *, spatial_dims: int = 3):
    """Returns a jitted ``predict_step(state, batch) -> (state, {}, {"score": ...})``."""
    fn = jax.jit(make_predict_fn(model, task, spatial_dims))

    def predict_step(state, batch):
        return state, {}, {"score": fn(state.variables(), batch["image"])}

    return predict_step


def _jit(fn, state_shardings, mesh, donate, returns_state=True):
    donate_argnums = (0,) if donate else ()
    if mesh is None:
        return jax.jit(fn, donate_argnums=donate_argnums)
    from lungjax.sharding import data_sharding, replicated

    rep = replicated(mesh)
    out = (state_shardings, rep, rep) if returns_state else (rep, rep)
    return jax.jit(fn, in_shardings=(state_shardings, data_sharding(mesh)),
                   out_shardings=out, donate_argnums=donate_argnums)
