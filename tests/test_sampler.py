"""Sampler: pool from a real (tiny) patch store, index determinism and ratio, score
updates, hard-negative mining, state round trip, host sharding."""

import json

import numpy as np
import pytest

from conftest import run_config  # noqa: E402  (tests/ is on sys.path under pytest)
from lungjax.data import sampler as smp
from lungjax.data.coords import Geometry, voxel_to_world
from lungjax.data.store import (STORE_FORMAT, STORE_VERSION, PatchStore, ScanRecord,
                                write_manifest, write_scan_arrays)

SHAPE = (20, 36, 36)


def _record(uid, fold, spacing_xyz, nodules, diam, excluded, excl_d, cands, labels):
    geom = Geometry.identity(spacing=spacing_xyz, origin=(-10.0, 5.0, 100.0))
    world = lambda p: voxel_to_world(np.asarray(p, float).reshape(-1, 3), geom)  # noqa: E731
    return ScanRecord(
        uid=uid, fold=fold, shape_zyx=SHAPE, geometry=geom, arrays=("image", "lung"),
        nodules_zyx=np.asarray(nodules, float).reshape(-1, 3), nodules_world=world(nodules),
        nodule_diameter_mm=np.asarray(diam, float), dropped_world=np.zeros((0, 3)),
        dropped_diameter_mm=np.zeros(0), excluded_zyx=np.asarray(excluded, float).reshape(-1, 3),
        excluded_world=world(excluded), excluded_diameter_mm=np.asarray(excl_d, float),
        candidates_zyx=np.asarray(cands, float).reshape(-1, 3), candidates_world=world(cands),
        candidates_label=np.asarray(labels, np.int64), transforms={})


def make_store(path) -> PatchStore:
    """Three 20x36x36 scans: a lung box, nodules, excluded findings, candidates."""
    recs = [
        _record("1.1", 0, (1, 1, 1), [[10, 12.4, 14], [8, 24, 22]], [6.0, 4.0],
                [[12, 28, 10]], [-1.0],
                [[10, 13, 14], [5, 8, 8], [15, 26, 26], [9, 20, 9]], [1, 0, 0, 0]),
        _record("1.2", 1, (1, 1, 1.5), [[9, 18, 18]], [8.0], [], [],
                [[4, 10, 25], [14, 25, 12]], [0, 0]),
        _record("1.3", 2, (1, 1, 1), [], [], [], [], [[10, 10, 10]], [0]),
    ]
    rng = np.random.default_rng(0)
    for r in recs:
        lung = np.zeros(SHAPE, np.uint8)
        lung[2:18, 4:32, 4:32] = 1
        image = rng.integers(0, 256, SHAPE, dtype=np.uint8)
        write_scan_arrays(path, r.uid, {"image": image, "lung": lung}, chunk=16)
    write_manifest(path, {"format": STORE_FORMAT, "version": STORE_VERSION,
                          "hu_window": [-1200, 600], "spacing_zyx": [1, 1, 1],
                          "scans": {r.uid: r.to_json() for r in recs}})
    return PatchStore.open(path)


def data_config(**sampler):
    """A run config (lungjax/config_schema.py) with train.batch_size, data.* and sampler.*."""
    frac = sampler.pop("positive_fraction", 0.25)
    s = dict(random_negatives_per_scan=8, name="balanced", steps_per_round=0)
    s.update(sampler)
    return run_config(train={"batch_size": 8},
                      data={"patch_size_zyx": (6, 10, 10), "positive_fraction": frac},
                      sampler=s)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(str(tmp_path_factory.mktemp("store")))


def test_pool_from_store(store):
    s = smp.Sampler.from_store(store, data_config(), seed=3)
    assert s.counts() == {"nodule": 3, "candidate_pos": 0, "candidate_neg": 6,
                          "random_neg": 24, "hard_neg": 0}
    np.testing.assert_array_equal(s.pool["sample_id"], np.arange(len(s.pool)))
    assert s.uids == ("1.1", "1.2", "1.3")
    nod = s.pool[s.pool["kind"] == smp.NODULE]
    np.testing.assert_allclose(nod["diameter_mm"], [6, 4, 8])
    np.testing.assert_allclose(nod["center_zyx"][0], [10, 12.4, 14], atol=1e-5)
    # Random negatives: integer lung voxels, beyond radius + margin of every finding.
    rnd = s.pool[s.pool["kind"] == smp.RANDOM_NEG]
    c = rnd["center_zyx"]
    assert np.all(c == np.round(c))
    assert np.all((c[:, 0] >= 2) & (c[:, 0] < 18) & (c[:, 1] >= 4) & (c[:, 1] < 32))
    for r in rnd[rnd["scan"] == 0]:
        assert np.linalg.norm(r["center_zyx"] - [10, 12.4, 14]) >= 3 + 5
        assert np.linalg.norm(r["center_zyx"] - [12, 28, 10]) >= 5 + 5  # excluded, d=-1 -> 10
    # Independent of scan order: the same scan gets the same random points.
    s2 = smp.Sampler.from_store(store, data_config(), uids=["1.3", "1.1"], seed=3)
    a = s.pool[(s.pool["kind"] == smp.RANDOM_NEG) & (s.pool["scan"] == 0)]["center_zyx"]
    b = s2.pool[(s2.pool["kind"] == smp.RANDOM_NEG) & (s2.pool["scan"] == 1)]["center_zyx"]
    np.testing.assert_array_equal(a, b)


def test_candidate_positives_target_nearest_nodule(store):
    s = smp.Sampler.from_store(store, data_config(positive_sources=("candidates",)))
    cp = s.pool[s.pool["kind"] == smp.CANDIDATE_POS]
    assert len(cp) == 1 and cp["label"][0] == 1
    np.testing.assert_allclose(cp["center_zyx"][0], [10, 13, 14])
    np.testing.assert_allclose(cp["target_zyx"][0], [10, 12.4, 14], atol=1e-5)
    assert cp["diameter_mm"][0] == 6.0


def test_freeze_index_deterministic_with_exact_ratio(store):
    s = smp.Sampler.from_store(store, data_config(samples_per_round=50))
    a = s.freeze_index(seed=7)
    b = s.freeze_index(seed=7)
    np.testing.assert_array_equal(a.samples, b.samples)
    assert not a.samples.flags.writeable
    assert len(a) == 48 and a.num_batches == 6  # rounded down to whole batches
    per_batch = a.samples["label"].reshape(6, 8).sum(1)
    np.testing.assert_array_equal(per_batch, 2)  # 8 * 0.25
    # Positives are cycled: each of the 3 appears 4 times in 12 positive slots.
    nodule_ids = s.pool["sample_id"][s.pool["kind"] == smp.NODULE]
    counts = np.bincount(a.samples["sample_id"][a.samples["label"] == 1], minlength=s.next_id)
    np.testing.assert_array_equal(counts[nodule_ids], 4)
    assert not np.array_equal(a.samples, s.freeze_index(seed=7, round=1).samples)
    assert not np.array_equal(a.samples, s.freeze_index(seed=8).samples)
    # The default size covers every positive once.
    s0 = smp.Sampler.from_store(store, data_config(positive_fraction=0.5))
    idx = s0.freeze_index(seed=0)
    assert len(idx) == 8 and idx.samples["label"].sum() == 4


def test_negative_mix_and_weights(store):
    cfg = data_config(samples_per_round=400, negative_mix=(("candidate", 3.0), ("random", 1.0)),
                      negative_weight=0.5, positive_weight=2.0)
    idx = smp.Sampler.from_store(store, cfg).freeze_index(seed=0)
    neg = idx.samples[idx.samples["label"] == 0]
    assert np.sum(neg["kind"] == smp.CANDIDATE_NEG) == 225
    assert np.sum(neg["kind"] == smp.RANDOM_NEG) == 75
    np.testing.assert_array_equal(np.unique(idx.samples["weight"][idx.samples["label"] == 1]), 2)
    np.testing.assert_array_equal(np.unique(neg["weight"]), 0.5)


def test_update_and_top_scoring_negatives(store):
    s = smp.Sampler.from_store(store, data_config(samples_per_round=8, hard_negative_fraction=0.5,
                                                  score_momentum=0.5))
    neg_ids = s.pool["sample_id"][s.pool["label"] == 0]
    scored = neg_ids[[3, 10, 12, 20, 25]]
    # Padding (-1), unknown ids and NaN scores are ignored.
    assert s.update(np.concatenate([scored, [-1, 10**6, neg_ids[0]]]),
                    [0.9, 0.8, 0.1, 0.2, 0.7, 5.0, 5.0, np.nan]) == 5
    assert np.isnan(s.scores[neg_ids[0]])
    # Momentum applies from the second score on.
    s.update(scored[:1], [0.1])
    assert s.scores[scored[0]] == pytest.approx(0.5)
    s.update(scored[:1], [1.3])
    assert s.scores[scored[0]] == pytest.approx(0.9)
    # 6 negatives per round, 3 of them the top-3 scored: 0.9, 0.8, 0.7.
    for seed in range(5):
        neg = s.freeze_index(seed=seed).samples
        neg = neg[neg["label"] == 0]
        assert np.isin(scored[[0, 1, 4]], neg["sample_id"]).all()
    with pytest.raises(ValueError, match="sample ids"):
        s.update([1, 2], [0.1])


def test_add_false_positives(store):
    s = smp.Sampler.from_store(store, data_config())
    n0 = len(s.pool)
    added = s.add_false_positives(
        ["1.1", "1.1", "1.1", "1.1", "1.2", "1.2"],
        [[10, 13, 14],      # inside nodule 0 (radius 3): a hit, not an FP
         [12, 27, 11],      # inside the excluded finding (d=-1 -> radius 5)
         [3, 5, 30],        # FP, merged into the next (higher-scored) one
         [3, 6, 31],        # FP
         [4, 10, 25],       # FP on scan 1.2
         [15, 30, 5]],      # FP
        [0.2, 0.3, 0.4, 0.9, 0.5, 0.6])
    assert added == 3 and len(s.pool) == n0 + 3
    hard = s.pool[s.pool["kind"] == smp.HARD_NEG]
    np.testing.assert_array_equal(hard["sample_id"], [n0, n0 + 1, n0 + 2])
    # Per scan, by decreasing score; the cluster's anchor sits at its best mark.
    np.testing.assert_allclose(s.scores[-3:], [0.9, 0.6, 0.5])
    np.testing.assert_allclose(hard["center_zyx"], [[3, 6, 31], [15, 30, 5], [4, 10, 25]])
    assert np.all(hard["label"] == 0)
    # A later FP near an existing anchor merges into it, raising its score.
    assert s.add_false_positives(["1.2"], [[4, 11, 25]], [0.95]) == 0
    assert s.scores[-1] == pytest.approx(0.95)
    # replace=True: anchors_{i+1} = gt U fp_i (old FP anchors retire, ids never reused).
    assert s.add_false_positives(["1.3"], [[5, 5, 5]], [0.1], replace=True) == 1
    hard = s.pool[s.pool["kind"] == smp.HARD_NEG]
    np.testing.assert_array_equal(hard["sample_id"], [n0 + 3])
    assert s.update([n0, n0 + 3], [1.0, 2.0]) == 1
    idx = s.freeze_index(seed=0)  # hard anchors are drawable negatives
    assert len(idx)
    with pytest.raises(ValueError, match="not in the sampler"):
        s.add_false_positives(["9.9"], [[1, 1, 1]])


def test_state_round_trip_resumes_identically(store):
    cfg = data_config(samples_per_round=40, hard_fraction=0.25)
    s = smp.Sampler.from_store(store, cfg, seed=5)
    s.add_false_positives(["1.1"], [[3, 5, 30]], [0.7])
    s.update(s.pool["sample_id"][:5], np.linspace(0, 1, 5))
    s.next_round()
    idx = s.freeze_index(seed=11)
    s.update(idx.samples["sample_id"][:8], np.arange(8.0))  # mid-round feedback
    state = s.state_dict()
    meta = json.loads(json.dumps(state["meta"]))  # the meta part is JSON
    arrays = {k: (v if isinstance(v, np.ndarray) else {kk: np.array(vv) for kk, vv in v.items()})
              for k, v in state["arrays"].items()}
    for v in arrays.values():
        for leaf in (v.values() if isinstance(v, dict) else [v]):
            assert leaf.dtype.fields is None  # plain numeric arrays for Orbax
    r = smp.Sampler.from_store(store, cfg, seed=5)
    r.load_state_dict({"meta": meta, "arrays": arrays})
    assert r.round == 1 and r.next_id == s.next_id
    np.testing.assert_array_equal(r.current_index.samples, idx.samples)
    np.testing.assert_array_equal(r.pool, s.pool)
    np.testing.assert_array_equal(r.scores, s.scores)
    r.next_round(), s.next_round()
    np.testing.assert_array_equal(r.freeze_index(seed=11).samples,
                                  s.freeze_index(seed=11).samples)
    other = smp.Sampler.from_store(store, cfg, uids=["1.1"])
    with pytest.raises(ValueError, match="other scans"):
        other.load_state_dict(state)


def test_host_view_partitions_global_batches(store):
    idx = smp.Sampler.from_store(store, data_config(samples_per_round=32)).freeze_index(seed=0)
    views = [idx.host_view(h, 4) for h in range(4)]
    for g in range(idx.num_batches):
        glob = np.concatenate([v[0][g * 2:(g + 1) * 2] for v in views])
        np.testing.assert_array_equal(glob, idx.samples[g * 8:(g + 1) * 8])
    np.testing.assert_array_equal(np.sort(np.concatenate([v[1] for v in views])), np.arange(32))
    with pytest.raises(ValueError, match="not divisible"):
        idx.host_view(0, 3)


def test_eval_index_pads_with_zero_weight(store):
    s = smp.Sampler.from_store(store, data_config())
    idx = s.freeze_eval_index(batch_size=4)
    assert len(idx) == 12  # 3 nodules + 6 candidates, padded to 12
    assert np.sum(idx.samples["sample_id"] == -1) == 3
    np.testing.assert_array_equal(idx.samples["weight"][-3:], 0)


def test_config_from_run_config_aliases():
    cfg = smp.SamplerConfig.from_config(run_config(
        data={"positive_fraction": 0.25, "negatives_per_round": 30},
        sampler={"name": "balanced", "hard_negative_fraction": 0.4,
                 "negative_mix": (("candidate", 2.0),)}))
    assert cfg.positive_fraction == 0.25 and cfg.hard_fraction == 0.4
    assert cfg.samples_per_round == 40  # 30 negatives at 3/4 of each batch
    assert cfg.negative_mix == (("candidate", 2.0),)


def test_config_errors(store):
    with pytest.raises(ValueError, match="unknown field"):
        smp.SamplerConfig.from_mapping({"ratio": 3})
    with pytest.raises(ValueError, match="negative_mix"):
        smp.SamplerConfig(negative_mix={"lung": 1.0})
    with pytest.raises(ValueError, match="positive_fraction"):
        smp.SamplerConfig(positive_fraction=1.5)
    s = smp.Sampler.from_store(store, data_config(), uids=["1.3"])
    with pytest.raises(ValueError, match="no positives"):
        s.freeze_index(seed=0)


def test_spread_subset_is_even_deterministic_and_total_when_uncapped():
    from lungjax.data.sampler import spread_subset

    assert spread_subset(36, 8).tolist() == [0, 5, 10, 15, 20, 25, 30, 35]
    assert spread_subset(5, 0).tolist() == [0, 1, 2, 3, 4]
    assert spread_subset(5, 9).tolist() == [0, 1, 2, 3, 4]
    assert spread_subset(10, 1).tolist() == [0]
    with pytest.raises(ValueError, match="k must be >= 0"):
        spread_subset(10, -1)
