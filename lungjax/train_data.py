"""What the training loop needs from the data side, and an in-memory implementation.

The loop trains in *rounds* of ``steps_per_round`` steps. Entering round ``r > 0`` it
calls ``begin_round(r, engine, state)``; at the start of every round it asks the data
source for ``iterator(r)``: the source freezes its sample index as a pure function of
(seed, r, its host-side state) and returns a Grain iterator of host-local batches. During
the round the loop passes per-sample step outputs to ``update`` (e.g. hard negative
mining); they may change the index of the next round only. Checkpoints save
``state_dict()`` together with the iterator's position, so ``load_state_dict`` followed by
``iterator(r)`` must rebuild the very same round dataset (a source that mutates its state
during a round keeps the round's frozen snapshot in its state dict).

Batches are dicts of numpy arrays with the per-host batch as leading axis: ``image``
(b, D, H, W[, C]) float32, ``label`` (b,) int32, ``index`` (b,) int64 sample ids, optional
``weight`` (b,) float32.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Mapping, Protocol

import grain
import jax
import numpy as np


class TrainData(Protocol):
    """A training data source; subclass it to inherit the no-op ``begin_round``."""

    steps_per_round: int  # 0 = a single round for the whole run

    def begin_round(self, round_index: int, engine: Any, state: Any) -> None:
        """Called by the loop at a round boundary, after the last step of the previous
        round and before ``iterator(round_index)``, with the ``lungjax.train.Engine`` and
        the current ``TrainStates`` (e.g. a provisional test of the network whose
        detections become the next round's sampling anchors). Default: nothing."""
        del round_index, engine, state

    def iterator(self, round_index: int) -> Iterator[dict[str, np.ndarray]]: ...

    def update(self, host_outputs: Mapping[str, np.ndarray]) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]: ...


class _Gather:
    """Grain map: sample id -> sample dict (picklable for multiprocess prefetch)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images = images
        self.labels = labels

    def __call__(self, i):
        i = int(i)
        return {"image": self.images[i], "label": np.int32(self.labels[i]),
                "index": np.int64(i)}


class ArrayTrainData(TrainData):
    """Patches held in memory, drawn in a seeded shuffled order; used by tests and
    benchmarks, and as the engine's fallback when no store pipeline is configured.

    Each round reshuffles with ``seed`` and the round number; every host takes its own
    interleaved share of the shuffled ids (``process_index::process_count``).

    Args:
      images: (N, D, H, W) or (N, D, H, W, C) float32 patches.
      labels: (N,) int labels.
      batch_size: per-host batch size.
      seed: shuffling seed.
      steps_per_round: see module docstring (0 = one round).
      val_images / val_labels: optional held-out patches for ``eval_batches``.
      process_index / process_count: this host's share.
      worker_count: Grain multiprocess prefetch workers (0 = in-process).
    """

    def __init__(self, images, labels, batch_size: int, seed: int = 0,
                 steps_per_round: int = 0, val_images=None, val_labels=None,
                 process_index: int = 0, process_count: int = 1, worker_count: int = 0):
        self.images = np.asarray(images, np.float32)
        self.labels = np.asarray(labels, np.int32)
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.steps_per_round = int(steps_per_round)
        self.val_images = None if val_images is None else np.asarray(val_images, np.float32)
        self.val_labels = None if val_labels is None else np.asarray(val_labels, np.int32)
        self.process_index = process_index
        self.process_count = process_count
        self.worker_count = worker_count
        # Host-side statistics the sampler keeps: last seen loss per sample.
        self.last_loss = np.full(len(self.labels), np.nan, np.float32)
        self.updates = 0

    def iterator(self, round_index: int):
        ds = (grain.MapDataset.range(len(self.labels))
              .shuffle(seed=self.seed * 1_000_003 + round_index)
              .repeat(None))
        ds = ds[self.process_index::self.process_count]
        ds = ds.map(_Gather(self.images, self.labels)).batch(self.batch_size,
                                                             drop_remainder=True)
        it = ds.to_iter_dataset()
        if self.worker_count:
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_count))
        return iter(it)

    def update(self, host_outputs):
        if "index" in host_outputs and "loss" in host_outputs:
            self.last_loss[np.asarray(host_outputs["index"])] = host_outputs["loss"]
            self.updates += 1

    def state_dict(self) -> dict:
        return {"last_loss": self.last_loss.copy(), "updates": self.updates}

    def load_state_dict(self, state) -> None:
        self.last_loss = np.asarray(state["last_loss"], np.float32).copy()
        self.updates = int(state["updates"])

    def eval_batches(self):
        if self.val_images is None:
            return
        n = len(self.val_labels)
        mine = np.arange(n)[self.process_index::self.process_count]
        b = self.batch_size
        # Every host runs the same number of batches (collectives need it); short
        # hosts pad with zero-weight rows.
        n_batches = -(-(-(-n // self.process_count)) // b)
        for j in range(n_batches):
            ids = mine[j * b:(j + 1) * b]
            pad = b - len(ids)
            idx = np.concatenate([ids, np.zeros(pad, ids.dtype)])
            yield {"image": self.val_images[idx], "label": self.val_labels[idx],
                   "index": idx.astype(np.int64),
                   "weight": np.concatenate([np.ones(len(ids)), np.zeros(pad)]).astype(np.float32)}


# ----------------------------------------------------------------------------------
# Data from the config: generated or real LUNA16 layout -> patch store -> pipeline
# ----------------------------------------------------------------------------------


def _synthetic_name(config) -> str:
    """Cache folder of a generated dataset; the generator's format version is part of the
    name, so a cache made by an older generator is never mistaken for the current one."""
    from lungjax.data.synthetic import FORMAT_VERSION

    d = config.data
    return f"synthetic_{d.synthetic_preset}_seed{d.synthetic_seed}_v{FORMAT_VERSION}"


def default_store_path(config) -> str:
    d = config.data
    if d.root:
        name = "prepared_" + os.path.basename(os.path.normpath(d.root))
    else:
        name = _synthetic_name(config)
    sp = "x".join(f"{v:g}" for v in d.spacing_zyx)
    # A store is prepared with one nodule-mask rule (prepare_dataset refuses another), so
    # the drawn rules ("sphere", "disc") get their own store beside the consensus one.
    masks = "" if d.nodule_mask == "consensus" else f"_{d.nodule_mask}"
    return os.path.join(d.cache_dir, name, f"store_{sp}mm{masks}")


def prepare_data(config) -> str:
    """Path of the prepared patch store for ``config``, creating it once if needed.

    ``data.store`` set: used as is. Otherwise the LUNA16-layout folder ``data.root`` (or,
    unset, the generated dataset ``data.synthetic_preset`` / ``data.synthetic_seed``,
    cached under ``data.cache_dir``) is preprocessed into ``<cache_dir>/.../store_*``.
    Both steps are idempotent, so every later run reuses them. In multi-host runs process
    0 prepares and the others wait.
    """
    d = config.data
    if d.store:
        return d.store
    store_path = default_store_path(config)
    if jax.process_index() == 0:
        root = d.root
        if not root:
            from lungjax.data.synthetic import generate_dataset

            root = os.path.join(d.cache_dir, _synthetic_name(config), "luna16")
            root = generate_dataset(root, d.synthetic_preset, seed=d.synthetic_seed,
                                    workers=d.prepare_workers)
        elif not os.path.isdir(root):
            raise FileNotFoundError(f"config.data.root={root!r} is not a directory")
        from lungjax.data.prepare import prepare_dataset

        prepare_dataset(root, store_path, spacing_zyx=tuple(d.spacing_zyx),
                        workers=d.prepare_workers, hu_window=tuple(d.hu_window),
                        nodule_mask=d.nodule_mask)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("lungjax_prepare_data")
    return store_path


def held_out_uids(config, store) -> list[str]:
    """Scans of fold ``data.fold`` (LUNA16 subset number)."""
    uids = store.uids([int(config.data.fold)])
    if not uids:
        raise ValueError(f"config.data.fold={config.data.fold}: the store has no scan in "
                         f"that fold (folds present: {sorted({r.fold for r in store.scans})})")
    return uids


def build_train_data(config, workdir: str | None = None):
    """The ``TrainData`` for ``config``: patches of the training folds from the store."""
    del workdir
    if config.data.source != "store":
        raise ValueError(f"config.data.source={config.data.source!r}: only 'store' builds "
                         "data from a config (pass ArrayTrainData directly for arrays)")
    from lungjax.data.pipeline import StoreTrainData, Targets
    from lungjax.data.store import PatchStore

    store = PatchStore.open(prepare_data(config))
    held = held_out_uids(config, store)
    train_uids = [u for u in store.uids() if u not in set(held)]
    if not train_uids:
        raise ValueError("no training scans: every scan of the store is in the held-out fold "
                         f"{config.data.fold}")
    cls = StoreTrainData
    if config.sampler.name != "balanced":  # a method's own source (e.g. provisional tests)
        from lungjax.registry import SAMPLERS

        cls = SAMPLERS.get(config.sampler.name)
    # What the batches carry besides image and label (masks, malignancy): data.batch_*.
    return cls(config, store, train_uids, held, seed=config.seed,
               process_index=jax.process_index(), process_count=jax.process_count(),
               targets=Targets.from_config(config))
