"""Grain pipeline on a real tiny patch store: batch layout, determinism, iterator
state restore, host sharding, unaugmented reads, 2D patches, multiprocess prefetch."""

import numpy as np
import pytest

from lungjax.data import pipeline as pl
from lungjax.data import sampler as smp
from conftest import load_config, run_config  # noqa: E402  (tests/ is on sys.path under pytest)
from test_sampler import make_store  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(str(tmp_path_factory.mktemp("store")))


def config(**data):
    """A run config (lungjax/config_schema.py) with the pipeline's fields set."""
    c = run_config(
        train=dict(batch_size=4),
        data=dict(patch_size_zyx=(6, 10, 10), positive_fraction=0.5, workers=0,
                  prefetch_buffer=2, read_threads=1, prefetch_batches=2, eval_patches=0),
        augment=dict(
            positive=dict(flip_axes=(0, 1, 2), rot90=True, scale_range=(0.9, 1.1),
                          translate_nodule_fraction=1.0),
            negative=dict(flip_axes=(0, 1, 2), rot90=True)),
        sampler=dict(name="balanced", steps_per_round=0, random_negatives_per_scan=4,
                     samples_per_round=16))
    for k, v in data.items():
        c.data[k] = v
    return c


def batches(ds, n=None):
    it = iter(ds)
    out = [b for _, b in zip(range(n), it)] if n else list(it)
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batches_layout_and_ratio(store):
    cfg = config()
    index = smp.Sampler.from_store(store, cfg).freeze_index(seed=0)
    got = batches(pl.build_train_dataset(cfg, store, index, seed=0))
    assert len(got) == index.num_batches == 4
    b = got[0]
    assert pl.describe(b) == {
        "image": ((4, 6, 10, 10, 1), "float32"), "label": ((4,), "int32"),
        "sample_id": ((4,), "int64"), "weight": ((4,), "float32"), "kind": ((4,), "int32"),
        "offset_zyx": ((4, 3), "float32"), "diameter_mm": ((4,), "float32"),
        "position": ((4,), "int64")}
    for g, b in enumerate(got):
        assert b["label"].sum() == 2  # positive_fraction 0.5, exact per batch
        np.testing.assert_array_equal(b["position"], np.arange(4 * g, 4 * g + 4))
        np.testing.assert_array_equal(b["sample_id"], index.samples["sample_id"][4 * g:4 * g + 4])
        assert 0 <= b["image"].min() and b["image"].max() <= 1
        # Positives are translated within the nodule radius (scaled by the zoom);
        # the half-voxel is the geometric centre of even-sized patches.
        pos = b["label"] == 1
        scale = b["diameter_mm"][pos] / index.samples["diameter_mm"][4 * g:4 * g + 4][pos]
        assert np.all((scale >= 0.9 - 1e-6) & (scale <= 1.1 + 1e-6))
        dist = np.linalg.norm(b["offset_zyx"][pos] / scale[:, None], axis=1)
        radius = index.samples["diameter_mm"][4 * g:4 * g + 4][pos] / 2
        assert np.all(dist <= radius + np.sqrt(3) * 1.0 + 1e-4)


def test_same_seed_same_batches_and_restore(store):
    cfg = config()
    s = smp.Sampler.from_store(store, cfg)
    index = s.freeze_index(seed=3)
    ds = pl.build_train_dataset(cfg, store, index, seed=3)
    full = batches(ds)
    assert_same(full, batches(pl.build_train_dataset(cfg, store, s.freeze_index(seed=3), seed=3)))
    other = batches(pl.build_train_dataset(cfg, store, index, seed=4))
    assert not np.array_equal(full[0]["image"], other[0]["image"])  # augmentation reseeded
    # A restored iterator continues identically.
    it = iter(ds)
    next(it), next(it)
    state = it.get_state()
    it2 = iter(pl.build_train_dataset(cfg, store, index, seed=3))
    it2.set_state(state)
    assert_same(list(it2), full[2:])


def test_hosts_concatenate_to_the_global_batch(store):
    cfg = config()
    index = smp.Sampler.from_store(store, cfg).freeze_index(seed=1)
    single = batches(pl.build_train_dataset(cfg, store, index, seed=1))
    hosts = [batches(pl.build_train_dataset(cfg, store, index, seed=1, process_index=h,
                                            process_count=2)) for h in range(2)]
    for g, b in enumerate(single):
        for k in b:
            np.testing.assert_array_equal(
                np.concatenate([hosts[0][g][k], hosts[1][g][k]]), b[k], err_msg=k)


def test_eval_dataset_reads_plain_crops(store):
    cfg = config()
    s = smp.Sampler.from_store(store, cfg)
    index = s.freeze_eval_index(batch_size=4)
    got = batches(pl.build_eval_dataset(cfg, store, index))
    assert len(got) == 3
    b = got[0]
    for i in range(4):
        row = index.samples[i]
        want = store.read_patch(index.uids[row["scan"]], np.rint(row["center_zyx"]).astype(int),
                                (6, 10, 10))
        np.testing.assert_array_equal(b["image"][i, ..., 0], want)
    # Nodule 0 of scan 1.1 sits at (10, 12.4, 14): the crop centre voxel is (10, 12, 14),
    # index (3, 5, 5) of the patch, so the nodule is at (3, 5.4, 5); the geometric
    # centre is (2.5, 4.5, 4.5).
    np.testing.assert_allclose(b["offset_zyx"][0], [0.5, 0.5 + 0.4, 0.5], atol=1e-5)
    np.testing.assert_array_equal(got[-1]["weight"], [1, 0, 0, 0])
    np.testing.assert_array_equal(got[-1]["sample_id"][1:], -1)


def test_2d_patches(store):
    cfg = config(patch_size_zyx=(12, 12))
    index = smp.Sampler.from_store(store, cfg).freeze_index(seed=0)
    b = batches(pl.build_train_dataset(cfg, store, index, seed=0), 1)[0]
    assert b["image"].shape == (4, 12, 12, 1)
    assert np.all(np.abs(b["offset_zyx"][:, 0]) < 0.5)  # never shifted or scaled in z


def test_config_errors():
    with pytest.raises(ValueError, match="patch_size_zyx"):
        pl.PipelineConfig.from_config(config(patch_size_zyx=(4,)))
    with pytest.raises(ValueError, match="data.workers"):
        pl.PipelineConfig.from_config(config(workers=-1))
    bad = config()
    with bad.augment.positive.unlocked():
        bad.augment.positive.flips = True
    with pytest.raises(ValueError, match="config.augment.positive"):
        pl.PipelineConfig.from_config(bad)


def test_repeat_reshuffles_epochs_at_the_same_ratio(store):
    cfg = config()
    index = smp.Sampler.from_store(store, cfg).freeze_index(seed=0)
    one = batches(pl.build_train_dataset(cfg, store, index, seed=0))
    many = batches(pl.build_train_dataset(cfg, store, index, seed=0, repeat=True), 12)
    assert_same(many[:4], one)  # epoch 0 is the frozen order
    for b in many:
        assert b["label"].sum() == 2
    ids = [np.concatenate([b["sample_id"] for b in many[4 * e:4 * e + 4]]) for e in range(3)]
    np.testing.assert_array_equal(np.sort(ids[1]), np.sort(ids[0]))  # same multiset
    assert not np.array_equal(ids[1], ids[0])
    np.testing.assert_array_equal(many[4]["position"], np.arange(16, 20))


def test_store_train_data_rounds_resume_and_mining(store):
    cfg = config()
    cfg.sampler.hard_negative_fraction = 0.5
    cfg.data.eval_patches = 5
    data = pl.StoreTrainData(cfg, store, ["1.1", "1.2"], ["1.3"])
    it = data.iterator(0)
    first = [next(it) for _ in range(6)]  # endless: past one pass of 4 batches
    assert "index" in first[0] and "sample_id" not in first[0]
    state, it_state = data.state_dict(), it.get_state()
    want = [next(it) for _ in range(2)]
    # Resume: a fresh source restores the sampler, rebuilds round 0, continues exactly.
    data.update({"index": first[0]["index"], "loss": np.arange(4.0)})  # after the save
    again = pl.StoreTrainData(cfg, store, ["1.1", "1.2"], ["1.3"])
    again.load_state_dict(state)
    it2 = again.iterator(0)
    it2.set_state(it_state)
    assert_same([next(it2) for _ in range(2)], want)
    # Mining: the highest-loss negatives of round 0 fill half of round 1's negatives.
    neg = np.concatenate([b["index"][b["label"] == 0] for b in first])
    hard = np.unique(neg)[:2]
    data.update({"index": hard, "loss": np.array([9.0, 8.0])})
    r1 = data.iterator(1)
    got = np.concatenate([next(r1)["index"] for _ in range(4)])
    assert data.sampler.current_index.round == 1
    # 4 of round 1's 8 negatives are the 4 highest-loss negatives: both mined ones.
    assert np.isin(hard, got).all()
    # Held-out patches: 1 candidate negative of scan 1.3 (no nodules), padded.
    ev = list(data.eval_batches())
    assert len(ev) == 1 and ev[0]["weight"].tolist() == [1, 0, 0, 0]


def test_multiprocess_prefetch_matches_in_process(store):
    # One small run with worker processes: same batches, and state restores.
    cfg = config(workers=1)
    index = smp.Sampler.from_store(store, cfg).freeze_index(seed=2)
    want = batches(pl.build_train_dataset(config(), store, index, seed=2))
    it = iter(pl.build_train_dataset(cfg, store, index, seed=2))
    try:
        first = next(it)
        state = it.get_state()
        rest = list(it)
    finally:
        it.close()
    assert_same([first] + rest, want)
    it = iter(pl.build_train_dataset(cfg, store, index, seed=2))
    try:
        it.set_state(state)
        assert_same(list(it), want[1:])
    finally:
        it.close()


def test_method_config_is_read(store):
    # The dou2017 tiny variant's data/augment/sampler fields drive the pipeline as is.
    c = load_config("configs/dou2017.py", "tiny")
    cfg = pl.PipelineConfig.from_config(c)
    assert cfg.patch_size_zyx == tuple(c.data.patch_size_zyx)
    assert cfg.batch_size == c.train.batch_size
    assert cfg.augment_positive.translate_nodule_fraction == \
        c.augment.positive.translate_nodule_fraction
    assert smp.SamplerConfig.from_config(c).positive_fraction == c.data.positive_fraction
