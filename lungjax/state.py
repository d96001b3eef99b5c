"""Training state as a plain pytree, its creation, and the optimizer built from a config.

``TrainState`` holds only arrays (no functions), so it shards, donates and checkpoints
without adapters. The optimizer (an ``optax.GradientTransformation``) lives beside it in
the step factory. A stage's networks (one, or several such as a segmenter and its adversary,
each with its own optimizer, step count, batch statistics and rng) are held by name in a
``TrainStates``, a pytree too; the training loop, checkpoints and evaluators see only that.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lungjax.configcheck import as_dict


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training.

    Attributes:
      step: () int32, number of optimizer updates applied.
      params: the "params" collection.
      model_state: the other mutable collections (e.g. {"batch_stats": ...}); {} if none.
      opt_state: the optax state.
      rng: uint32 raw PRNG key data (``jax.random.key_data``; shape set by the PRNG
        implementation, (4,) for "rbg"); each step derives its keys with
        ``fold_in(key, step)`` so a resumed run draws exactly the same randomness.
    """

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    rng: jax.Array

    def variables(self) -> dict:
        """The Flax variables dict for ``model.apply``."""
        return {"params": self.params, **self.model_state}


@jax.tree_util.register_pytree_with_keys_class
class TrainStates(Mapping[str, TrainState]):
    """The ``TrainState`` of every network of a stage, by name, in a fixed order.

    A pytree whose children are the networks' states (key paths ``['<name>']``, like a
    dict's), so it shards, donates and checkpoints as one tree. The order is the stage's
    (``config.train.network`` first, then ``config.networks`` in declaration order); it
    fixes each network's rng (``create_train_states``) and the tree structure a checkpoint
    restores into.

    A stage with a single network reads like that network's ``TrainState``: ``params``,
    ``model_state``, ``opt_state``, ``rng``, ``step`` and ``variables()`` are those of
    ``only``, so code written for one network (evaluators, provisional tests) needs no
    change; with several networks they raise, naming the networks to pick from.
    """

    __slots__ = ("_states",)

    def __init__(self, states: Mapping[str, Any]):
        self._states = dict(states)
        if not self._states:
            raise ValueError("TrainStates needs at least one network")

    def __getitem__(self, name: str) -> TrainState:
        try:
            return self._states[name]
        except KeyError:
            raise KeyError(f"no network {name!r} in this stage; networks: "
                           f"{', '.join(self._states)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._states)

    def __len__(self) -> int:
        return len(self._states)

    def __repr__(self) -> str:
        return f"TrainStates({self._states!r})"

    def replace(self, **states: Any) -> "TrainStates":
        """A copy with the named networks' states replaced (names must exist)."""
        for name in states:
            self[name]  # noqa: B018 -- raises for an unknown name
        return TrainStates({**self._states, **states})

    @property
    def only(self) -> TrainState:
        """The state of the stage's single network; ValueError when it has several."""
        if len(self._states) != 1:
            raise ValueError(f"this stage has {len(self._states)} networks "
                             f"({', '.join(self._states)}); pick one by name")
        return next(iter(self._states.values()))

    @property
    def step(self):
        return self.only.step

    @property
    def params(self):
        return self.only.params

    @property
    def model_state(self):
        return self.only.model_state

    @property
    def opt_state(self):
        return self.only.opt_state

    @property
    def rng(self):
        return self.only.rng

    def variables(self) -> dict:
        return self.only.variables()

    def tree_flatten_with_keys(self):
        names = tuple(self._states)
        return [(jax.tree_util.DictKey(n), self._states[n]) for n in names], names

    @classmethod
    def tree_unflatten(cls, names, children):
        out = object.__new__(cls)
        out._states = dict(zip(names, children))
        return out


@dataclasses.dataclass(frozen=True)
class Network:
    """One trainable network of a stage, as built from the config.

    Attributes:
      name: its key in ``TrainStates`` and the prefix of its metrics ("<name>/loss").
      model: the Flax module.
      tx: its optimizer.
      sample_input: an input of the training shape, e.g. (1, 10, 30, 30, 1) float32
        (only shape and dtype matter).
      init_params: params overriding the random ones (``transfer_params``), or None.
    """

    name: str
    model: nn.Module
    tx: optax.GradientTransformation
    sample_input: jax.Array
    init_params: Any = None


def create_train_states(networks: Sequence[Network], rng: jax.Array) -> TrainStates:
    """Initial ``TrainStates`` of a stage; pure, so it can be jitted with ``out_shardings``.

    Network ``i`` (in the stage's order) is created by ``create_train_state`` from
    ``rng`` itself when ``i == 0`` and from ``fold_in(rng, i)`` otherwise, so a stage's
    first network draws exactly what a single-network stage of the same seed draws.
    """
    out = {}
    for i, net in enumerate(networks):
        key = rng if i == 0 else jax.random.fold_in(rng, i)
        out[net.name] = create_train_state(net.model, net.tx, net.sample_input, key,
                                           init_params=net.init_params)
    return TrainStates(out)


SCHEDULES = ("constant", "cosine", "step", "plateau")


def make_schedule(cfg: Mapping[str, Any], num_steps: int) -> optax.Schedule:
    """Learning-rate schedule from ``config.optimizer``.

    Fields: ``learning_rate``, ``schedule`` ("constant" | "cosine" | "step" | "plateau"),
    ``warmup_steps``, ``decay_steps`` (step schedule: list of step numbers), ``decay_factor``.
    "plateau" is constant here: its decays are a separate transformation that reads the
    training loss (``make_plateau``), chained by ``make_optimizer``.
    """
    lr = float(cfg["learning_rate"])
    name = cfg["schedule"]
    warmup = int(cfg["warmup_steps"])
    if name in ("constant", "plateau"):
        sched = optax.constant_schedule(lr)
    elif name == "cosine":
        sched = optax.cosine_decay_schedule(lr, max(1, num_steps - warmup))
    elif name == "step":
        bounds = {int(s) - warmup: float(cfg["decay_factor"]) for s in cfg["decay_steps"]}
        sched = optax.piecewise_constant_schedule(lr, bounds)
    else:
        raise ValueError(f"config.optimizer.schedule: unknown schedule {name!r} "
                         f"({' | '.join(SCHEDULES)})")
    if warmup:
        sched = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), sched], [warmup])
    return sched


def make_plateau(cfg: Mapping[str, Any]) -> optax.GradientTransformationExtraArgs:
    """``optax.contrib.reduce_on_plateau`` from ``config.optimizer``'s plateau fields.

    It multiplies the updates by a scale (1 at the start) that drops by ``decay_factor``
    each time the training loss, averaged over ``plateau_accumulation_steps`` steps, has
    not improved for ``plateau_patience`` such averages in a row (improved = below
    ``(1 - plateau_rtol) * best - plateau_atol``), then waits ``plateau_cooldown`` averages
    before counting again; it never goes below ``plateau_min_scale`` (0 = no floor). Its
    ``update`` needs ``value=`` (the step's loss, a () float32). Its state (best average,
    counters, scale) is part of ``opt_state``, so checkpoints carry it.
    """

    def num(key, kind, ok, what):
        try:
            v = kind(cfg[key])
        except (TypeError, ValueError):
            raise ValueError(f"config.optimizer.{key}: {what} is required by "
                             f"schedule='plateau', got {cfg[key]!r}") from None
        if not ok(v):
            raise ValueError(f"config.optimizer.{key}: must be {what}, got {v!r}")
        return v

    factor = num("decay_factor", float, lambda v: 0.0 < v < 1.0, "a number in (0, 1)")
    patience = num("plateau_patience", int, lambda v: v >= 1, "an integer >= 1")
    cooldown = num("plateau_cooldown", int, lambda v: v >= 0, "an integer >= 0")
    accumulation = num("plateau_accumulation_steps", int, lambda v: v >= 1, "an integer >= 1")
    rtol = num("plateau_rtol", float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
    atol = num("plateau_atol", float, lambda v: v >= 0.0, "a number >= 0")
    min_scale = num("plateau_min_scale", float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
    if rtol == 0.0 and atol == 0.0:
        raise ValueError("config.optimizer.plateau_rtol / plateau_atol: at least one must be "
                         "> 0 (else any change counts as an improvement)")
    return optax.contrib.reduce_on_plateau(
        factor=factor, patience=patience, rtol=rtol, atol=atol, cooldown=cooldown,
        accumulation_size=accumulation, min_scale=min_scale)


def plateau_scale(opt_state: Any) -> jax.Array | None:
    """The current () learning-rate scale of a plateau schedule in ``opt_state``, else None."""

    def is_plateau(x):
        return isinstance(x, optax.contrib.ReduceLROnPlateauState)

    found = [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=is_plateau)
             if is_plateau(x)]
    return found[0].scale if found else None


def make_optimizer(cfg: Mapping[str, Any], num_steps: int) -> optax.GradientTransformation:
    """optax transformation from ``config.optimizer`` (every field of its schema section).

    Fields: ``name`` ("adam" | "adamw" | "sgd" | "momentum"), ``momentum``, ``b1``, ``b2``,
    ``weight_decay`` (L2 added to the gradient for adam/sgd, decoupled for adamw: the
    paper's ``beta * ||W||^2`` term), ``grad_clip_norm`` (0 = off), plus the schedule fields
    (``make_schedule``, ``make_plateau``).

    With ``schedule="plateau"`` the result's ``update`` must be given ``value=`` (the
    training loss); the steps of ``lungjax.steps`` always pass it, through optax's
    extra-args support, which every other optimizer ignores.
    """
    cfg = as_dict(cfg)
    sched = make_schedule(cfg, num_steps)
    name = cfg["name"]
    wd = float(cfg["weight_decay"])
    parts = []
    if cfg["grad_clip_norm"]:
        parts.append(optax.clip_by_global_norm(float(cfg["grad_clip_norm"])))
    if name == "adamw":
        parts.append(optax.adamw(sched, b1=cfg["b1"], b2=cfg["b2"],
                                 weight_decay=wd))
    else:
        if wd:
            parts.append(optax.add_decayed_weights(wd))
        if name == "adam":
            parts.append(optax.adam(sched, b1=cfg["b1"], b2=cfg["b2"]))
        elif name in ("sgd", "momentum"):
            parts.append(optax.sgd(sched, momentum=cfg["momentum"] or None,
                                   nesterov=bool(cfg["nesterov"])))
        else:
            raise ValueError(f"config.optimizer.name: unknown optimizer {name!r} "
                             "(adam | adamw | sgd | momentum)")
    if cfg["schedule"] == "plateau":
        # Last in the chain, so the scale multiplies the final updates like a learning rate.
        parts.append(make_plateau(cfg))
    return optax.chain(*parts)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       sample_input: jax.Array, rng: jax.Array,
                       init_params: Any | None = None) -> TrainState:
    """Initialises a ``TrainState``; pure, so it can be jitted with ``out_shardings``.

    Args:
      model: the Flax module.
      tx: its optimizer.
      sample_input: an input of the training shape, e.g. (1, 10, 30, 30, 1) float32;
        only its shape/dtype matter.
      rng: a typed PRNG key (``jax.random.key(seed, impl=...)``); split into init and
        step keys. "rbg" is the engine's default: XLA:CPU compiles threefry-based
        initialisers very slowly (seconds per initialiser).
      init_params: optional params overriding the random ones (two-stage methods pass
        a transferred tree from ``transfer_params``).
    """
    from lungjax.models.conv.select import no_tuning

    init_rng, state_rng, dropout_rng = jax.random.split(rng, 3)
    with no_tuning():  # a batch-1 trace for the shapes of the parameters: never timed
        variables = model.init({"params": init_rng, "dropout": dropout_rng}, sample_input,
                               train=False)
    params = variables["params"]
    if init_params is not None:
        params = init_params
    model_state = {k: v for k, v in variables.items() if k != "params"}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                      opt_state=tx.init(params), rng=jax.random.key_data(state_rng))


def transfer_params(dst: Any, src: Any, paths: Sequence[tuple[str, str]]) -> Any:
    """Copies sub-trees of ``src`` params into ``dst`` (initialise a stage from another).

    Args:
      dst: params of the network being initialised (nested dict).
      src: params of the trained network.
      paths: ("src/path", "dst/path") pairs of "/"-separated module paths, e.g.
        [("conv1", "stem/conv1")]; shapes must match exactly.

    Returns:
      A new params tree (``dst`` is not modified).
    """
    out = jax.tree_util.tree_map(lambda x: x, flax.core.unfreeze(dst))

    def _get(tree, path):
        for k in path.split("/"):
            if k not in tree:
                raise KeyError(f"parameter path {path!r} not found (at {k!r})")
            tree = tree[k]
        return tree

    for s, d in paths:
        sv = _get(src, s)
        *parent, leaf = d.split("/")
        node = _get(out, "/".join(parent)) if parent else out
        if leaf not in node:
            raise KeyError(f"parameter path {d!r} not found in the destination")
        shapes_s = jax.tree_util.tree_map(jnp.shape, sv)
        shapes_d = jax.tree_util.tree_map(jnp.shape, node[leaf])
        if shapes_s != shapes_d:
            raise ValueError(f"cannot transfer {s!r} -> {d!r}: shapes {shapes_s} vs {shapes_d}")
        node[leaf] = sv
    return out


def step_key(state: TrainState, impl: str = "rbg") -> jax.Array:
    """The typed PRNG key of this step: ``fold_in(key(state.rng), state.step)``."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl=impl), state.step)


def param_count(params: Any) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


InitFn = Callable[[jax.Array], TrainState]
