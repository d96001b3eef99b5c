"""Device mesh, shardings, host -> global batches, multi-host initialisation.

Data parallel: a 1-D mesh over every device with axis "data"; batches are split along
their leading axis (``P("data")``), the train state is replicated. Multi-host runs call
``initialize_distributed`` first; each host then feeds only its own slice of the global
batch and ``jax.make_array_from_process_local_data`` assembles the global array.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def runs_on_cpu() -> bool:
    """Whether JAX will compute on the CPU, decided without starting a backend.

    ``jax_platforms`` (``JAX_PLATFORMS``) decides when set; unset, JAX prefers an
    accelerator whose plugin is installed (GPU: a ``jax_plugins`` package or entry point;
    TPU: ``libtpu``), so such an install counts as not CPU even on a machine without the
    device.
    """
    platforms = jax.config.jax_platforms
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    if importlib.metadata.entry_points(group="jax_plugins"):
        return False
    return not any(importlib.util.find_spec(m) for m in ("jax_plugins", "libtpu"))


def detect_cluster() -> tuple[str, int] | None:
    """(name, process count) of the multi-process cluster environment JAX's own
    ``jax.distributed.initialize()`` would join (SLURM under ``srun``, Open MPI, a Cloud
    TPU pod slice on GCE or GKE, Kubernetes, as the installed JAX supports them), or None
    when there is none or it runs a single process.

    JAX keeps its detectors in ``jax._src.clusters`` (``ClusterEnv``); they are read here
    so that lungjax joins exactly the clusters JAX itself would. An environment JAX only
    uses when asked (mpi4py) does not count.
    """
    try:
        from jax._src import clusters
        envs = list(clusters.ClusterEnv._cluster_types)
    except (ImportError, AttributeError):  # a JAX without the detectors: explicit flags only
        return None
    for env in envs:
        if getattr(env, "opt_in_only_method", False):
            continue
        try:
            if env.is_env_present():
                return str(getattr(env, "name", env.__name__)), int(env.get_process_count())
        except Exception:  # noqa: BLE001  a detector that cannot read its environment
            continue
    return None


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> str | None:
    """Starts multi-host JAX when the flags, the environment or the cluster ask for it.

    In order: the arguments; the environment variables ``LUNGJAX_COORDINATOR``
    (host:port), ``LUNGJAX_NUM_PROCESSES`` and ``LUNGJAX_PROCESS_ID`` for missing ones;
    with neither, the cluster JAX detects (:func:`detect_cluster`: SLURM, Open MPI, Cloud
    TPU, Kubernetes), joined through ``jax.distributed.initialize()``'s own discovery.
    On CPU, cross-process collectives go through gloo (accelerators use their own).

    Returns:
      How the run was joined ("flags", or the cluster's name), or None for a
      single-process run.
    """
    coordinator_address = coordinator_address or os.environ.get("LUNGJAX_COORDINATOR")
    if num_processes is None and os.environ.get("LUNGJAX_NUM_PROCESSES"):
        num_processes = int(os.environ["LUNGJAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("LUNGJAX_PROCESS_ID"):
        process_id = int(os.environ["LUNGJAX_PROCESS_ID"])
    explicit = bool(coordinator_address) and (num_processes or 1) > 1
    cluster = None if explicit or coordinator_address else detect_cluster()
    if not explicit and (cluster is None or cluster[1] <= 1):
        return None
    if explicit and process_id is None:
        raise ValueError("multi-host run: --process_id (or LUNGJAX_PROCESS_ID) is required")
    if runs_on_cpu():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
        return "flags"
    jax.distributed.initialize()
    return cluster[0]


def make_mesh(devices: Any = None) -> Mesh:
    """1-D mesh with axis "data" over ``devices`` (default: all devices of all hosts)."""
    devices = np.asarray(jax.devices() if devices is None else devices).reshape(-1)
    return Mesh(devices, (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over "data"; other axes whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh: Mesh) -> int:
    """Validates ``global_batch`` against devices and hosts; returns the per-host size."""
    n_dev = mesh.devices.size
    n_proc = jax.process_count()
    if global_batch % n_dev:
        raise ValueError(f"config.train.batch_size={global_batch} is not divisible by the "
                         f"{n_dev} devices of the mesh")
    if global_batch % n_proc:
        raise ValueError(f"config.train.batch_size={global_batch} is not divisible by the "
                         f"{n_proc} processes")
    return global_batch // n_proc


def to_global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local batch (this host's rows) -> global ``jax.Array``s sharded on "data".

    Every array's leading axis is the per-host batch; the global batch concatenates the
    hosts in process order.
    """
    sharding = data_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}


def replicate_tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """A sharding for every leaf of ``tree`` (arrays or ShapeDtypeStructs): replicated."""
    rep = replicated(mesh)
    return jax.tree_util.tree_map(lambda _: rep, tree)


def create_sharded_state(init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh):
    """Initialises a state directly with its shardings (no host round trip).

    Args:
      init_fn: pure ``rng -> state`` (e.g. ``functools.partial(create_train_state, ...)``).
      rng: a PRNG key (typed or raw).
      mesh: the device mesh.

    Returns:
      (state, state_shardings, abstract_state): the abstract state (ShapeDtypeStructs
      carrying shardings) is what a checkpoint restore needs.
    """
    init, shardings, abstract = make_sharded_init(init_fn, rng, mesh)
    return init(rng), shardings, abstract


def make_sharded_init(init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh):
    """``(jitted_init, state_shardings, abstract_state)`` for ``init_fn(rng) -> state``.

    ``jitted_init(rng)`` creates the state directly with its shardings; call it again for
    a fresh state without recompiling (e.g. one per cross-validation fold).
    """
    abstract = jax.eval_shape(init_fn, rng)
    shardings = replicate_tree_shardings(abstract, mesh)
    init = jax.jit(init_fn, out_shardings=shardings)
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return init, shardings, abstract


def fetch_to_host(tree: Any) -> Any:
    """Copies (fully replicated or fully addressable) arrays to numpy on this host."""
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)


def sync_flag(flag: bool) -> bool:
    """True on every host if ``flag`` is True on any host (used for preemption)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))
