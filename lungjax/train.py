"""The training loop: ``train_and_evaluate(config, workdir)``.

Sections: setup (mesh, model, state, data, restore) -> train (jitted sharded steps, one-
step-late host outputs, logging, eval hooks, checkpoints) -> final evaluation -> learning
curve (``learning_curve.png``). The same ``workdir`` resumes from its latest checkpoint;
SIGTERM saves and stops cleanly; a non-finite loss stops the run naming the step, leaving
the last good checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lungjax import fileio
from lungjax import sharding as shd
from lungjax.checkpointing import Checkpointer, PreemptionGuard, restore_params
from lungjax.configcheck import ConfigError, as_dict, check_declared, check_values
from lungjax.metrics_log import METRICS_JSONL, MetricWriter, banner
from lungjax.registry import EVALUATORS, MODELS, TASKS
from lungjax.state import (Network, TrainStates, create_train_states, make_optimizer,
                           param_count, transfer_params)
from lungjax.steps import STEPS, make_alternating_step, make_eval_step


class NonFiniteLossError(FloatingPointError):
    """Raised when a training step produced a NaN/inf loss."""


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
LEARNING_CURVE_PNG = "learning_curve.png"  # in the run directory, beside metrics.jsonl


def missing_required(config) -> list[str]:
    """Dotted names of required placeholders (lungjax/config_schema.py) still unset."""
    unset = object()
    out = []

    def _walk(node, prefix):
        for key, value in node.items():
            if value is unset:
                out.append(prefix + key)
            elif isinstance(value, dict):
                _walk(value, prefix + key + ".")

    _walk(as_dict(config, unset=unset), "")
    return out


def validate_config(config, where: str = "config") -> None:
    """Raises ``ConfigError`` naming every required field left unset, the first field
    nothing declares (``configcheck.check_declared``) or the first impossible value."""
    missing = missing_required(config)
    if missing:
        raise ConfigError(f"{where}: fields must be set (required placeholders in "
                          "lungjax/config_schema.py): " + ", ".join(missing))
    check_declared(config, where)
    check_values(config, where)


def build_model(config):
    """The Flax module named by ``config.model.name`` at ``config.train.compute_dtype``."""
    dtype = config.train.compute_dtype
    if dtype not in _DTYPES:
        raise ValueError(f"config.train.compute_dtype: {dtype!r} not in {sorted(_DTYPES)}")
    extra = {} if dtype == "float32" else {"dtype": _DTYPES[dtype]}
    return MODELS.build(config.model, **extra)


def build_task(config):
    return TASKS.build(config.task)


def sample_input(config, batch: int = 1, channels: int = 1) -> jax.Array:
    """A zero input of the training patch shape: (batch, *patch, channels) float32."""
    return jnp.zeros((batch, *config.data.patch_size_zyx, channels), jnp.float32)


@dataclasses.dataclass(frozen=True)
class StageSettings:
    """How a config lays out its stage's networks (lungjax/config_schema.py).

    Attributes:
      network: ``config.train.network``, the name of the network built from
        ``config.model`` / ``config.optimizer``: the task's network (evaluated, exported).
      step: ``config.train.step``, the ``lungjax.steps.STEPS`` factory of the train step.
      init_network: ``config.train.init_network``, the network of ``train.init_from``'s
        run whose params initialise ``network`` ("" = that run's only network).
      networks: ``config.networks``, the stage's further networks: name -> dict(model=
        <MODELS config>, optimizer=<overrides of config.optimizer>, input_channels=int).
    """

    network: str
    step: str
    init_network: str
    networks: dict


_NETWORK_FIELDS = ("input_channels", "model", "optimizer")


def stage_settings(config) -> StageSettings:
    """The ``StageSettings`` of ``config``.

    A config whose base declares none of these fields trains one network, "net", with
    the "supervised" step.
    """
    return StageSettings(config.train.network, config.train.step, config.train.init_network,
                         as_dict(config.networks))


@dataclasses.dataclass
class Engine:
    """Everything built from a config before the first step.

    ``model`` / ``task`` / ``tx`` are those of the task's network ``network``;
    ``networks`` holds every network of the stage in order (that one first). States are
    ``lungjax.state.TrainStates`` keyed by network name.
    """

    config: Any
    mesh: Any
    model: Any
    task: Any
    tx: Any
    init_state: Callable[[], Any]  # a fresh sharded initial state (compiled once)
    state_shardings: Any
    abstract_state: Any
    train_step: Callable  # (TrainStates, global batch) -> (TrainStates, metrics, host)
    eval_step: Callable  # of the task's network
    network: str = "net"
    networks: dict[str, Network] = dataclasses.field(default_factory=dict)

    @property
    def state(self):
        """A fresh initial state (the train step donates its input, so never reuse one)."""
        return self.init_state()

    @property
    def loss_keys(self) -> tuple[str, ...]:
        """Metric names of the training losses: "loss", or "<name>/loss" per network."""
        if len(self.networks) == 1:
            return ("loss",)
        return tuple(f"{name}/loss" for name in self.networks)


def build_networks(config, settings: StageSettings) -> list[Network]:
    """The stage's networks: ``settings.network`` from config.model / config.optimizer,
    then ``config.networks`` in order."""
    model = build_model(config)
    nets = [Network(settings.network, model,
                    make_optimizer(config.optimizer, config.train.num_steps),
                    sample_input(config), _init_params(config, settings, model))]
    dtype = config.train.compute_dtype
    extra = {} if dtype == "float32" else {"dtype": _DTYPES[dtype]}
    for name, spec in settings.networks.items():
        if name == settings.network:
            raise ValueError(f"config.networks.{name}: the name of config.train.network")
        if sorted(spec) != sorted(_NETWORK_FIELDS):
            raise ValueError(f"config.networks.{name}: fields must be exactly "
                             f"{', '.join(_NETWORK_FIELDS)}; got {', '.join(sorted(spec))}")
        opt = {**as_dict(config.optimizer), **spec["optimizer"]}
        nets.append(Network(name, MODELS.build(spec["model"], **extra),
                            make_optimizer(opt, config.train.num_steps),
                            sample_input(config, channels=int(spec["input_channels"]))))
    return nets


def _init_params(config, settings: StageSettings, model) -> Any:
    """Params of the task's network from ``train.init_from`` (``train.init_paths``), or
    None for a random initialisation."""
    if not config.train.init_from:
        return None
    src = restore_params(os.path.join(config.train.init_from, "checkpoints"),
                         network=settings.init_network or None)["params"]
    pairs = [tuple(p.split(":", 1)) for p in config.train.init_paths]
    base = jax.jit(model.init)(jax.random.key(config.seed, impl=config.rng_impl),
                               sample_input(config))["params"]
    return transfer_params(base, src, pairs)


def build_engine(config, mesh=None) -> Engine:
    """Mesh, networks, task, optimizers, sharded initial state and the jitted steps."""
    mesh = mesh or shd.make_mesh()
    shd.check_batch_size(config.train.batch_size, mesh)
    settings = stage_settings(config)
    task = build_task(config)
    nets = build_networks(config, settings)
    init_fn = functools.partial(create_train_states, nets)
    rng = jax.random.key(config.seed, impl=config.rng_impl)
    try:
        init, shardings, abstract = shd.make_sharded_init(init_fn, rng, mesh)
    except (TypeError, ValueError) as e:  # the networks' shape errors at this input size
        raise ConfigError(
            f"config.data.patch_size_zyx: {tuple(config.data.patch_size_zyx)} cannot pass "
            f"through the network(s) of model {config.model.name!r} "
            f"({str(e).strip().splitlines()[0][:200]})") from e
    networks = {n.name: n for n in nets}
    updates = STEPS.get(settings.step)(config, networks, task)
    train_step = make_alternating_step(updates, prefix=len(nets) > 1,
                                       state_shardings=shardings, mesh=mesh)
    main = nets[0]
    eval_step = make_eval_step(main.model, task, spatial_dims=config.data.spatial_dims,
                               network=main.name, state_shardings=shardings, mesh=mesh)
    return Engine(config, mesh, main.model, task, main.tx, functools.partial(init, rng),
                  shardings, abstract, train_step, eval_step, main.name, networks)


# ----------------------------------------------------------------------------------
# Evaluators (eval hooks chosen by config.evals.<name>.type)
# ----------------------------------------------------------------------------------


@EVALUATORS.register("patch_classification")
class PatchClassificationEvaluator:
    """Held-out patch figures over one pass of ``data.eval_batches()``.

    Works with any task whose host outputs hold per-patch ``"score"`` (B,) float32, the
    probability that the patch is positive, and ``"label"`` (B,) int32 with 1 = positive
    (a nodule patch): the classification and hybrid tasks, and the anchor task, whose
    score is the patch's best anchor probability.

    Returns the weighted means of the eval step's metrics (``loss`` first), ``count``
    (patches), and from ``lungjax.evaluation.classification.binary_metrics`` at
    probability 0.5: ``sensitivity`` (recall of the positive patches), ``specificity``
    and ``auc`` (ROC AUC); a figure undefined on the held-out set (no positive or no
    negative patch) is left out.
    """

    # Decision threshold of ``sensitivity`` / ``specificity``: the task's own
    # probability, as a deployed detector thresholds it.
    threshold = 0.5

    def __init__(self, every_steps: int = 0, name: str = "patches"):
        self.every_steps = every_steps
        self.name = name

    def __call__(self, engine: Engine, state, data) -> dict[str, float]:
        from lungjax.evaluation.classification import binary_metrics

        sums: dict[str, float] = {}
        scores, labels = [], []
        for batch in data.eval_batches():
            gb = shd.to_global_batch(batch, engine.mesh)
            _, m, host = engine.eval_step(state, gb)
            for k, v in shd.fetch_to_host(m).items():
                sums[k] = sums.get(k, 0.0) + float(v)
            h = shd.fetch_to_host(host)
            keep = h["weight"] > 0
            scores.append(h["score"][keep])
            labels.append(h["label"][keep])
        if not sums:
            return {}
        n = max(sums.pop("weight"), 1e-8)
        means = {k: v / n for k, v in sums.items()}
        cls = binary_metrics(np.concatenate(labels), np.concatenate(scores),
                             threshold=self.threshold)
        # Loss and the thresholded figures first: the console line is read left to right.
        out = {"loss": means.pop("loss")}
        for key, src in (("sensitivity", "sensitivity"), ("specificity", "specificity"),
                         ("auc", "roc_auc")):
            if np.isfinite(cls[src]):
                out[key] = float(cls[src])
        out.update(means)
        out["count"] = n
        return out


def build_evaluators(config) -> list:
    out = []
    for name, cfg in as_dict(config.evals).items():
        cfg = dict(cfg)
        kind = cfg.pop("type", None)
        if not kind:
            raise ValueError(f"config.evals.{name}: missing 'type' (one of {EVALUATORS.names()})")
        out.append(EVALUATORS.get(kind)(name=name, **cfg))
    return out


# ----------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------


def _write_config(config, workdir: str) -> None:
    from lungjax.atomic import atomic_write_text

    atomic_write_text(os.path.join(workdir, "config.json"),
                      config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def train_and_evaluate(config, workdir: str, data=None, mesh=None,
                       engine: Engine | None = None) -> dict:
    """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints).

    Args:
      config: a validated ml_collections ConfigDict (see lungjax/config_schema.py).
      workdir: run directory: config.json, checkpoints/, metrics.jsonl, tb/,
        learning_curve.png (training and held-out figures against the step).
      data: a ``lungjax.train_data.TrainData``; default built from the config.
      mesh: device mesh; default all devices.
      engine: a prebuilt ``Engine`` of the same config (reuses its compiled steps, e.g.
        across cross-validation folds); default built here.

    Returns:
      dict with "step", the last logged train metrics under "train" ("loss", ... for
      one network, "<network>/loss", ... for several), eval metrics under "eval/<name>",
      "preempted" (bool) and "state" (the final ``TrainStates``).
    """
    primary = jax.process_index() == 0
    fileio.makedirs(workdir)
    banner(f"setup: {config.name} in {workdir}")
    if primary:
        _write_config(config, workdir)
    engine = engine or build_engine(config, mesh)
    state: TrainStates = engine.init_state()
    counts = ", ".join(f"{name} {param_count(s.params):,}" for name, s in state.items())
    print(f"devices: {jax.device_count()} ({jax.process_count()} process(es)); "
          f"params: {counts}", flush=True)
    if data is None:
        from lungjax.train_data import build_train_data

        data = build_train_data(config, workdir)
    evaluators = build_evaluators(config)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), config.train.keep_checkpoints,
                        config.train.async_checkpoint)
    num_steps = config.train.num_steps
    spr = data.steps_per_round or num_steps

    step, round_index = 0, 0
    host = ckpt.restore_host()
    if host is not None:
        data.load_state_dict(host["sampler"])
        round_index = int(host["round"])
        it = data.iterator(round_index)
        step, state, _ = ckpt.restore(engine.abstract_state, it)
        print(f"resumed from step {step} (round {round_index})", flush=True)
    else:
        it = data.iterator(round_index)

    writer = MetricWriter(workdir, enabled=primary)
    result: dict[str, Any] = {"preempted": False}
    pending: list = []
    acc: dict[str, float] = {}
    acc_n = 0
    last_logged: dict[str, float] = {}

    def consume(item):
        nonlocal acc_n
        s, metrics, host_out = item
        m = shd.fetch_to_host(metrics)
        for key in engine.loss_keys:
            loss = float(m[key])
            if not np.isfinite(loss):
                ckpt.wait()
                raise NonFiniteLossError(
                    f"non-finite training loss {key}={loss} at step {s}; stopping. The last "
                    f"good checkpoint is step {ckpt.latest_step()} in {ckpt.directory}")
        data.update(shd.fetch_to_host(host_out))
        for k, v in m.items():
            acc[k] = acc.get(k, 0.0) + float(v)
        acc_n += 1

    def flush():
        while pending:
            consume(pending.pop(0))

    def save(s):
        flush()
        ckpt.save(s, state, it, {"sampler": data.state_dict(), "round": round_index})

    banner(f"train: steps {step} -> {num_steps}, global batch {config.train.batch_size}")
    from tqdm import tqdm

    bar = tqdm(total=num_steps, initial=step, unit="step", dynamic_ncols=True,
               disable=not (config.train.progress_bar and primary))
    t_log, n_log = time.perf_counter(), 0
    try:
        with PreemptionGuard() as guard:
            while step < num_steps:
                r = step // spr
                if r != round_index:
                    flush()  # the next round's index sees every update of this round
                    round_index = r
                    data.begin_round(round_index, engine, state)
                    it = data.iterator(round_index)
                batch = next(it)
                state, metrics, host_out = engine.train_step(
                    state, shd.to_global_batch(batch, engine.mesh))
                step += 1
                n_log += 1
                pending.append((step, metrics, host_out))
                if len(pending) > 1:  # fetch one step late: keeps dispatch async
                    consume(pending.pop(0))
                bar.update(1)
                if step % config.train.log_every == 0 or step == num_steps:
                    flush()
                    dt = time.perf_counter() - t_log
                    last_logged = {k: v / max(acc_n, 1) for k, v in acc.items()}
                    last_logged["steps_per_sec"] = n_log / max(dt, 1e-9)
                    last_logged["examples_per_sec"] = (
                        last_logged["steps_per_sec"] * config.train.batch_size)
                    writer.write(step, last_logged, "train")
                    bar.set_postfix(loss=f"{last_logged[engine.loss_keys[0]]:.4f}")
                    acc.clear()
                    acc_n = 0
                    t_log, n_log = time.perf_counter(), 0
                for ev in evaluators:
                    if ev.every_steps and step % ev.every_steps == 0 and step < num_steps:
                        flush()
                        _run_eval(ev, engine, state, data, step, writer, result)
                preempted = shd.sync_flag(guard.requested)
                if step % config.train.checkpoint_every == 0 or step == num_steps or preempted:
                    save(step)
                if preempted:
                    tqdm.write(f"preemption signal: saved step {step}, stopping")
                    result["preempted"] = True
                    break
        flush()
    except BaseException:
        writer.close()
        ckpt.close()  # waits for a save in flight: the last good checkpoint is complete
        raise
    finally:
        bar.close()
    ckpt.wait()
    result["step"] = step
    result["train"] = last_logged
    if not result["preempted"]:
        banner("final evaluation")
        for ev in evaluators:
            _run_eval(ev, engine, state, data, step, writer, result)
    ckpt.close()
    writer.close()
    if primary:
        # Also after a preemption or a resume of a finished run: the curve so far shows
        # whether the held-out figures still improve.
        _plot_learning_curve(config, workdir, list(engine.networks))
    result["state"] = state
    return result


def _plot_learning_curve(config, workdir: str, networks: list[str]) -> None:
    """``<workdir>/learning_curve.png`` from ``<workdir>/metrics.jsonl``; with several
    networks, that of the task's network (the first), and
    ``learning_curve_<network>.png`` of each other one."""
    import tempfile

    from lungjax.evaluation.plots import plot_learning_curve  # matplotlib only here
    from lungjax.metrics_log import network_rows, read_jsonl

    log = os.path.join(workdir, METRICS_JSONL)
    if len(networks) == 1:
        path = os.path.join(workdir, LEARNING_CURVE_PNG)
        plot_learning_curve(log, path, title=f"{config.name}: learning curve")
        print(f"learning curve: {path}", flush=True)
        return
    rows = read_jsonl(log)
    stem, ext = os.path.splitext(LEARNING_CURVE_PNG)
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(networks):
            view = os.path.join(tmp, f"{name}.jsonl")
            with open(view, "w", encoding="utf-8") as f:
                for r in network_rows(rows, name):
                    f.write(json.dumps(r) + "\n")
            path = os.path.join(workdir, LEARNING_CURVE_PNG if i == 0
                                else f"{stem}_{name}{ext}")
            plot_learning_curve(view, path, title=f"{config.name}: learning curve ({name})")
            print(f"learning curve: {path}", flush=True)


def _run_eval(ev, engine, state, data, step, writer, result) -> None:
    t = time.perf_counter()
    metrics = ev(engine, state, data)
    if metrics:
        writer.write(step, metrics, f"eval_{ev.name}")
        result[f"eval/{ev.name}"] = metrics
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        from tqdm import tqdm

        # tqdm.write keeps the line apart from a progress bar on the same terminal.
        tqdm.write(f"[eval {ev.name} @ step {step}] {shown} ({time.perf_counter() - t:.1f}s)")

