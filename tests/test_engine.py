"""Engine core: OSF selection, sharded == single-device steps, the loop, NaN stop."""

import importlib.util
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lungjax import sharding as shd
from lungjax import train
from lungjax.checkpointing import Checkpointer
from lungjax.metrics_log import read_jsonl
from lungjax.models.fcn import OFFSET_ZYX, RECEPTIVE_FIELD_ZYX, STRIDE_ZYX, Dou2017FCN, \
    layer_specs, receptive_field
from lungjax.state import param_count
from lungjax.steps import hash_uniform, online_sample_filter
from lungjax.train_data import ArrayTrainData

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(**train_overrides):
    spec = importlib.util.spec_from_file_location("dou2017_cfg", ROOT / "configs" / "dou2017.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("tiny")
    c.model.conv_impl = "xla"  # fastest to compile; the formulations agree (test_layers)
    # A constant learning rate makes the compiled steps independent of num_steps, so
    # tests of different lengths share one engine (see shared_engine).
    c.optimizer.schedule = "constant"
    c.train.async_checkpoint = False
    for k, v in train_overrides.items():
        setattr(c.train, k, v)
    return c


_ENGINES = {}


def shared_engine(config):
    """One compiled engine per distinct model/optimizer/step setting for the session."""
    key = json.dumps([config.model.to_dict(), config.task.to_dict(),
                      config.optimizer.to_dict(), config.train.osf.to_dict(),
                      config.train.batch_size, config.seed, config.rng_impl], sort_keys=True)
    if key not in _ENGINES:
        _ENGINES[key] = train.build_engine(config)
    return _ENGINES[key]


def toy_patches(n=64, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n).astype(np.int32)
    images = rng.random((n, 10, 30, 30), dtype=np.float32) * 0.5
    images[labels == 1, 3:7, 10:20, 10:20] += 0.5  # a bright blob marks positives
    return images, labels


def test_fcn_geometry_and_param_count():
    rf, stride = receptive_field(layer_specs())
    assert rf == RECEPTIVE_FIELD_ZYX and stride == STRIDE_ZYX
    assert OFFSET_ZYX == tuple(r // 2 for r in rf)
    m = Dou2017FCN()
    v = jax.eval_shape(m.init, jax.random.key(0, impl="rbg"), jnp.zeros((1, 10, 30, 30, 1)))
    # conv1 3*5*5*1*64+64, conv2 3*5*5*64*64+64, conv3 3*5*5*64*150+150,
    # conv4 4*5*5*150*150+150, conv5 150*2+2
    expected = (75 * 64 + 64) + (75 * 64 * 64 + 64) + (75 * 64 * 150 + 150) + \
        (100 * 150 * 150 + 150) + (150 * 2 + 2)
    assert param_count(v["params"]) == expected
    out = jax.eval_shape(m.apply, v, jnp.zeros((2, 10, 30, 30, 1)))
    assert out.shape == (2, 1, 1, 1, 2)
    out = jax.eval_shape(m.apply, v, jnp.zeros((1, 19, 40, 50, 1)))
    assert out.shape == (1, 10, 6, 11, 2)  # one cell per stride step


def test_online_sample_filter_keeps_hardest_half_plus_random_half_of_rest():
    losses = jnp.asarray([0.1, 5.0, 0.2, 4.0, 0.3, 3.0, 0.4, 2.0])
    mask = np.asarray(online_sample_filter(losses, jnp.uint32(7)))
    assert mask.sum() == 4 + 2
    assert mask[[1, 3, 5, 7]].tolist() == [1, 1, 1, 1]  # the four highest losses
    assert mask[[0, 2, 4, 6]].sum() == 2
    # a different seed picks (in general) different easy samples, never fewer
    picks = {tuple(np.asarray(online_sample_filter(losses, jnp.uint32(s)))[[0, 2, 4, 6]])
             for s in range(20)}
    assert len(picks) > 1 and all(sum(p) == 2 for p in picks)
    u = np.asarray(hash_uniform(jnp.uint32(3), 10000))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.02


def _run_steps(mesh, n_steps=3, osf=True):
    c = tiny_config()
    c.train.osf.enabled = osf
    engine = train.build_engine(c, mesh)  # its own mesh: not shared
    images, labels = toy_patches(16)
    batch = {"image": images, "label": labels, "index": np.arange(16)}
    state, out = engine.state, []
    for _ in range(n_steps):
        state, metrics, host = engine.train_step(state, shd.to_global_batch(batch, mesh))
        out.append((shd.fetch_to_host(metrics), shd.fetch_to_host(host)))
    return shd.fetch_to_host(state.params), out


def test_sharded_step_equals_single_device_step():
    assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
    p8, out8 = _run_steps(shd.make_mesh())
    p1, out1 = _run_steps(shd.make_mesh(jax.devices()[:1]))
    for (m8, h8), (m1, h1) in zip(out8, out1):
        np.testing.assert_array_equal(h8["selected"], h1["selected"])
        np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(h8["loss"], h1["loss"], rtol=1e-5, atol=1e-6)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p8, p1)


def test_train_loop_logs_checkpoints_and_learns(tmp_path):
    c = tiny_config(num_steps=16, checkpoint_every=8, log_every=8)
    c.sampler.steps_per_round = 8
    c.evals.patches.every_steps = 0
    images, labels = toy_patches(96)
    data = ArrayTrainData(images[:64], labels[:64], batch_size=16, seed=0,
                          steps_per_round=8, val_images=images[64:], val_labels=labels[64:])
    result = train.train_and_evaluate(c, str(tmp_path), data=data, engine=shared_engine(c))
    assert result["step"] == 16 and not result["preempted"]
    logs = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in logs if r["split"] == "train"] == [8, 16]
    evals = [r for r in logs if r["split"] == "eval_patches"]
    assert len(evals) == 1 and evals[0]["auc"] > 0.9  # the blob is easy to learn
    assert sorted(os.listdir(tmp_path / "tb")) == ["eval_patches", "train"]
    assert (tmp_path / "config.json").is_file()
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [8, 16]
    assert data.updates == 16  # every step's host outputs reached the sampler
    assert np.isfinite(data.last_loss).sum() > 0


class _PoisonAfter:
    """Wraps a TrainData; batches after ``good`` steps contain NaN images."""

    def __init__(self, data, good):
        self.data, self.good, self.n = data, good, 0
        self.steps_per_round = data.steps_per_round

    def iterator(self, r):
        self.it = self.data.iterator(r)
        return self

    def __next__(self):
        batch = next(self.it)
        self.n += 1
        if self.n > self.good:
            batch = dict(batch, image=np.full_like(batch["image"], np.nan))
        return batch

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)

    def __getattr__(self, name):
        return getattr(self.data, name)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    c = tiny_config(num_steps=10, checkpoint_every=2, log_every=100)
    c.evals.patches.every_steps = 0
    images, labels = toy_patches(32)
    data = _PoisonAfter(ArrayTrainData(images, labels, batch_size=16), good=5)
    engine = shared_engine(c)
    with pytest.raises(train.NonFiniteLossError, match=r"at step 6\b"):
        train.train_and_evaluate(c, str(tmp_path), data=data, engine=engine)
    ck = Checkpointer(tmp_path / "checkpoints")
    assert ck.latest_step() == 4
    abstract = engine.abstract_state
    step, state, host = ck.restore(abstract)
    assert step == 4 and int(state.step) == 4
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state.params))


def test_classification_log_odds_equal_log_p_over_1_minus_p():
    from lungjax.tasks.classification import ClassificationTask

    logits = jnp.array([[0.3, 2.0, -1.0], [5.0, -3.0, 0.0]], jnp.float32)
    for pos in (0, 1, 2):
        task = ClassificationTask(num_classes=3, positive_class=pos)
        p = np.asarray(task.probabilities(logits), np.float64)
        np.testing.assert_allclose(np.asarray(task.log_odds(logits)), np.log(p / (1 - p)),
                                   rtol=1e-5, atol=1e-5)
    # Past the float32 saturation of the probability the log-odds keep their order.
    task = ClassificationTask(num_classes=2, positive_class=1)
    big = jnp.array([[0.0, 30.0], [0.0, 40.0]], jnp.float32)
    assert float(task.probabilities(big)[0]) == float(task.probabilities(big)[1]) == 1.0
    np.testing.assert_allclose(np.asarray(task.log_odds(big)), [30.0, 40.0])
