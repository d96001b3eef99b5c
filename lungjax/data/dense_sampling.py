"""Samplers for segmentation and malignancy training: 2D slices balanced between
slices with and without nodule voxels, and regions of interest centred on nodules.

Both build an ordinary :class:`~lungjax.data.sampler.Sampler` pool (plain numpy, same
``state_dict``, same ``update``), so rounds, resumption and hard-example scores work as
for patches; the frozen index stays a pure function of (seed, round, pool + scores).

* ``balanced_slices`` (:class:`SliceTrainData`): one pool row per axial slice, centred
  in-plane on the stored volume (``centre="middle"``: whole slices) or, with
  ``centre="nodule"``, a positive slice on its nodule voxels' centroid and a negative
  one on a lung voxel of that slice (crops of whole slices: a network trained on them
  still segments whole slices, being fully convolutional). A slice is positive (kind
  ``NODULE``, label 1) when its nodule mask has any voxel, negative (kind
  ``RANDOM_NEG``, label 0) otherwise. With ``context`` = c >= 0 only slices from c
  before to c after each nodule's slices enter the pool (shrey2020 trains on 5 before
  to 5 after); c < 0 takes every slice holding lung. Each batch holds exactly
  ``round(B * positive_fraction)`` positives. A positive slice carries the malignancy
  of the nodule with most voxels in it.
* ``nodule_roi`` (:class:`RoiTrainData`): one row per annotated nodule with a usable
  malignancy score, centred on the nodule (yu2021: 16 x 48 x 48 ROIs). The row's label
  is the binary malignancy (:func:`~lungjax.data.sampler.malignant_label`); uncertain
  nodules (median 3 and the ties 2.5 / 3.5) are left out under "exclude". With
  ``balance`` each batch holds exactly ``round(B * positive_fraction)`` malignant ROIs
  (the smaller class is repeated); without, a round is a shuffled pass over the ROIs
  with each class's ROIs repeated ``class_repeat`` (benign, malignant) times
  (shrey2020 oversamples benign ROIs 3x).
  Split by patient (``sampler.roi_split_by_patient``): a training ROI whose patient
  (:func:`nodule_patients`) also gave a held-out nodule is left out.

Config (lungjax/config_schema.py): ``sampler.name`` picks them; ``sampler.slice_context``,
``sampler.slice_centre``, ``sampler.roi_balance``, ``sampler.roi_class_repeat``,
``sampler.roi_split_by_patient``, ``data.batch_mask``, ``data.batch_malignancy`` and
``data.malignancy_uncertain`` tune them, next to the usual ``data.positive_fraction``
and ``sampler.samples_per_round``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Sequence

import numpy as np

from lungjax.data.pipeline import StoreTrainData, Targets
from lungjax.data.sampler import (NODULE, RANDOM_NEG, SAMPLE_DTYPE, Sampler, SamplerConfig,
                                  SampleIndex, cycle_draw, malignant_label, pool_rows,
                                  round_half_up, scan_info)
from lungjax.registry import SAMPLERS


def _batch_size(config) -> int:
    return int(config["train"]["batch_size"])


SLICE_CENTRES = ("middle", "nodule")


def slice_rows(labels: np.ndarray, lung: np.ndarray | None, scan: int, context: int,
               malignancy_of_label: dict[int, float], centre: str = "middle") -> np.ndarray:
    """Pool rows of one scan's axial slices.

    Args:
      labels: (D, H, W) nodule instance labels (0 = background).
      lung: (D, H, W) lung mask, used when ``context`` < 0 and by ``centre="nodule"``'s
        negatives (None = every slice / the slice's middle).
      scan: the scan's index in the sampler's uids.
      context: slices kept before and after each nodule's slices; < 0 = every slice
        with lung.
      malignancy_of_label: mask label -> median malignancy (absent = no score).
      centre: "middle": every row at (z, H // 2, W // 2); "nodule": a positive row at
        the in-plane centroid of its largest nodule's voxels on the slice, a negative
        row at a lung voxel of the slice drawn from a generator seeded by ``scan``.

    Returns:
      (S,) ``SAMPLE_DTYPE`` rows in slice order.
    """
    if centre not in SLICE_CENTRES:
        raise ValueError(f"sampler.slice_centre must be one of {SLICE_CENTRES}, "
                         f"got {centre!r}")
    d, h, w = labels.shape
    flat = labels.reshape(d, -1).astype(np.int64)
    has = flat.max(axis=1) > 0
    if context < 0:
        keep = np.ones(d, bool) if lung is None else lung.reshape(d, -1).max(axis=1) > 0
    else:
        keep = np.zeros(d, bool)
        for k in np.unique(flat[flat > 0]):
            z = np.flatnonzero((flat == k).any(axis=1))
            keep[max(0, z[0] - context):min(d, z[-1] + context + 1)] = True
    z = np.flatnonzero(keep)
    centres = np.stack([z, np.full(len(z), h // 2), np.full(len(z), w // 2)], -1)
    pos = has[z]
    biggest = np.zeros(len(z), np.int64)
    for i in np.flatnonzero(pos):
        counts = np.bincount(flat[z[i]])
        counts[0] = 0
        biggest[i] = int(np.argmax(counts))
    if centre == "nodule":
        rng = np.random.default_rng(np.random.SeedSequence([int(scan), 2]))
        for i, zi in enumerate(z):
            where = (labels[zi] == biggest[i]) if pos[i] else (
                lung[zi] > 0 if lung is not None else None)
            if where is not None and where.any():
                yx = np.argwhere(where)
                centres[i, 1:] = yx.mean(axis=0).round() if pos[i] else \
                    yx[rng.integers(len(yx))]
    rows = pool_rows(scan, centres, centres, 0.0, 0, RANDOM_NEG)
    rows["label"][pos] = 1
    rows["kind"][pos] = NODULE
    for i in np.flatnonzero(pos):
        rows["malignancy"][i] = malignancy_of_label.get(int(biggest[i]), 0.0)
    return rows


def slice_sampler(store, uids: Sequence[str], cfg: SamplerConfig, batch_size: int,
                  context: int = 5, centre: str = "middle") -> Sampler:
    """A :class:`Sampler` over axial slices with and without nodule voxels.

    Args:
      store: ``PatchStore`` whose scans have a "nodules" array (store version 2).
      uids: the scans.
      cfg: sampling settings (``positive_fraction``, ``samples_per_round``, weights,
        ``hard_fraction``); positives are the nodule slices and negatives the others.
      batch_size: global batch size.
      context, centre: see :func:`slice_rows`.

    Returns:
      The sampler at round 0.
    """
    cfg = dataclasses.replace(cfg, positive_sources=("nodules",),
                              negative_mix=(("random", 1.0),))
    scans, parts = [], []
    for s, uid in enumerate(uids):
        rec = store.scan(uid)
        if "nodules" not in rec.arrays:
            raise ValueError(f"scan {uid}: the store has no nodule mask for it; prepare the "
                             "store again (store version 2 writes one for every scan)")
        scans.append(scan_info(rec))
        labels = store.read_volume(uid, array="nodules")
        lung = store.read_volume(uid, array="lung") \
            if (context < 0 or centre == "nodule") and "lung" in rec.arrays else None
        mal = {int(k): float(m) for k, m in zip(rec.nodule_mask_label, rec.nodule_malignancy)
               if k > 0 and np.isfinite(m)}
        parts.append(slice_rows(labels, lung, s, int(context), mal, centre))
    pool = np.concatenate(parts) if parts else np.zeros(0, SAMPLE_DTYPE)
    pool["sample_id"] = np.arange(len(pool))
    return Sampler(list(uids), scans, pool, cfg, batch_size)


class RoiSampler(Sampler):
    """A :class:`Sampler` whose pool is nodule ROIs labelled benign (0) / malignant (1).

    ``balance``: every global batch holds exactly ``round(B * positive_fraction)``
    malignant ROIs, both classes cycled (the smaller one repeats); otherwise a round
    is shuffled passes over all ROIs, each benign ROI ``class_repeat[0]`` times and each
    malignant one ``class_repeat[1]`` times per pass. The index is drawn from (seed,
    round) alone.
    """

    def __init__(self, *args, balance: bool = True, class_repeat: Sequence[int] = (1, 1),
                 **kw):
        super().__init__(*args, **kw)
        self.balance = bool(balance)
        self.class_repeat = tuple(int(r) for r in class_repeat)
        if len(self.class_repeat) != 2 or min(self.class_repeat) < 1:
            raise ValueError(f"sampler.roi_class_repeat must be two ints >= 1 (benign, "
                             f"malignant), got {class_repeat}")

    def freeze_index(self, seed: int, round: int | None = None,
                     batch_size: int | None = None) -> SampleIndex:
        """The round's index; ``samples_per_round`` = 0 covers every ROI at least once."""
        cfg = self.cfg
        rnd = self.round if round is None else int(round)
        b = int(batch_size or self.batch_size)
        if not len(self.pool):
            raise ValueError(f"sampler: no nodule with a usable malignancy label in the "
                             f"{len(self.uids)} scans")
        rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, rnd, 1]))
        rows = np.arange(len(self.pool))
        pos, neg = rows[self.pool["label"] > 0], rows[self.pool["label"] <= 0]
        p_b = int(round_half_up(b * cfg.positive_fraction))
        q_b = b - p_b
        n = cfg.samples_per_round
        if self.balance and len(pos) and len(neg) and p_b and q_b:
            if n == 0:
                n = max(-(-len(pos) // p_b), -(-len(neg) // q_b)) * b
            blocks = max(1, n // b)
            grid = np.concatenate([cycle_draw(rng, pos, blocks * p_b).reshape(blocks, p_b),
                                   cycle_draw(rng, neg, blocks * q_b).reshape(blocks, q_b)],
                                  axis=1)
            order = rng.permuted(grid, axis=1).reshape(-1)
        else:
            rows = np.concatenate([np.repeat(neg, self.class_repeat[0]),
                                   np.repeat(pos, self.class_repeat[1])])
            if n == 0:
                n = -(-len(rows) // b) * b
            order = cycle_draw(rng, rows, max(1, n // b) * b)
        samples = self.pool[order].copy()
        samples["weight"] = np.where(samples["label"] > 0, cfg.positive_weight,
                                     cfg.negative_weight)
        index = SampleIndex(samples, self.uids, int(seed), rnd, b)
        self.current_index = index
        return index


def nodule_patients(store, uids: Sequence[str]) -> dict[str, np.ndarray]:
    """The patient each stored nodule of ``uids`` comes from.

    A generated dataset places real LIDC-IDRI nodules, several from one patient and some
    more than once, in its scans: a nodule's patient is the ``lidc_patient_id`` of its
    ``malignancy.csv`` row (matched on the world centre). Elsewhere (real scans, or a
    nodule with no row) the patient is the scan itself.

    Returns:
      uid -> (N,) str, one per stored nodule (``ScanRecord.nodules_world`` order).
    """
    from lungjax.data.prepare import match_centres
    from lungjax.data.synthetic import read_malignancy_csv

    root = (store.manifest or {}).get("source_root", "")
    if root and not os.path.isdir(root):
        # Said, not raised: a store read far from where it was prepared (a cloud run) has
        # no source folder; but each scan its own patient undoes a split by patient.
        print(f"warning: {store.path}: source dataset {root} not found; each scan counts "
              "as its own patient (prepare the store again where the dataset is to read "
              "the nodules' patients from its malignancy.csv)", file=sys.stderr, flush=True)
    path = os.path.join(root, "malignancy.csv") if root else ""
    cols = read_malignancy_csv(path) if path and os.path.isfile(path) else {}
    out = {}
    for uid in uids:
        xyz = np.asarray(store.scan(uid).nodules_world, np.float64).reshape(-1, 3)
        who = np.full(len(xyz), uid, dtype=object)
        if cols and "lidc_patient_id" in cols:
            rows = np.flatnonzero(cols["seriesuid"] == uid)
            txyz = np.stack([cols[k][rows] for k in ("coordX", "coordY", "coordZ")], -1)
            j, hit = match_centres(xyz, txyz)
            who[hit] = cols["lidc_patient_id"][rows[j[hit]]]
        out[uid] = who.astype(str)
    return out


def roi_sampler(store, uids: Sequence[str], cfg: SamplerConfig, batch_size: int, *,
                uncertain: str = "exclude", balance: bool = True,
                class_repeat: Sequence[int] = (1, 1),
                exclude_patients: Sequence[str] = ()) -> RoiSampler:
    """ROIs centred on each annotated nodule with a malignancy label.

    Args:
      store: ``PatchStore``.
      uids: the scans.
      cfg: sampling settings (``positive_fraction`` = share of malignant ROIs per batch
        under ``balance``, ``samples_per_round``, weights).
      batch_size: global batch size.
      uncertain: "exclude", "benign" or "malignant" for median 3 and the ties.
      balance: exact malignant share per batch (else shuffled passes).
      class_repeat: without ``balance``, (benign, malignant) repeats of each ROI per pass.
      exclude_patients: nodules from these patients (:func:`nodule_patients`) are left
        out: a classifier trained on them would meet their patient again when tested on
        the held-out scans.

    Returns:
      The sampler at round 0: rows of kind ``NODULE``, centre = target = the nodule,
      label 1 malignant / 0 benign, malignancy = the median score; its ``left_out``
      counts the labelled ROIs ``exclude_patients`` removed.
    """
    scans, parts = [], []
    left_out = 0
    exclude = set(exclude_patients)
    patients = nodule_patients(store, uids) if exclude else {}
    for s, uid in enumerate(uids):
        info = scan_info(store.scan(uid))
        scans.append(info)
        lab = malignant_label(info.nodule_malignancy, uncertain)
        keep = lab >= 0
        if exclude:
            same = np.isin(patients[uid], list(exclude))
            left_out += int(np.sum(keep & same))
            keep &= ~same
        rows = pool_rows(s, info.nodules_zyx[keep], info.nodules_zyx[keep],
                     info.nodule_radius_mm[keep] * 2, 0, NODULE, info.nodule_malignancy[keep])
        rows["label"] = lab[keep]
        parts.append(rows)
    pool = np.concatenate(parts) if parts else np.zeros(0, SAMPLE_DTYPE)
    pool["sample_id"] = np.arange(len(pool))
    sampler = RoiSampler(list(uids), scans, pool, cfg, batch_size, balance=balance,
                         class_repeat=class_repeat)
    sampler.left_out = left_out
    return sampler


@SAMPLERS.register("balanced_slices")
class SliceTrainData(StoreTrainData):
    """``StoreTrainData`` over :func:`slice_sampler` (config ``sampler.name =
    "balanced_slices"``; reads ``sampler.slice_context``, ``sampler.slice_centre`` and
    the ``Targets`` fields)."""

    eval_kinds = (NODULE, RANDOM_NEG)

    def __init__(self, config, store, train_uids, eval_uids=None, **kw):
        self.slice_context = int(config.sampler.slice_context)
        self.slice_centre = str(config.sampler.slice_centre)
        kw.setdefault("targets", Targets.from_config(config))
        super().__init__(config, store, train_uids, eval_uids, **kw)

    def make_sampler(self, uids, *, random_negatives: bool) -> Sampler:
        del random_negatives  # negatives are slices, not random points
        return slice_sampler(self.store, uids, SamplerConfig.from_config(self.config),
                             _batch_size(self.config), self.slice_context,
                             self.slice_centre)


@SAMPLERS.register("nodule_roi")
class RoiTrainData(StoreTrainData):
    """``StoreTrainData`` over :func:`roi_sampler` (config ``sampler.name =
    "nodule_roi"``; reads ``sampler.roi_balance``, ``sampler.roi_class_repeat``,
    ``data.malignancy_uncertain`` and the ``Targets`` fields)."""

    eval_kinds = (NODULE,)

    def __init__(self, config, store, train_uids, eval_uids=None, **kw):
        self.balance = bool(config.sampler.roi_balance)
        # Split by patient: no training ROI from a patient a held-out nodule comes from.
        self.held_out_patients: set[str] = set()
        if eval_uids is not None and bool(config.sampler.roi_split_by_patient):
            self.held_out_patients = {p for v in nodule_patients(store, eval_uids).values()
                                      for p in v}
        self.class_repeat = tuple(int(r) for r in config.sampler.roi_class_repeat)
        self.uncertain = str(config.data.malignancy_uncertain)
        kw.setdefault("targets", Targets.from_config(config))
        super().__init__(config, store, train_uids, eval_uids, **kw)

    def make_sampler(self, uids, *, random_negatives: bool) -> Sampler:
        # random_negatives: the training pool (the held-out one is built without).
        exclude = self.held_out_patients if random_negatives else set()
        sampler = roi_sampler(self.store, uids, SamplerConfig.from_config(self.config),
                              _batch_size(self.config), uncertain=self.uncertain,
                              balance=self.balance, class_repeat=self.class_repeat,
                              exclude_patients=sorted(exclude))
        if exclude:
            n = sampler.left_out
            print(f"nodule_roi: {n} of {n + len(sampler.pool)} training ROIs left out: their "
                  "patient also gave a held-out nodule (sampler.roi_split_by_patient)",
                  flush=True)
        return sampler
