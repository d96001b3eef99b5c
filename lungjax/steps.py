"""Factories of pure step functions: train, eval, predict.

A training step updates the ``TrainStates`` of a stage (``lungjax.state``): one network, or
several updated in turn inside one jitted, sharded step (an adversarial segmenter: the
discriminator's update, then the segmenter's). What a stage's step does is a registered
*step factory* chosen by ``config.train.step``::

    @STEPS.register("my_stage")
    def my_stage(config, networks, task) -> list[tuple[str, Update]]: ...

``networks`` is the stage's ordered ``{name: lungjax.state.Network}`` (the first is the
task's network, built from ``config.model`` / ``config.optimizer``); each ``Update`` is
``fn(states, batch) -> (new TrainState of that network, metrics, host_outputs)`` and sees
the states as updated by the updates before it (``make_alternating_step``). Helpers for
writing updates: ``model_rngs`` (the model's random streams for this step),
``apply_gradients``, ``make_supervised_update``. "supervised" (one network, the task's
loss, an optional sample filter) is the default.

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

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from lungjax.registry import SAMPLE_FILTERS, STEPS
from lungjax.state import Network, TrainState, TrainStates, plateau_scale, step_key

# STEPS: step factories chosen by ``config.train.step`` (see the module docstring);
# SAMPLE_FILTERS: per-batch sample selection inside the train step (lungjax.registry).

Update = Callable[[TrainStates, Mapping[str, jax.Array]], tuple[TrainState, dict, dict]]
SampleFilter = Callable[[jax.Array, jax.Array], jax.Array]


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
    return jnp.ones(batch["image"].shape[:1], jnp.float32)


def _with_step(batch: Mapping[str, jax.Array], state: TrainState) -> dict:
    """The batch with ``"step"`` () int32, the updates applied so far: tasks whose loss
    follows a schedule (segmentation's BCE-then-Dice) read it inside the jitted step."""
    return {**batch, "step": state.step}


def _per_sample(host: Mapping[str, jax.Array], batch_size: int) -> dict:
    """The (B,) host outputs only: the train step's outputs feed host-side samplers, and
    full-size maps (a segmentation's probabilities) would be copied to the host for
    nothing at every step."""
    return {k: v for k, v in host.items() if v.ndim == 1 and v.shape[0] == batch_size}


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


@SAMPLE_FILTERS.register("online_sample_filter")
def make_online_sample_filter(hard_fraction: float = 0.5, easy_keep: float = 0.5
                              ) -> SampleFilter:
    """``online_sample_filter`` with fixed shares, as a sample filter."""

    def select(losses, seed):
        return online_sample_filter(losses, seed, hard_fraction, easy_keep)

    return select


def build_sample_filter(osf: Mapping[str, Any] | None) -> SampleFilter | None:
    """The sample filter of ``config.train.osf`` (``enabled``, ``hard_fraction``,
    ``easy_keep``): "online_sample_filter" when enabled, else None (every sample)."""
    if not osf or not osf["enabled"]:
        return None
    return SAMPLE_FILTERS.get("online_sample_filter")(
        hard_fraction=float(osf["hard_fraction"]), easy_keep=float(osf["easy_keep"]))


def rng_streams(model) -> tuple[str, ...]:
    """Names of the random streams ``model`` draws from in training.

    "dropout", then the value of every ``str`` field of the module whose name ends in
    ``_stream`` (the convention by which a module names a stream it needs, e.g. an RReLU
    network's ``rrelu_stream="rrelu"``), in field order.
    """
    names = ["dropout"]
    for f in dataclasses.fields(model):
        value = getattr(model, f.name, None)
        if f.name.endswith("_stream") and isinstance(value, str) and value not in names:
            names.append(value)
    return tuple(names)


def model_rngs(key: jax.Array, streams: tuple[str, ...]) -> dict[str, jax.Array]:
    """``{stream: key}`` for ``model.apply``: stream ``i`` gets ``key`` itself when
    ``i == 0`` and ``fold_in(key, i)`` otherwise (fixed by the order of ``streams``)."""
    return {name: key if i == 0 else jax.random.fold_in(key, i)
            for i, name in enumerate(streams)}


def forward_apply(model, variables, image, **kwargs):
    """``model.apply(variables, image, train=False, **kwargs)`` traced as inference: its
    convolutions take the forward-only plans (``lungjax.models.conv.select.forward_only``)."""
    from lungjax.models.conv.select import forward_only

    with forward_only():
        return model.apply(variables, image, train=False, **kwargs)


def _apply(model, state_or_vars, params, model_state, image, train, rngs):
    mutable = [k for k in model_state] if train else False
    variables = {"params": params, **model_state}
    if mutable:
        outputs, new_state = model.apply(variables, image, train=True, rngs=rngs,
                                         mutable=mutable)
        return outputs, dict(new_state)
    if not train:
        return forward_apply(model, variables, image, rngs=rngs), model_state
    return model.apply(variables, image, train=train, rngs=rngs), model_state


def make_supervised_update(model, task, tx: optax.GradientTransformation, *,
                           spatial_dims: int = 3, sample_filter: SampleFilter | None = None,
                           streams: tuple[str, ...] | None = None, rng_impl: str = "rbg"):
    """Pure ``update(state, batch) -> (state, metrics, host_outputs)`` of one network.

    The task's per-sample loss, averaged over the weighted samples the ``sample_filter``
    keeps (every weighted sample when None); one optimizer update. ``streams``: the
    model's random streams (default ``rng_streams(model)``), keyed by ``model_rngs`` from
    ``step_key(state)``. The filter's seed is ``state.rng[0] ^ (step * 2654435761)``.

    The optimizer's ``update`` receives ``value=`` the batch's mean loss over every
    weighted sample (``loss_all``: with a filter the selected samples change from step to
    step, so their mean is a poorer progress signal), read by a plateau schedule and
    ignored by other optimizers. With a plateau schedule the metrics include ``lr_scale``.
    """
    tx = optax.with_extra_args_support(tx)
    streams = rng_streams(model) if streams is None else tuple(streams)

    def update(state: TrainState, batch):
        rngs = model_rngs(step_key(state, rng_impl), streams)
        seed = state.rng[0] ^ (state.step.astype(jnp.uint32) * jnp.uint32(2654435761))
        batch = _with_step(batch, state)
        image = _image(batch, spatial_dims)
        w = _weights(batch)

        def loss_fn(params):
            outputs, new_model_state = _apply(model, None, params, state.model_state, image,
                                              True, rngs)
            losses = task.per_sample_loss(outputs, batch)
            sel = w
            if sample_filter is not None:
                sel = w * sample_filter(losses, seed)
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
        host = {"loss": losses, "selected": sel,
                **_per_sample(task.host_outputs(outputs, batch), losses.shape[0])}
        if "index" in batch:
            host["index"] = batch["index"]
        return new_state, metrics, host

    return update


def make_train_step(model, task, tx: optax.GradientTransformation, *, spatial_dims: int = 3,
                    osf: Mapping[str, Any] | None = None,
                    sample_filter: SampleFilter | None = None, rng_impl: str = "rbg",
                    state_shardings: Any = None, mesh: Any = None, donate: bool = True):
    """Jitted ``train_step(state, batch) -> (state, metrics, host_outputs)`` of one network.

    ``make_supervised_update`` on a bare ``TrainState``, jitted.

    Args:
      model: Flax module ``(x, train) -> outputs``.
      task: a task object (``per_sample_loss``, ``per_sample_metrics``, ``host_outputs``).
      tx: the optimizer.
      spatial_dims: 3 for volumes, 2 for slices.
      osf: ``dict(enabled, hard_fraction, easy_keep)``: online sample filtering
        (``build_sample_filter``); or give ``sample_filter`` directly (not both).
      rng_impl: PRNG implementation of ``state.rng`` (dropout and other model noise).
      state_shardings / mesh: when given, the step is jitted with explicit shardings
        (state as ``state_shardings``, batch split on "data", outputs replicated); else
        plain ``jax.jit``.
      donate: donate the input state (its buffers are reused for the output).
    """
    if osf is not None and sample_filter is not None:
        raise ValueError("make_train_step: give osf or sample_filter, not both")
    if osf is not None:
        sample_filter = build_sample_filter({"hard_fraction": 0.5, "easy_keep": 0.5,
                                             "enabled": True, **osf})
    update = make_supervised_update(model, task, tx, spatial_dims=spatial_dims,
                                    sample_filter=sample_filter, rng_impl=rng_impl)
    return _jit(update, state_shardings, mesh, donate)


@STEPS.register("supervised")
def supervised_step(config, networks: Mapping[str, Network], task) -> list[tuple[str, Update]]:
    """The default stage step: the task's loss on its single network.

    Reads ``config.data.spatial_dims``, ``config.train.osf`` (the sample filter) and
    ``config.rng_impl``.
    """
    if len(networks) != 1:
        raise ValueError(f"config.train.step='supervised' trains one network, the stage has "
                         f"{len(networks)} ({', '.join(networks)}); choose a step that "
                         f"updates them all (registered: {', '.join(STEPS.names())})")
    (name, net), = networks.items()
    update = make_supervised_update(
        net.model, task, net.tx, spatial_dims=config.data.spatial_dims,
        sample_filter=build_sample_filter(config.train.osf.to_dict()),
        rng_impl=config.rng_impl)
    return [(name, lambda states, batch: update(states[name], batch))]


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


def make_alternating_step(updates, *, prefix: bool = True, state_shardings: Any = None,
                          mesh: Any = None, donate: bool = True):
    """Jitted step over several networks updated in turn, each with its own optimizer.

    For methods such as an adversarial segmenter: first the discriminator update, then
    the segmenter update that sees the new discriminator.

    Args:
      updates: sequence of ``(name, fn)``; ``fn(states, batch) -> (new_state, metrics,
        host_outputs)`` where ``states`` (``TrainStates``) holds every network's
        ``TrainState`` as updated by the functions before it, and ``new_state`` replaces
        ``states[name]``.
      prefix: name the metrics and host outputs "<name>/<key>" (a stage with several
        networks); False keeps the keys as the update returns them (a single network).
      state_shardings / mesh / donate: as in ``make_train_step`` (``state_shardings`` is
        the ``TrainStates`` of per-network shardings).

    Returns:
      ``step(states, batch) -> (states, metrics, host_outputs)``.
    """
    updates = list(updates)

    def step(states: TrainStates, batch):
        metrics, host = {}, {}
        for name, fn in updates:
            new, m, h = fn(states, batch)
            states = states.replace(**{name: new})
            pre = f"{name}/" if prefix else ""
            metrics.update({pre + k: v for k, v in m.items()})
            host.update({pre + k: v for k, v in h.items()})
        return states, metrics, host

    return _jit(step, state_shardings, mesh, donate)


def make_eval_step(model, task, *, spatial_dims: int = 3, network: str | None = None,
                   state_shardings: Any = None, mesh: Any = None):
    """Returns ``eval_step(state, batch) -> (state, metrics, host_outputs)``.

    ``state``: a ``TrainState``, or with ``network`` set the stage's ``TrainStates``,
    of which that network is evaluated. ``metrics`` here are weighted SUMS plus
    ``"weight"`` (the sum of weights) so the caller can accumulate over batches of an
    epoch and divide once; the state is returned unchanged.
    """

    def eval_core(state, batch):
        if network is not None:
            state = state[network]
        batch = _with_step(batch, state)
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
        return score(forward_apply(model, variables, x))

    return predict


def _jit(fn, state_shardings, mesh, donate, returns_state=True):
    donate_argnums = (0,) if donate else ()
    if mesh is None:
        return jax.jit(fn, donate_argnums=donate_argnums)
    from lungjax.sharding import data_sharding, replicated

    rep = replicated(mesh)
    out = (state_shardings, rep, rep) if returns_state else (rep, rep)
    return jax.jit(fn, in_shardings=(state_shardings, data_sharding(mesh)),
                   out_shardings=out, donate_argnums=donate_argnums)
