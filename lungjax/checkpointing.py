"""Checkpoints: the only module that imports Orbax.

One checkpoint = three items saved together under ``<workdir>/checkpoints/<step>/``:

* ``state``: the ``TrainStates`` of the stage's networks (sharded jax arrays), stored as
  ``{network name: {step, params, model_state, opt_state, rng}}``;
* ``data``: the Grain iterator state (one JSON file per process, via Grain's handler),
  or an empty JSON object when the data stream needs none;
* ``host``: host-side state as a pytree of numpy arrays / scalars (sampler state, round
  number, frozen sample index): everything needed to rebuild the same data stream.

Orbax writes each step into a temporary directory and renames it when complete, so a run
killed mid-save (SIGKILL, preemption) leaves the previous checkpoint intact and the partial
one is ignored. Restoring uses an abstract state carrying shardings, so arrays land directly
on the right devices.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from lungjax import fileio


def checkpoint_path(directory: str | os.PathLike) -> str:
    """The checkpoint folder as Orbax takes it: a local path made absolute, or a
    ``gs://`` URL.

    Raises:
      ValueError: an ``s3://`` URL; this Orbax version builds checkpoint paths for local
        folders and ``gs://`` only (it reads ``s3://bucket`` as a relative path).
    """
    directory = fileio.abspath(directory)
    if fileio.is_url(directory) and not directory.startswith("gs://"):
        raise ValueError(f"{directory}: orbax-checkpoint {ocp.__version__} writes checkpoints "
                         "to local or shared folders and gs:// only; give the run folder "
                         "(--workdir) there (the patch store may stay on s3://)")
    return directory


class Checkpointer:
    """Save / restore the (state, data iterator, host state) triple of a run.

    Args:
      directory: where checkpoints live (``<workdir>/checkpoints``).
      max_to_keep: how many recent checkpoints to keep.
      async_save: write in a background thread (the device -> host copy is synchronous,
        so the state may be donated right after ``save`` returns).
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3,
                 async_save: bool = True):
        self.directory = checkpoint_path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
        self._mngr = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler(),
                           "host": ocp.StandardCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def save(self, step: int, state: Any, data_iterator: Any = None,
             host_state: dict | None = None, force: bool = True) -> bool:
        """Saves a checkpoint for ``step``; returns whether one was written.

        Args:
          step: the number of optimizer steps the state has taken.
          state: the TrainStates (or any pytree of jax arrays).
          data_iterator: a Grain ``DatasetIterator`` (``get_state``/``set_state``) or None.
          host_state: pytree of numpy arrays / python scalars; must not be empty.
        """
        host_state = _host_tree(host_state or {})
        items = {
            "state": ocp.args.StandardSave(state),
            "host": ocp.args.StandardSave(host_state),
        }
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_grain_compatible(data_iterator))
        return self._mngr.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state: Any, data_iterator: Any = None,
                step: int | None = None) -> tuple[int, Any, dict] | None:
        """Restores the latest (or given) checkpoint; None when there is none.

        Args:
          abstract_state: pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set.
          data_iterator: a Grain iterator whose position is restored in place (build the
            same dataset first, from the restored host state via ``restore_host``).
          step: a specific step; default the latest.

        Returns:
          (step, state, host_state).
        """
        step = self._mngr.latest_step() if step is None else step
        if step is None:
            return None
        items = {"state": ocp.args.StandardRestore(abstract_state),
                 "host": ocp.args.StandardRestore()}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(_grain_compatible(data_iterator))
        out = self._mngr.restore(step, args=ocp.args.Composite(**items))
        return step, out["state"], _from_host_tree(out["host"])

    def restore_host(self, step: int | None = None) -> dict | None:
        """Only the host state of the latest (or given) checkpoint (to rebuild the data)."""
        step = self._mngr.latest_step() if step is None else step
        if step is None:
            return None
        out = self._mngr.restore(step, args=ocp.args.Composite(host=ocp.args.StandardRestore()))
        return _from_host_tree(out["host"])

    def wait(self) -> None:
        """Blocks until background writes are finished."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


class _JsonBytesState:
    """Adapts an iterator whose ``get_state`` returns a JSON-able object (wrappers around
    Grain iterators) to Grain's checkpoint handler, which expects bytes from anything that
    is not a ``grain.DatasetIterator``."""

    def __init__(self, it):
        self.it = it

    def get_state(self) -> bytes:
        return json.dumps(self.it.get_state()).encode()

    def set_state(self, state: bytes) -> None:
        self.it.set_state(json.loads(state))

    def start_prefetch(self) -> None:
        fn = getattr(self.it, "start_prefetch", None)
        if fn is not None:
            fn()


def _grain_compatible(it):
    if isinstance(it, grain.DatasetIterator) or isinstance(it.get_state(), bytes):
        return it
    return _JsonBytesState(it)


def restore_params(directory: str | os.PathLike, step: int | None = None,
                   network: str | None = None) -> dict:
    """One network's params (and model state) of a checkpoint as numpy trees, without
    the optimizer.

    Used by two-stage methods (initialise a stage from another's trained weights) and by
    export / evaluation.

    Args:
      directory: a run's ``checkpoints`` directory.
      step: a specific step; default the latest.
      network: which network of the stage's ``TrainStates`` (e.g. "segmenter"); None
        for a stage with a single network.

    Returns:
      ``{"params": ..., "model_state": ..., "step": int, "network": str}``.
    """
    directory = checkpoint_path(directory)
    with ocp.CheckpointManager(directory, item_handlers={
            "state": ocp.StandardCheckpointHandler()}) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    # Without a target Orbax gives the TrainStates back as {name: {field: ...}}.
    states = dict(out["state"])
    if network is None:
        if len(states) != 1:
            raise ValueError(f"checkpoint {directory} step {step} holds networks "
                             f"{', '.join(states)}; pick one by name")
        network = next(iter(states))
    if network not in states:
        raise KeyError(f"checkpoint {directory} step {step} has no network {network!r}; "
                       f"networks: {', '.join(states)}")
    st = states[network]
    return {"params": jax.tree_util.tree_map(np.asarray, st["params"]),
            "model_state": jax.tree_util.tree_map(np.asarray, st["model_state"] or {}),
            "step": int(step), "network": network}


# Orbax pytrees want array leaves and non-empty containers; host state is small and
# heterogeneous (ints, lists, arrays, nested dicts), so wrap scalars as 0-d arrays and
# mark empty containers.
_EMPTY = "__empty__"


def _host_tree(tree: Any) -> Any:
    if isinstance(tree, dict):
        if not tree:
            return {_EMPTY: np.zeros((), np.int8)}
        return {str(k): _host_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return _host_tree({f"__{i}": v for i, v in enumerate(tree)} | {"__len": len(tree)})
    if tree is None:
        return {"__none": np.zeros((), np.int8)}
    return np.asarray(tree)


def _from_host_tree(tree: Any) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {_EMPTY}:
            return {}
        if set(tree) == {"__none"}:
            return None
        if "__len" in tree:
            n = int(np.asarray(tree["__len"]))
            return [_from_host_tree(tree[f"__{i}"]) for i in range(n)]
        return {k: _from_host_tree(v) for k, v in tree.items()}
    a = np.asarray(tree)
    if a.ndim == 0:
        return a.item()
    return a


class PreemptionGuard:
    """Turns SIGTERM (and SIGINT) into a flag the training loop polls.

    The loop saves a checkpoint and exits cleanly when ``requested`` is set. Use as a
    context manager; previous handlers are restored on exit. Only the main thread can
    install signal handlers; elsewhere the guard is inert.
    """

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signals = signals
        self.requested = False
        self._previous = {}

    def _handler(self, signum, frame):
        del frame
        self.requested = True
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        return False
