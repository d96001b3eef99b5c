"""Host-side patch sampler: the candidate pool, per-sample scores, rounds, and the
frozen sample index each round trains on.

The sampler lives in the training process as plain numpy. Grain workers only ever
see a frozen ``SampleIndex`` (they would hold stale copies of anything mutable):

    sampler = Sampler.from_store(store, config, train_uids, seed=config.seed)
    index = sampler.freeze_index(seed)              # round sampler.round
    ... train on build_train_dataset(config, store, index, seed=seed) ...
    sampler.update(sample_ids, per_sample_loss)     # from the step's host outputs
    sampler.add_false_positives(uids, centers, scores)   # hard-negative mining
    sampler.next_round(); index = sampler.freeze_index(seed)

``freeze_index`` is a pure function of (seed, round, pool + scores); the frozen
index is also part of ``state_dict`` so a run resumed mid-round continues on the
exact index it was using, whatever was updated since.

Pool entries ("anchors"), one row of ``SAMPLE_DTYPE`` each, kinds:
  * ``NODULE``: annotated nodule centres (positives);
  * ``CANDIDATE_POS`` / ``CANDIDATE_NEG``: candidates_V2 points with label 1 / 0;
  * ``RANDOM_NEG``: random points in the lung mask away from any finding;
  * ``HARD_NEG``: false positives added by ``add_false_positives`` (xie2018's
    anchors_{i+1} = S_gt U S_fp(i) with ``replace=True``).
Keeping the top-scoring negatives (dou2017 stage 2) is ``hard_fraction``: that share
of each round's negatives is taken from the negatives with the highest score.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Mapping, Sequence

import numpy as np

from lungjax.configcheck import as_dict, dataclass_from_mapping
from lungjax.data.coords import within_sphere

NODULE, CANDIDATE_POS, CANDIDATE_NEG, RANDOM_NEG, HARD_NEG = range(5)
KIND_NAMES = ("nodule", "candidate_pos", "candidate_neg", "random_neg", "hard_neg")
_NEGATIVE_SOURCES = {"candidate": CANDIDATE_NEG, "random": RANDOM_NEG, "hard": HARD_NEG}
_POSITIVE_SOURCES = {"nodules": NODULE, "candidates": CANDIDATE_POS}
_EXCLUDED_UNKNOWN_DIAMETER_MM = 10.0  # LUNA16's rule for excluded findings with d = -1
STATE_VERSION = 1

def spread_subset(n: int, k: int) -> np.ndarray:
    """(min(k, n),) int64 indices of ``k`` items evenly spread over ``range(n)``, first and
    last included; ``k`` = 0 or ``k`` >= ``n``: all. Deterministic, so every host and a
    resumed run pick the same scans (stage-2 hard negatives, provisional tests)."""
    n, k = int(n), int(k)
    if k < 0:
        raise ValueError(f"spread_subset: k must be >= 0, got {k}")
    if k == 0 or k >= n:
        return np.arange(n, dtype=np.int64)
    return np.unique(np.round(np.linspace(0, n - 1, k)).astype(np.int64))


SAMPLE_DTYPE = np.dtype([
    ("sample_id", np.int64),      # stable id of the pool entry (never reused); -1 = padding
    ("scan", np.int32),           # index into SampleIndex.uids / Sampler.uids
    ("center_zyx", np.float32, (3,)),  # patch centre, voxels of the stored grid
    ("target_zyx", np.float32, (3,)),  # nodule centre for positives, = center otherwise
    ("diameter_mm", np.float32),  # nodule diameter for positives, 0 otherwise
    ("label", np.int32),          # 1 nodule, 0 not
    ("kind", np.int8),            # NODULE .. HARD_NEG
    ("weight", np.float32),       # loss weight (0 for padding rows)
    # Median reader malignancy of the target nodule (1..5); 0 = none (negatives, no score).
    # 0 rather than NaN so that indices compare equal element by element.
    ("malignancy", np.float32),
])


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Sampling settings (read by ``from_config`` from the run config).

    Attributes:
      samples_per_round: patches in one round's index; 0 = enough for every positive
        once at ``positive_fraction``. Rounded down to a multiple of the batch size.
      positive_fraction: share of positives in every global batch (exact per batch).
      positive_sources: "nodules" (annotated centres) and/or "candidates" (label-1
        candidates, centred on the candidate, target = nearest nodule).
      negative_mix: relative weight of each negative source among "candidate",
        "random", "hard"; sources with no entries are skipped.
      hard_fraction: share of negatives taken from the highest-scoring negatives.
      random_negatives_per_scan: lung points drawn once per scan for the pool.
      negative_margin_mm: random negatives keep this distance beyond any nodule or
        excluded finding radius.
      fp_merge_distance_mm: a new false positive this close to a hard anchor of the
        same scan is merged into it.
      score_momentum: scores are ``m * old + (1 - m) * new`` (0 = last value).
      positive_weight / negative_weight: per-sample loss weights.
    """

    samples_per_round: int = 0
    positive_fraction: float = 0.5
    positive_sources: tuple[str, ...] = ("nodules",)
    negative_mix: tuple[tuple[str, float], ...] = (("candidate", 1.0), ("random", 1.0),
                                                   ("hard", 1.0))
    hard_fraction: float = 0.0
    random_negatives_per_scan: int = 64
    negative_margin_mm: float = 5.0
    fp_merge_distance_mm: float = 5.0
    score_momentum: float = 0.0
    positive_weight: float = 1.0
    negative_weight: float = 1.0

    def __post_init__(self):
        mix = self.negative_mix
        mix = tuple(sorted((dict(mix) if not isinstance(mix, dict) else mix).items()))
        for name, w in mix:
            if name not in _NEGATIVE_SOURCES or float(w) < 0:
                raise ValueError(f"sampler.negative_mix: bad entry {name!r}: {w!r}; sources "
                                 f"are {sorted(_NEGATIVE_SOURCES)} with weights >= 0")
        object.__setattr__(self, "negative_mix", tuple((n, float(w)) for n, w in mix))
        src = (self.positive_sources,) if isinstance(self.positive_sources, str) \
            else tuple(self.positive_sources)
        if not src or any(s not in _POSITIVE_SOURCES for s in src):
            raise ValueError(f"sampler.positive_sources must be among "
                             f"{sorted(_POSITIVE_SOURCES)}, got {src}")
        object.__setattr__(self, "positive_sources", src)
        if not 0.0 <= self.positive_fraction <= 1.0:
            raise ValueError(f"sampler.positive_fraction must be in [0, 1], "
                             f"got {self.positive_fraction}")
        if not 0.0 <= self.hard_fraction <= 1.0:
            raise ValueError(f"sampler.hard_fraction must be in [0, 1], got {self.hard_fraction}")
        if not 0.0 <= self.score_momentum < 1.0:
            raise ValueError(f"sampler.score_momentum must be in [0, 1), "
                             f"got {self.score_momentum}")
        if self.samples_per_round < 0 or self.random_negatives_per_scan < 0:
            raise ValueError("sampler.samples_per_round and random_negatives_per_scan "
                             "must be >= 0")

    @classmethod
    def from_config(cls, config) -> "SamplerConfig":
        """From the run config (lungjax/config_schema.py layout).

        Fields of this class are read from ``config.sampler`` under the same names
        (other keys there, e.g. ``name`` or ``steps_per_round``, belong to the
        engine), plus ``config.data.positive_fraction``,
        ``config.sampler.hard_negative_fraction`` (= ``hard_fraction``) and
        ``config.data.negatives_per_round`` (used when ``samples_per_round`` is 0).
        """
        s = section(config, "sampler")
        data = section(config, "data")
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in s.items() if k in known}
        kw["positive_fraction"] = float(data["positive_fraction"])
        kw["hard_fraction"] = float(s["hard_negative_fraction"])
        neg = int(data["negatives_per_round"])
        if not kw["samples_per_round"] and neg > 0:
            frac = kw["positive_fraction"]
            kw["samples_per_round"] = int(np.ceil(neg / max(1e-9, 1.0 - frac)))
        return cls(**kw)

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any] | None) -> "SamplerConfig":
        """From a dict / ConfigDict (this class's field names); unknown fields fail by name."""
        return dataclass_from_mapping(cls, d, "data.sampler")


@dataclasses.dataclass(frozen=True)
class SampleIndex:
    """One round's frozen list of samples, in training order.

    Attributes:
      samples: (N,) ``SAMPLE_DTYPE``, read-only; N is a multiple of ``batch_size``
        and every block of ``batch_size`` rows is one global batch.
      uids: scan uids that ``samples["scan"]`` indexes.
      seed, round: what it was drawn from.
      batch_size: global batch size the blocks were built for.
    """

    samples: np.ndarray
    uids: tuple[str, ...]
    seed: int
    round: int
    batch_size: int

    def __post_init__(self):
        s = np.asarray(self.samples)
        if s.dtype != SAMPLE_DTYPE or s.ndim != 1:
            raise ValueError(f"samples must be a 1-D SAMPLE_DTYPE array, got {s.dtype} {s.shape}")
        if self.batch_size <= 0 or len(s) % self.batch_size:
            raise ValueError(f"index length {len(s)} is not a multiple of batch_size "
                             f"{self.batch_size}")
        s = s.copy()
        s.flags.writeable = False
        object.__setattr__(self, "samples", s)
        object.__setattr__(self, "uids", tuple(self.uids))

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_batches(self) -> int:
        return len(self.samples) // self.batch_size

    def host_view(self, process_index: int = 0, process_count: int = 1
                  ) -> tuple[np.ndarray, np.ndarray]:
        """This host's rows, in order, and their positions in the full index.

        Global batch g is rows ``[g * B, (g + 1) * B)``; host h takes the h-th
        contiguous slice of B / process_count rows of every global batch, so the
        hosts' local batches concatenate (in process order) to the global batch.

        Returns:
          rows: (N / P,) ``SAMPLE_DTYPE``; positions: (N / P,) int64.
        """
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if self.batch_size % process_count:
            raise ValueError(f"global batch size {self.batch_size} is not divisible by "
                             f"process_count {process_count}")
        b = self.batch_size // process_count
        pos = np.arange(len(self.samples), dtype=np.int64).reshape(-1, process_count, b)
        pos = pos[:, process_index].reshape(-1)
        return self.samples[pos], pos


def cycle_draw(rng: np.random.Generator, rows: np.ndarray, n: int) -> np.ndarray:
    """n rows from ``rows``: whole random permutations, then a partial one, so every
    row appears floor(n / len) or ceil(n / len) times."""
    if n == 0:
        return np.zeros(0, np.int64)
    reps = -(-n // len(rows))
    return np.concatenate([rng.permutation(rows) for _ in range(reps)])[:n]


def _split_counts(total: int, weights: np.ndarray) -> np.ndarray:
    """Largest-remainder split of ``total`` by ``weights`` (deterministic)."""
    w = np.asarray(weights, np.float64)
    raw = total * w / w.sum()
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


def _uid_seed(seed: int, uid: str) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(uid.encode())])


@dataclasses.dataclass
class _ScanInfo:
    shape_zyx: tuple[int, int, int]
    spacing_zyx: np.ndarray      # (3,) mm
    nodules_zyx: np.ndarray      # (N, 3)
    nodule_radius_mm: np.ndarray  # (N,)
    excluded_zyx: np.ndarray     # (E, 3)
    excluded_radius_mm: np.ndarray  # (E,)
    nodule_malignancy: np.ndarray | None = None  # (N,) float, NaN or 0 = no score


def scan_info(rec) -> _ScanInfo:
    """What a sampler keeps of a ``ScanRecord``: grid, nodules, excluded findings."""
    exc_d = np.asarray(rec.excluded_diameter_mm, np.float64)
    return _ScanInfo(
        shape_zyx=tuple(int(v) for v in rec.shape_zyx),
        spacing_zyx=np.asarray(rec.spacing_zyx, np.float64),
        nodules_zyx=np.asarray(rec.nodules_zyx, np.float64).reshape(-1, 3),
        nodule_radius_mm=np.asarray(rec.nodule_diameter_mm, np.float64) / 2.0,
        excluded_zyx=np.asarray(rec.excluded_zyx, np.float64).reshape(-1, 3),
        excluded_radius_mm=np.where(exc_d > 0, exc_d, _EXCLUDED_UNKNOWN_DIAMETER_MM) / 2.0,
        nodule_malignancy=np.asarray(rec.nodule_malignancy, np.float64).reshape(-1),
    )


def _within(points_zyx, centres_zyx, radius_mm, spacing_zyx) -> np.ndarray:
    """(P,) bool: voxel point (z, y, x) inside any sphere (centre, radius mm)."""
    p = np.reshape(points_zyx, (-1, 1, 3))
    c = np.reshape(centres_zyx, (1, -1, 3))
    return within_sphere(p, c, np.reshape(radius_mm, (1, -1)), spacing_zyx).any(axis=1)


class Sampler:
    """Candidate pool, per-sample scores and round counter (all plain numpy)."""

    def __init__(self, uids: Sequence[str], scans: Sequence[_ScanInfo], pool: np.ndarray,
                 cfg: SamplerConfig, batch_size: int):
        if len(uids) != len(scans):
            raise ValueError("uids and scans differ in length")
        self.uids = tuple(uids)
        # What the sampler knows of each scan (grid, nodules, excluded findings), in
        # ``uids`` order.
        self.scans = tuple(scans)
        self._uid_to_scan = {u: i for i, u in enumerate(self.uids)}
        self.cfg = cfg
        self.batch_size = int(batch_size)
        if self.batch_size <= 0:
            raise ValueError(f"data.batch_size must be positive, got {batch_size}")
        self.pool = np.asarray(pool, SAMPLE_DTYPE).copy()
        self.scores = np.full(len(self.pool), np.nan, np.float32)
        self.n_seen = np.zeros(len(self.pool), np.int64)
        self.next_id = int(self.pool["sample_id"].max()) + 1 if len(self.pool) else 0
        self.round = 0
        self.current_index: SampleIndex | None = None

    # ------------------------------------------------------------------ building
    @classmethod
    def from_store(cls, store, config, uids: Sequence[str] | None = None, *,
                   seed: int = 0, random_negatives: bool = True) -> "Sampler":
        """Builds the pool from a ``PatchStore`` (nodules, candidates, lung points).

        Args:
          store: ``lungjax.data.store.PatchStore`` (or anything with ``scan(uid)``
            records and ``read_volume(uid, "lung")``).
          config: the run config: ``train.batch_size`` and the fields listed in
            ``SamplerConfig.from_config``.
          uids: training scans (default: all stored scans).
          seed: seeds the random lung points (per scan, independent of scan order).
          random_negatives: draw the random lung points (reads each lung mask once);
            False for held-out scans evaluated on nodules and candidates only.

        Returns:
          A sampler at round 0 with no scores.
        """
        cfg = SamplerConfig.from_config(config)
        uids = list(store.uids() if uids is None else uids)
        if len(set(uids)) != len(uids):
            raise ValueError("from_store: duplicate uids")
        scans, parts, next_id = [], [], 0
        for s, uid in enumerate(uids):
            rec = store.scan(uid)
            info = scan_info(rec)
            scans.append(info)
            rows = _scan_rows(s, info, rec, cfg)
            if (random_negatives and cfg.random_negatives_per_scan
                    and dict(cfg.negative_mix).get("random", 0.0) > 0):  # absent = weight 0
                rng = np.random.default_rng(_uid_seed(seed, uid))
                pts = _random_lung_points(store, rec, info, cfg, rng)
                rows.append(pool_rows(s, pts, pts, 0.0, 0, RANDOM_NEG))
            block = np.concatenate(rows) if rows else np.zeros(0, SAMPLE_DTYPE)
            block["sample_id"] = np.arange(next_id, next_id + len(block))
            next_id += len(block)
            parts.append(block)
        pool = np.concatenate(parts) if parts else np.zeros(0, SAMPLE_DTYPE)
        return cls(uids, scans, pool, cfg, int(config["train"]["batch_size"]))

    # ------------------------------------------------------------------ rounds
    def freeze_index(self, seed: int, round: int | None = None,
                     batch_size: int | None = None) -> SampleIndex:
        """Draws the sample index of a round from the current pool and scores.

        Every global batch of ``batch_size`` rows holds exactly
        ``round(batch_size * positive_fraction)`` positives, in random positions.
        The result depends only on (seed, round, pool, scores, config) and is kept
        as ``current_index`` (and in ``state_dict``).

        Args:
          seed: experiment seed.
          round: round number (default ``self.round``).
          batch_size: global batch size (default ``data.batch_size``).

        Returns:
          The frozen ``SampleIndex``.
        """
        cfg = self.cfg
        rnd = self.round if round is None else int(round)
        b = int(batch_size or self.batch_size)
        rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, rnd, 1]))
        kinds = self.pool["kind"]
        pos_kinds = [_POSITIVE_SOURCES[s] for s in cfg.positive_sources]
        pos_rows = np.flatnonzero(np.isin(kinds, pos_kinds))
        p_b = int(round_half_up(b * cfg.positive_fraction))
        q_b = b - p_b
        if p_b and not len(pos_rows):
            raise ValueError(f"sampler: no positives from {cfg.positive_sources} in the "
                             f"{len(self.uids)} training scans; positive_fraction must be 0")
        n = cfg.samples_per_round
        if n == 0:
            n = -(-len(pos_rows) // p_b) * b if p_b else b
        blocks = max(1, n // b)
        pos = cycle_draw(rng, pos_rows, blocks * p_b)
        neg = self._draw_negatives(rng, blocks * q_b)
        grid = np.concatenate([pos.reshape(blocks, p_b), neg.reshape(blocks, q_b)], axis=1)
        grid = rng.permuted(grid, axis=1)
        samples = self.pool[grid.reshape(-1)].copy()
        samples["weight"] = np.where(samples["label"] > 0, cfg.positive_weight,
                                     cfg.negative_weight)
        index = SampleIndex(samples, self.uids, int(seed), rnd, b)
        self.current_index = index
        return index

    def _draw_negatives(self, rng: np.random.Generator, n: int) -> np.ndarray:
        cfg = self.cfg
        if n == 0:
            return np.zeros(0, np.int64)
        neg_rows = np.flatnonzero(self.pool["label"] == 0)
        if not len(neg_rows):
            raise ValueError("sampler: the pool has no negatives; set positive_fraction to 1 "
                             "or enable a negative source")
        picks = []
        n_top = int(round_half_up(cfg.hard_fraction * n))
        scored = neg_rows[np.isfinite(self.scores[neg_rows])]
        if n_top and len(scored):
            # Highest score first; ties by sample id, so the order is reproducible.
            order = np.lexsort((self.pool["sample_id"][scored], -self.scores[scored]))
            top = scored[order[:n_top]]
            picks.append(cycle_draw(rng, top, n_top))
        else:
            n_top = 0
        rest = n - n_top
        sources = [(name, w, neg_rows[self.pool["kind"][neg_rows] == _NEGATIVE_SOURCES[name]])
                   for name, w in cfg.negative_mix]
        sources = [(name, w, rows) for name, w, rows in sources if w > 0 and len(rows)]
        if rest and not sources:
            raise ValueError(f"sampler: no negatives from the sources of negative_mix "
                             f"{dict(cfg.negative_mix)}")
        if rest:
            counts = _split_counts(rest, np.array([w for _, w, _ in sources]))
            for (_, _, rows), c in zip(sources, counts):
                picks.append(cycle_draw(rng, rows, int(c)))
        return rng.permutation(np.concatenate(picks))

    def next_round(self) -> int:
        """Advances the round counter; returns the new round."""
        self.round += 1
        return self.round

    def freeze_eval_index(self, batch_size: int | None = None,
                          kinds: Sequence[int] = (NODULE, CANDIDATE_NEG), *,
                          max_samples: int | None = None, seed: int = 0) -> SampleIndex:
        """Pool entries of ``kinds`` once each, for patch-level evaluation.

        With ``max_samples``, every positive is kept (up to the limit) and the rest
        are negatives chosen with ``seed``. Rows stay in pool order and are padded to
        whole batches with weight-0 rows whose sample_id is -1, so every host runs
        the same number of steps.
        """
        b = int(batch_size or self.batch_size)
        sel = np.flatnonzero(np.isin(self.pool["kind"], list(kinds)))
        if max_samples is not None and len(sel) > max_samples:
            pos = sel[self.pool["label"][sel] > 0][:max_samples]
            neg = sel[self.pool["label"][sel] <= 0]
            rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 3]))
            neg = rng.choice(neg, size=max_samples - len(pos), replace=False)
            sel = np.sort(np.concatenate([pos, neg]))
        if not len(sel):
            raise ValueError(f"freeze_eval_index: no pool entries of kinds "
                             f"{[KIND_NAMES[k] for k in kinds]}")
        rows = self.pool[sel].copy()
        rows["weight"] = 1.0
        pad = (-len(rows)) % b
        if pad:
            filler = np.repeat(rows[:1], pad)
            filler["sample_id"], filler["weight"] = -1, 0.0
            rows = np.concatenate([rows, filler])
        return SampleIndex(rows, self.uids, -1, self.round, b)

    # ------------------------------------------------------------------ feedback
    def update(self, sample_ids: np.ndarray, scores: np.ndarray) -> int:
        """Records per-sample scores (e.g. loss or predicted nodule probability).

        Args:
          sample_ids: (B,) int; -1 (padding) and ids no longer in the pool are ignored.
          scores: (B,) float; non-finite values are ignored.

        Returns:
          The number of pool entries updated.
        """
        ids = np.asarray(sample_ids, np.int64).reshape(-1)
        sc = np.asarray(scores, np.float64).reshape(-1)
        if ids.shape != sc.shape:
            raise ValueError(f"update: {ids.shape[0]} sample ids but {sc.shape[0]} scores")
        pool_ids = self.pool["sample_id"]  # ascending: ids are appended in order
        where = np.searchsorted(pool_ids, ids)
        ok = (ids >= 0) & (where < len(pool_ids)) & np.isfinite(sc)
        ok[ok] &= pool_ids[where[ok]] == ids[ok]
        rows, new = where[ok], sc[ok]
        m = self.cfg.score_momentum
        # Repeated ids in one call apply in order (a loop keeps that exact).
        for r, v in zip(rows, new):
            old = self.scores[r]
            self.scores[r] = v if (m == 0 or not np.isfinite(old)) else m * old + (1 - m) * v
            self.n_seen[r] += 1
        return int(len(rows))

    def add_false_positives(self, uids: Sequence[str], centers_zyx: np.ndarray,
                            scores: np.ndarray | None = None, *, replace: bool = False) -> int:
        """Adds detections that hit no finding as hard-negative anchors.

        Marks inside a nodule's radius (hits) or an excluded finding's radius
        (neither hit nor FP under LUNA16 rules) are skipped. Marks are taken by
        decreasing score; one within ``fp_merge_distance_mm`` of a hard anchor of the
        same scan is merged into it (an existing anchor keeps the larger score).

        Args:
          uids: (K,) scan uid of each mark; every uid must be a training scan.
          centers_zyx: (K, 3) float voxel centres in the stored grid.
          scores: (K,) float detection scores, kept as the anchors' scores (so
            ``hard_fraction`` ranks them); default NaN (unscored).
          replace: drop all previous hard anchors first (anchors_{i+1} = gt U fp_i).

        Returns:
          The number of anchors added.
        """
        uids = list(uids)
        pts = np.asarray(centers_zyx, np.float64).reshape(-1, 3)
        sc = np.full(len(pts), np.nan) if scores is None else \
            np.asarray(scores, np.float64).reshape(-1)
        if not (len(uids) == len(pts) == len(sc)):
            raise ValueError(f"add_false_positives: {len(uids)} uids, {len(pts)} centres, "
                             f"{len(sc)} scores")
        unknown = sorted({u for u in uids if u not in self._uid_to_scan})
        if unknown:
            raise ValueError(f"add_false_positives: uids not in the sampler: {unknown[:3]}")
        if replace:
            keep = self.pool["kind"] != HARD_NEG
            self.pool, self.scores, self.n_seen = (self.pool[keep], self.scores[keep],
                                                   self.n_seen[keep])
        scan_of = np.array([self._uid_to_scan[u] for u in uids], np.int64)
        added = []
        for s in np.unique(scan_of):
            info = self.scans[s]
            sel = np.flatnonzero(scan_of == s)
            p, ps = pts[sel], sc[sel]
            bad = (_within(p, info.nodules_zyx, info.nodule_radius_mm, info.spacing_zyx)
                   | _within(p, info.excluded_zyx, info.excluded_radius_mm, info.spacing_zyx))
            old = np.flatnonzero((self.pool["kind"] == HARD_NEG) & (self.pool["scan"] == s))
            anchors = list(self.pool["center_zyx"][old].astype(np.float64))
            # Greedy by score (NaN last): a cluster's best-scored mark becomes its anchor.
            for i in np.argsort(-np.nan_to_num(ps, nan=-np.inf), kind="stable"):
                if bad[i]:
                    continue
                if anchors:
                    d = np.linalg.norm((np.asarray(anchors) - p[i]) * info.spacing_zyx, axis=1)
                    j = int(np.argmin(d))
                    if d[j] < self.cfg.fp_merge_distance_mm:
                        if j < len(old):
                            self.scores[old[j]] = np.fmax(self.scores[old[j]], ps[i])
                        continue
                added.append((s, p[i], ps[i]))
                anchors.append(p[i])
        if added:
            scan_ids = np.array([a[0] for a in added], np.int32)
            c = np.array([a[1] for a in added])
            rows = pool_rows(scan_ids, c, c, 0.0, 0, HARD_NEG)
            rows["sample_id"] = np.arange(self.next_id, self.next_id + len(rows))
            self.next_id += len(rows)
            self.pool = np.concatenate([self.pool, rows])
            self.scores = np.concatenate([self.scores,
                                          np.array([a[2] for a in added], np.float32)])
            self.n_seen = np.concatenate([self.n_seen, np.zeros(len(rows), np.int64)])
        return len(added)

    def counts(self) -> dict[str, int]:
        """Pool size per kind name."""
        return {name: int(np.sum(self.pool["kind"] == k)) for k, name in enumerate(KIND_NAMES)}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Checkpointable state: ``{"arrays": {...}, "meta": {...}}``.

        ``arrays`` is a nested dict of plain numeric numpy arrays (pool columns,
        scores, seen counts, the current index's columns); ``meta`` holds only ints
        and None (round, next id, a digest of the scan uids, the current index's
        seed/round/batch size), so the whole state is an Orbax-friendly pytree and
        ``meta`` is also valid JSON.
        """
        def columns(a):
            return {f: np.array(a[f]) for f in SAMPLE_DTYPE.names}

        idx = self.current_index
        return {
            "arrays": {
                "pool": columns(self.pool),
                "scores": self.scores.copy(),
                "n_seen": self.n_seen.copy(),
                **({} if idx is None else {"index": columns(idx.samples)}),
            },
            "meta": {
                "version": STATE_VERSION, "round": int(self.round), "next_id": int(self.next_id),
                "n_scans": len(self.uids), "uids_digest": uids_digest(self.uids),
                "batch_size": self.batch_size,
                "index": None if idx is None else {
                    "seed": idx.seed, "round": idx.round, "batch_size": idx.batch_size},
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores ``state_dict()`` output (the pool is replaced, not merged).

        Raises:
          ValueError: naming the mismatch when the state belongs to other scans or
            another state version.
        """
        meta, arrays = state["meta"], state["arrays"]
        if meta.get("version") != STATE_VERSION:
            raise ValueError(f"sampler state version {meta.get('version')} is not "
                             f"{STATE_VERSION}")
        if int(meta["uids_digest"]) != uids_digest(self.uids):
            raise ValueError(f"sampler state is for {int(meta['n_scans'])} other scans than "
                             f"this sampler's {len(self.uids)}; same training split expected")

        def rebuild(cols):
            n = len(np.asarray(cols["sample_id"]))
            out = np.zeros(n, SAMPLE_DTYPE)
            for f in SAMPLE_DTYPE.names:
                # States saved before rows carried malignancy restore it as 0 (none).
                if f in cols or f != "malignancy":
                    out[f] = np.asarray(cols[f])
            return out

        self.pool = rebuild(arrays["pool"])
        self.scores = np.asarray(arrays["scores"], np.float32).copy()
        self.n_seen = np.asarray(arrays["n_seen"], np.int64).copy()
        if not (len(self.pool) == len(self.scores) == len(self.n_seen)):
            raise ValueError("sampler state: pool, scores and n_seen differ in length")
        self.round = int(meta["round"])
        self.next_id = int(meta["next_id"])
        im = meta.get("index")
        self.current_index = None if im is None else SampleIndex(
            rebuild(arrays["index"]), self.uids, int(im["seed"]), int(im["round"]),
            int(im["batch_size"]))


# ---------------------------------------------------------------------- helpers


def uids_digest(uids: Sequence[str]) -> int:
    """CRC32 of the ordered uid list: identifies the training split in a checkpoint."""
    return zlib.crc32("\n".join(uids).encode())


UNCERTAIN_CHOICES = ("exclude", "benign", "malignant")


def malignant_label(malignancy, uncertain: str = "exclude") -> np.ndarray:
    """Binary malignancy label of median reader scores (yu2021's rule).

    Args:
      malignancy: float scores (any shape); NaN = no score.
      uncertain: what median 3 and the ties 2.5 / 3.5 become: "exclude" (-1),
        "benign" (0) or "malignant" (1).

    Returns:
      int32 array (scalar for a scalar input): 0 benign (<= 2), 1 malignant (>= 4),
      -1 excluded (uncertain under "exclude", or no score: NaN or 0).
    """
    if uncertain not in UNCERTAIN_CHOICES:
        raise ValueError(f"uncertain must be one of {UNCERTAIN_CHOICES}, got {uncertain!r}")
    m = np.asarray(malignancy, np.float64)
    mid = {"exclude": -1, "benign": 0, "malignant": 1}[uncertain]
    out = np.where(m <= 2.0, 0, np.where(m >= 4.0, 1, mid))
    return np.where(np.isnan(m) | (m <= 0), -1, out).astype(np.int32)


def round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def section(config, name: str) -> dict:
    """``config.<name>`` as a plain dict; config is a ConfigDict or dict."""
    return as_dict(config[name])


def pool_rows(scan, centers, targets, diameter, label, kind, malignancy=0.0) -> np.ndarray:
    """(K,) ``SAMPLE_DTYPE`` rows (sample_id 0, weight 1) from (K, 3) voxel centres and
    targets; the other arguments are scalars or (K,) columns (malignancy NaN -> 0)."""
    c = np.asarray(centers, np.float64).reshape(-1, 3)
    out = np.zeros(len(c), SAMPLE_DTYPE)
    out["scan"] = scan
    out["center_zyx"] = c
    out["target_zyx"] = np.asarray(targets, np.float64).reshape(-1, 3)
    out["diameter_mm"] = diameter
    out["label"] = label
    out["kind"] = kind
    out["weight"] = 1.0
    out["malignancy"] = np.nan_to_num(np.asarray(malignancy, np.float64), nan=0.0)
    return out


def _scan_rows(s: int, info: _ScanInfo, rec, cfg: SamplerConfig) -> list[np.ndarray]:
    rows = []
    nod = info.nodules_zyx
    mal = info.nodule_malignancy if info.nodule_malignancy is not None \
        else np.full(len(nod), np.nan)
    if "nodules" in cfg.positive_sources and len(nod):
        rows.append(pool_rows(s, nod, nod, info.nodule_radius_mm * 2, 1, NODULE, mal))
    cand = np.asarray(rec.candidates_zyx, np.float64).reshape(-1, 3)
    lab = np.asarray(rec.candidates_label).reshape(-1)
    if "candidates" in cfg.positive_sources and np.any(lab > 0):
        cp = cand[lab > 0]
        if len(nod):
            d = np.linalg.norm((cp[:, None] - nod[None]) * info.spacing_zyx, axis=-1)
            j = np.argmin(d, axis=1)
            rows.append(pool_rows(s, cp, nod[j], info.nodule_radius_mm[j] * 2, 1, CANDIDATE_POS,
                              mal[j]))
        else:  # label-1 candidate whose nodule lies outside the stored volume
            rows.append(pool_rows(s, cp, cp, 0.0, 1, CANDIDATE_POS))
    if np.any(lab == 0):
        rows.append(pool_rows(s, cand[lab == 0], cand[lab == 0], 0.0, 0, CANDIDATE_NEG))
    return rows


def _random_lung_points(store, rec, info: _ScanInfo, cfg: SamplerConfig,
                        rng: np.random.Generator) -> np.ndarray:
    """Integer voxel points inside the lung mask (whole volume if there is none),
    at least margin beyond every nodule and excluded finding."""
    n = cfg.random_negatives_per_scan
    if "lung" in tuple(getattr(rec, "arrays", ("lung",))):
        flat = np.flatnonzero(store.read_volume(rec.uid, array="lung").reshape(-1) > 0.5)
    else:
        flat = np.arange(int(np.prod(info.shape_zyx)))
    if not len(flat):
        return np.zeros((0, 3))
    # Oversample, then drop points near findings; a few tries cover dense scans.
    keep = np.zeros((0, 3))
    for _ in range(4):
        pick = rng.choice(flat, size=min(len(flat), 2 * n), replace=len(flat) < 2 * n)
        pts = np.stack(np.unravel_index(pick, info.shape_zyx), -1).astype(np.float64)
        near = (_within(pts, info.nodules_zyx, info.nodule_radius_mm + cfg.negative_margin_mm,
                        info.spacing_zyx)
                | _within(pts, info.excluded_zyx,
                          info.excluded_radius_mm + cfg.negative_margin_mm, info.spacing_zyx))
        keep = np.concatenate([keep, pts[~near]])
        if len(keep) >= n:
            break
    return keep[:n]
