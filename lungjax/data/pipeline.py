"""Grain input pipeline: frozen sample index -> patch read -> random augmentation ->
batch -> (multiprocess prefetch) -> numpy batches for one host.

    sampler = Sampler.from_store(store, config, train_uids, seed=seed)
    index = sampler.freeze_index(seed)
    ds = build_train_dataset(config, store, index, seed=seed,
                             process_index=jax.process_index(),
                             process_count=jax.process_count())
    it = iter(ds)                      # it.get_state() / it.set_state(s) for Orbax
    for batch in it: ...               # one round; then sampler.next_round() and rebuild

``StoreTrainData`` wraps exactly that for the engine's ``TrainData`` protocol
(lungjax/train_data.py): endless rounds of ``sampler.steps_per_round`` steps.

A dataset covers one round: one pass over its index (``index.num_batches`` global
batches) or, with ``repeat=True``, endless epochs of it. Every element is a dict of
numpy arrays for this host's share of a global batch (B = train.batch_size /
process_count):

    "image":       (B, D, H, W, 1) float32 in [0, 1]  ((B, H, W, 1) for 2D patches)
    "label":       (B,) int32, 1 = nodule
    "sample_id":   (B,) int64, pool id for ``Sampler.update`` (-1 = padding); the key
                   is ``id_key`` ("index" for the engine)
    "weight":      (B,) float32 loss weight (0 = padding)
    "kind":        (B,) int32, ``sampler.NODULE`` .. ``sampler.HARD_NEG``
    "offset_zyx":  (B, 3) float32, nodule centre minus the patch's geometric centre
                   ((S - 1) / 2), in voxels of the augmented patch
    "diameter_mm": (B,) float32, nodule diameter times the zoom factor (0 for negatives)
    "position":    (B,) int64, epoch * len(index) + row of the slot in the index
    with data.max_nodules_per_patch = M > 0 also "nodules_zyx" (B, M, 3) float32 patch
    voxels of every nodule reaching into the patch, "nodules_diameter_mm" (B, M)
    (0 = padding) and "excluded_zyx" / "excluded_diameter_mm" likewise (2D patches
    too: z is then the nodule centre's offset in slices from the patch's slice)
    with ``Targets(mask=True)`` also
    "mask":        (B, D, H, W) uint8 0/1 ((B, H, W) for 2D), the store's nodule mask
                   (every nodule) under the same crop, zoom, rotation and flips as
                   "image", zoomed by nearest neighbour; the lung mask instead with
                   ``Targets(mask_array="lung")``
    with ``Targets(malignancy=True)`` also
    "malignancy":  (B,) float32 median reader malignancy of the sample's nodule (1..5
                   in half steps; 0 = no score: negatives, LUNA16 annotations)
    "malignant":   (B,) int32 1 = malignant (median >= 4), 0 = benign (<= 2), -1 =
                   neither (3, the ties 2.5 / 3.5, no score) unless
                   ``Targets.uncertain`` assigns 3 and the ties to a class

Randomness: each sample's augmentation comes from a generator seeded by (seed,
round, position in the full index), so batches do not depend on the number of
hosts, prefetch workers or threads, and a restored iterator continues exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import grain
import numpy as np
from absl import flags

from lungjax.data import augment as aug
from lungjax.train_data import TrainData
from lungjax.data.sampler import (CANDIDATE_NEG, NODULE, UNCERTAIN_CHOICES, Sampler,
                                   SampleIndex, malignant_label, section)


# Stored masks a batch's "mask" can come from (lungjax.data.store arrays).
MASK_ARRAYS = ("nodules", "lung")


@dataclasses.dataclass(frozen=True)
class Targets:
    """Dense targets and labels a batch carries besides the image. All off by default:
    a config that asks for none gets exactly the batches it always got (the extra reads
    draw no random numbers either way).

    Attributes (config field in brackets):
      mask: add "mask", the nodule mask transformed as the image [data.batch_mask].
      mask_array: the stored mask "mask" is read from: "nodules" (every nodule) or
        "lung" (the lung mask, for lung segmentation) [data.batch_mask_array].
      malignancy: add "malignancy" and "malignant" [data.batch_malignancy].
      uncertain: what "malignant" says for median 3 and the ties 2.5 / 3.5:
        "exclude" (-1), "benign" (0) or "malignant" (1) [data.malignancy_uncertain].
    """

    mask: bool = False
    malignancy: bool = False
    uncertain: str = "exclude"
    mask_array: str = "nodules"

    def __post_init__(self):
        if self.mask_array not in MASK_ARRAYS:
            raise ValueError(f"config.data.batch_mask_array must be one of {MASK_ARRAYS}, "
                             f"got {self.mask_array!r}")
        if self.uncertain not in UNCERTAIN_CHOICES:
            raise ValueError(f"config.data.malignancy_uncertain must be one of "
                             f"{UNCERTAIN_CHOICES}, got {self.uncertain!r}")

    @classmethod
    def from_config(cls, config) -> "Targets":
        """From the declared fields data.batch_mask, data.batch_mask_array,
        data.batch_malignancy and data.malignancy_uncertain (lungjax/config_schema.py)."""
        data = config.data
        return cls(mask=bool(data.batch_mask), malignancy=bool(data.batch_malignancy),
                   uncertain=str(data.malignancy_uncertain),
                   mask_array=str(data.batch_mask_array))



@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """What the pipeline reads from the run config (lungjax/config_schema.py layout).

    Attributes (config field in brackets):
      patch_size_zyx: (D, H, W) patch size [data.patch_size_zyx; two entries (H, W)
        or data.spatial_dims = 2 with D = 1 mean 2D patches].
      is_2d: single-slice patches, batches (B, H, W, 1).
      batch_size: global batch size [train.batch_size].
      num_workers: Grain prefetch processes, 0 = in-process [data.workers].
      worker_buffer_size: batches buffered per worker [data.prefetch_buffer].
      read_threads: threads per process reading patches [data.read_threads, default 2].
      prefetch_batches: batches those threads read ahead [data.prefetch_batches, default 4].
      max_nodules: findings per patch listed in the batch, 0 = none
        [data.max_nodules_per_patch, default 0].
      augment_positive / augment_negative: [augment.positive / augment.negative],
        ``augment.AugmentConfig`` fields.
    """

    patch_size_zyx: tuple[int, int, int]
    is_2d: bool
    batch_size: int
    num_workers: int = 0
    worker_buffer_size: int = 2
    read_threads: int = 2
    prefetch_batches: int = 4
    max_nodules: int = 0
    augment_positive: aug.AugmentConfig = aug.AugmentConfig()
    augment_negative: aug.AugmentConfig = aug.AugmentConfig()

    @classmethod
    def from_config(cls, config) -> "PipelineConfig":
        """Reads the fields listed above; a bad value fails naming its config field."""
        data, train, augd = (section(config, n) for n in ("data", "train", "augment"))
        if "patch_size_zyx" not in data:
            raise ValueError("config.data.patch_size_zyx is not set")
        size = tuple(int(v) for v in data["patch_size_zyx"])
        if len(size) not in (2, 3) or min(size) <= 0:
            raise ValueError(f"config.data.patch_size_zyx must be 3 (z, y, x) or 2 (y, x) "
                             f"positive ints, got {size}")
        if len(size) == 3 and int(data["spatial_dims"]) == 2:
            if size[0] != 1:
                raise ValueError(f"config.data.spatial_dims = 2 needs patch_size_zyx (H, W) or "
                                 f"(1, H, W), got {size}")
            size = size[1:]
        is_2d = len(size) == 2
        if is_2d:
            size = (1,) + size
        if "batch_size" not in train:
            raise ValueError("config.train.batch_size (global batch size) is not set")
        vals = {"batch_size": ("train.batch_size", train["batch_size"], 1),
                "num_workers": ("data.workers", data["workers"], 0),
                "worker_buffer_size": ("data.prefetch_buffer", data["prefetch_buffer"], 1),
                "read_threads": ("data.read_threads", data["read_threads"], 1),
                "prefetch_batches": ("data.prefetch_batches", data["prefetch_batches"], 0),
                "max_nodules": ("data.max_nodules_per_patch", data["max_nodules_per_patch"], 0)}
        ints = {}
        for k, (name, v, lo) in vals.items():
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"config.{name} must be an integer >= {lo}, got {v!r}")
            ints[k] = int(v)
        unknown = sorted(set(augd) - {"positive", "negative"})
        if unknown:
            raise ValueError(f"config.augment: unknown field(s) {unknown}; known: positive, "
                             "negative")
        return cls(
            patch_size_zyx=size, is_2d=is_2d, **ints,
            augment_positive=aug.AugmentConfig.from_mapping(augd["positive"],
                                                            "config.augment.positive"),
            augment_negative=aug.AugmentConfig.from_mapping(augd["negative"],
                                                            "config.augment.negative"),
        )


class PatchTransform(grain.transforms.MapWithIndex):
    """Element number -> one augmented sample (dict of numpy arrays).

    Element ``i`` of this host's (possibly repeated) stream is epoch ``i // n`` and
    slot ``i % n`` of the host's share (n = len(index) / process_count). Epoch 0 is
    the frozen index order; later epochs permute positives among positive slots and
    negatives among negative slots (seeded by (seed, round, epoch)), so every global
    batch keeps its exact positive count while its members change.

    Holds the store (a ``PatchStore`` pickles to its path + manifest and reopens in
    the worker) and the frozen index; nothing mutable from the sampler.
    """

    def __init__(self, store, index: SampleIndex, cfg: PipelineConfig, *, seed: int,
                 process_index: int, process_count: int, augment: bool = True,
                 id_key: str = "sample_id", targets: Targets = Targets()):
        self.store = store
        self.targets = targets
        self.samples = index.samples
        self.uids = index.uids
        self.cfg = cfg
        self.seed = int(seed) & 0xFFFFFFFF
        self.round = int(index.round)
        self.augment = bool(augment)
        self.id_key = id_key
        self.global_batch = index.batch_size
        self.local_batch = index.batch_size // process_count
        self.host = int(process_index)
        self.n_local = len(index) // process_count
        self._spacing: dict[int, np.ndarray] = {}
        self._findings: dict[int, tuple] = {}
        self._perm: tuple[int, np.ndarray | None] = (0, None)

    def _spacing_of(self, scan: int) -> np.ndarray:
        sp = self._spacing.get(scan)
        if sp is None:
            sp = np.asarray(self.store.scan(self.uids[scan]).spacing_zyx, np.float64)
            self._spacing[scan] = sp
        return sp

    def _epoch_perm(self, epoch: int) -> np.ndarray | None:
        if epoch == 0:
            return None
        cached = self._perm  # one read: reader threads may replace it concurrently
        if cached[0] == epoch:
            return cached[1]
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.round, epoch, 2]))
        perm = np.arange(len(self.samples))
        for slots in (np.flatnonzero(self.samples["label"] > 0),
                      np.flatnonzero(self.samples["label"] <= 0)):
            perm[slots] = rng.permutation(slots)
        self._perm = (epoch, perm)
        return perm

    def map_with_index(self, i: int, element=None) -> dict[str, np.ndarray]:
        epoch, j = divmod(int(i), self.n_local)
        k, slot = divmod(j, self.local_batch)
        slot_pos = k * self.global_batch + self.host * self.local_batch + slot
        perm = self._epoch_perm(epoch)
        row = self.samples[slot_pos if perm is None else perm[slot_pos]]
        position = epoch * len(self.samples) + slot_pos
        return self.read(row, position)

    def read(self, row, position: int) -> dict[str, np.ndarray]:
        """Reads and augments index row ``row``; draws from (seed, round, position)."""
        cfg = self.cfg
        out = cfg.patch_size_zyx
        label = int(row["label"])
        if self.augment:
            rng = np.random.default_rng(
                np.random.SeedSequence([self.seed, self.round, int(position)]))
            acfg = cfg.augment_positive if label > 0 else cfg.augment_negative
            params = aug.draw_params(acfg, rng, spacing_zyx=self._spacing_of(int(row["scan"])),
                                     diameter_mm=float(row["diameter_mm"]),
                                     square_yx=out[1] == out[2], is_2d=cfg.is_2d)
        else:
            params = aug.IDENTITY
        center = np.rint(np.asarray(row["center_zyx"], np.float64)).astype(np.int64) \
            + np.asarray(params.shift_zyx, np.int64)
        pre = aug.rotated_input_shape(out, params.rot_k)
        size = aug.read_size(pre, params.scale, cfg.is_2d)
        crop = self.store.read_patch(self.uids[int(row["scan"])], center, size)
        image = aug.apply(crop, out, params, cfg.is_2d)
        target = np.asarray(row["target_zyx"], np.float64) - center + np.asarray(size) // 2
        offset = aug.relative_to_center(aug.map_point(target, size, out, params, cfg.is_2d), out)
        image = image[0] if cfg.is_2d else image
        extra = (self._patch_findings(int(row["scan"]), center, size, params)
                 if cfg.max_nodules else {})
        if self.targets.mask:
            extra["mask"] = self._patch_mask(int(row["scan"]), center, size, params)
        if self.targets.malignancy:
            m = float(row["malignancy"])
            extra["malignancy"] = np.float32(m)
            extra["malignant"] = np.int32(malignant_label(m, self.targets.uncertain))
        return {**extra,
            "image": image[..., None],
            "label": np.int32(label),
            self.id_key: np.int64(row["sample_id"]),
            "weight": np.float32(row["weight"]),
            "kind": np.int32(row["kind"]),
            "offset_zyx": offset.astype(np.float32),
            "diameter_mm": np.float32(row["diameter_mm"] * params.scale),
            "position": np.int64(position),
        }


    def _patch_mask(self, scan: int, center, size, params) -> np.ndarray:
        """(D, H, W) or (H, W) uint8 0/1: the nodule mask (or the lung mask, with
        ``targets.mask_array="lung"``) read with the image's crop and put through the
        image's transform (nearest-neighbour zoom)."""
        uid = self.uids[scan]
        array = self.targets.mask_array
        if array in self.store.scan(uid).arrays:
            labels = self.store.read_patch(uid, center, size, array=array)
        else:  # a store without that mask: nothing to segment
            labels = np.zeros(tuple(int(v) for v in size), np.float32)
        mask = aug.apply((labels > 0).astype(np.float32), self.cfg.patch_size_zyx, params,
                         self.cfg.is_2d, order=0)
        mask = (mask > 0.5).astype(np.uint8)
        return mask[0] if self.cfg.is_2d else mask

    def _patch_findings(self, scan: int, center, size, params) -> dict[str, np.ndarray]:
        """Every nodule / excluded finding of the scan whose sphere reaches into the
        augmented patch, nearest to the patch centre first, padded to
        ``cfg.max_nodules`` rows with diameter 0: "nodules_zyx" (M, 3) float32 absolute
        patch voxels, "nodules_diameter_mm" (M,) float32 (times the zoom), and likewise
        "excluded_zyx" / "excluded_diameter_mm" (unknown diameters count as 10 mm, the
        LUNA16 rule). Anchor-based detectors need them so that a second nodule inside a
        patch is not trained as background."""
        found = self._findings.get(scan)
        if found is None:
            rec = self.store.scan(self.uids[scan])
            ex_d = np.asarray(rec.excluded_diameter_mm, np.float64).reshape(-1)
            found = (np.asarray(rec.nodules_zyx, np.float64).reshape(-1, 3),
                     np.asarray(rec.nodule_diameter_mm, np.float64).reshape(-1),
                     np.asarray(rec.excluded_zyx, np.float64).reshape(-1, 3),
                     np.where(ex_d > 0, ex_d, 10.0))
            self._findings[scan] = found
        out_shape = np.asarray(self.cfg.patch_size_zyx, np.float64)
        mm = self._spacing_of(scan) / params.scale  # mm per augmented-patch voxel
        m = self.cfg.max_nodules
        result = {}
        for name, zyx, diam in (("nodules", found[0], found[1]), ("excluded", found[2], found[3])):
            pts = np.zeros((m, 3), np.float32)
            dm = np.zeros((m,), np.float32)
            if len(zyx):
                p = aug.map_point(zyx - center + np.asarray(size) // 2, size, out_shape, params,
                                  self.cfg.is_2d)
                d = diam * params.scale
                # Distance from the patch box, in mm of the scan, against the true radius.
                gap = np.linalg.norm((p - np.clip(p, 0, out_shape - 1)) * mm, axis=1)
                keep = np.flatnonzero(gap < diam / 2)
                dist = np.linalg.norm((p[keep] - (out_shape - 1) / 2) * mm, axis=1)
                keep = keep[np.argsort(dist, kind="stable")][:m]
                pts[:len(keep)], dm[:len(keep)] = p[keep], d[keep]
            result[f"{name}_zyx"], result[f"{name}_diameter_mm"] = pts, dm
        return result


def build_train_dataset(config, store, index: SampleIndex, *, seed: int, process_index: int = 0,
                        process_count: int = 1, augment: bool = True, repeat: bool = False,
                        id_key: str = "sample_id",
                        targets: Targets = Targets()) -> grain.IterDataset:
    """This host's batches of one round as a Grain ``IterDataset``.

    Args:
      config: run config (see ``PipelineConfig``).
      store: ``PatchStore`` (``read_patch``, ``scan(uid).spacing_zyx``); must pickle
        when ``data.workers > 0``.
      index: the round's frozen index (``Sampler.freeze_index``); its
        ``batch_size`` is the global batch size and must equal ``train.batch_size``.
      seed: experiment seed (augmentation draws from (seed, index.round, position)).
      process_index / process_count: this host and the number of hosts.
      augment: False for evaluation patches (plain centred crops).
      repeat: False = one pass (``index.num_batches`` batches); True = endless, each
        further epoch reshuffled at the same per-batch positive count.
      id_key: batch key of the sample ids.
      targets: extra batch keys (nodule mask, malignancy); none by default.

    Returns:
      An ``IterDataset`` of dicts (see the module docstring) with
      B = batch_size // process_count; its iterator has ``get_state`` / ``set_state``.
    """
    cfg = PipelineConfig.from_config(config)
    if cfg.batch_size != index.batch_size:
        raise ValueError(f"config.train.batch_size = {cfg.batch_size} but the index was "
                         f"frozen for batches of {index.batch_size}")
    index.host_view(process_index, process_count)  # validates the host split
    transform = PatchTransform(store, index, cfg, seed=seed, process_index=process_index,
                               process_count=process_count, augment=augment, id_key=id_key,
                               targets=targets)
    ds = grain.MapDataset.range(transform.n_local)
    if repeat:
        ds = ds.repeat(None)
    ds = ds.map_with_index(transform)
    ds = ds.batch(transform.local_batch, drop_remainder=True)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                              prefetch_buffer_size=cfg.prefetch_batches))
    if cfg.num_workers > 0:
        # Grain's worker processes read its absl flags; outside an absl app (tests,
        # notebooks, benches) nothing has parsed them, so take their defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=cfg.num_workers, per_worker_buffer_size=cfg.worker_buffer_size))
    return ds


def build_eval_dataset(config, store, index: SampleIndex, *, process_index: int = 0,
                       process_count: int = 1, id_key: str = "sample_id",
                       targets: Targets = Targets()) -> grain.IterDataset:
    """One pass over ``index`` (e.g. ``Sampler.freeze_eval_index``) with plain
    centred crops; padding rows carry weight 0 and sample_id -1."""
    return build_train_dataset(config, store, index, seed=0, process_index=process_index,
                               process_count=process_count, augment=False, id_key=id_key,
                               targets=targets)


def describe(batch: Mapping[str, Any]) -> dict[str, tuple]:
    """{name: (shape, dtype)} of a batch, for logs."""
    return {k: (tuple(np.shape(v)), str(np.asarray(v).dtype)) for k, v in batch.items()}


class StoreTrainData(TrainData):
    """The engine's ``TrainData`` (lungjax/train_data.py) over a patch store.

    Round r trains on ``sampler.freeze_index(seed)`` at round r, endlessly repeated
    (the engine decides when a round ends: ``sampler.steps_per_round`` steps, 0 =
    one round). Batches carry sample ids under "index"; ``update`` feeds
    ``host_outputs[score_key]`` (default "loss") back to the sampler, so
    ``hard_negative_fraction`` of the next round's negatives are the highest-loss
    ones. Every host must hold the same sampler state: pass the *global* batch's
    host outputs to ``update`` on every host.

    Args:
      config: run config (``PipelineConfig``, ``SamplerConfig.from_config``,
        ``seed``, ``sampler.steps_per_round``, ``sampler.score_key``,
        ``data.eval_patches``).
      store: ``PatchStore``.
      train_uids: training scans.
      eval_uids: held-out scans for ``eval_batches`` (nodules + candidate negatives,
        at most ``data.eval_patches``; none = no patch evaluation).
      seed: default ``config.seed``.
      process_index / process_count: this host.
      targets: extra batch keys (nodule mask, malignancy); none by default.

    Subclasses choose another pool through :meth:`make_sampler` and the held-out
    patches' kinds through ``eval_kinds``.
    """

    eval_kinds: tuple[int, ...] = (NODULE, CANDIDATE_NEG)

    def __init__(self, config, store, train_uids, eval_uids=None, *, seed: int | None = None,
                 process_index: int = 0, process_count: int = 1,
                 targets: Targets = Targets()):
        self.config = config
        self.store = store
        self.targets = targets
        self.seed = int(config["seed"] if seed is None else seed)
        self.process_index, self.process_count = int(process_index), int(process_count)
        sampler_cfg = section(config, "sampler")
        self.steps_per_round = int(sampler_cfg["steps_per_round"])
        self.score_key = str(sampler_cfg["score_key"])
        self.sampler = self.make_sampler(train_uids, random_negatives=True)
        self.eval_index = None
        if eval_uids:
            held_out = self.make_sampler(eval_uids, random_negatives=False)
            limit = int(section(config, "data")["eval_patches"])
            self.eval_index = held_out.freeze_eval_index(
                kinds=self.eval_kinds, max_samples=limit or None, seed=self.seed)

    def make_sampler(self, uids, *, random_negatives: bool) -> Sampler:
        """The sampler over ``uids`` (training scans, or held-out ones with
        ``random_negatives=False``)."""
        return Sampler.from_store(self.store, self.config, uids, seed=self.seed,
                                  random_negatives=random_negatives)

    def iterator(self, round_index: int):
        """Endless iterator of this host's batches for round ``round_index``.

        After ``load_state_dict`` the saved round's index is reused as it was, so
        the engine can restore the iterator position into it."""
        cur = self.sampler.current_index
        if cur is None or cur.round != round_index or cur.seed != self.seed:
            self.sampler.round = int(round_index)
            cur = self.sampler.freeze_index(self.seed)
        ds = build_train_dataset(self.config, self.store, cur, seed=self.seed,
                                 process_index=self.process_index,
                                 process_count=self.process_count, repeat=True, id_key="index",
                                 targets=self.targets)
        return iter(ds)

    def update(self, host_outputs: Mapping[str, np.ndarray]) -> None:
        if "index" in host_outputs and self.score_key in host_outputs:
            self.sampler.update(np.asarray(host_outputs["index"]),
                                np.asarray(host_outputs[self.score_key]))

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(state)

    def eval_batches(self):
        """One pass over the held-out patches (padding rows have weight 0)."""
        if self.eval_index is None:
            return iter(())
        return iter(build_eval_dataset(self.config, self.store, self.eval_index,
                                       process_index=self.process_index,
                                       process_count=self.process_count, id_key="index",
                                       targets=self.targets))
