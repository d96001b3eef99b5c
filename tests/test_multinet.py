"""Stages with several networks: a toy segmenter and its Turing-test discriminator trained
in alternation in one jitted step sharded over the 8 test devices; per-network logs,
SIGKILL + resume, and picking a network by name (restore_params, init_from, export)."""

import importlib.util
import pathlib
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import config_dict

from conftest import run_until_killed
from lungjax import train
from lungjax.checkpointing import Checkpointer, restore_params
from lungjax.export import export_network, load_predictor
from lungjax.metrics_log import network_rows, read_jsonl
from lungjax.registry import MODELS, STEPS, TASKS
from lungjax.state import step_key
from lungjax.steps import apply_gradients, make_predict_fn, model_rngs, rng_streams
from lungjax.train_data import ArrayTrainData

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent
SIZE = 16  # (H, W) of the toy slices
NUM_STEPS = 6


# ----------------------------------------------------------------------------------
# Toy networks, task and alternating step
# ----------------------------------------------------------------------------------


@MODELS.register("toy_segmenter")
class ToySegmenter(nn.Module):
    """(B, H, W, 1) float32 -> (B, H, W, 1) mask logits; batch norm gives model state."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.Conv(4, (3, 3), name="conv1")(x)
        h = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn1")(h))
        return nn.Conv(1, (1, 1), name="head")(h)


@MODELS.register("toy_discriminator")
class ToyDiscriminator(nn.Module):
    """(B, H, W, 2) float32 mask pairs -> (B,) logit that channel 0 is the ground truth."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.leaky_relu(nn.Conv(4, (3, 3), strides=(2, 2), name="conv1")(x), 0.2)
        return nn.Dense(1, name="out")(jnp.mean(h, axis=(1, 2)))[:, 0]


def _target(batch):
    """(B, H, W) float32 ground-truth mask of the toy: the bright pixels."""
    return (batch["image"] > 0.5).astype(jnp.float32)


@TASKS.register("toy_mask")
class ToyMaskTask:
    """Per-pixel sigmoid cross entropy against ``_target``, averaged per slice."""

    def per_sample_loss(self, outputs, batch):
        return jnp.mean(optax.sigmoid_binary_cross_entropy(outputs[..., 0], _target(batch)),
                        axis=(1, 2))

    def per_sample_metrics(self, outputs, batch):
        return {}

    def host_outputs(self, outputs, batch):
        return {}

    def probabilities(self, outputs):
        return jax.nn.sigmoid(outputs[..., 0])


def _turing_pairs(truth, pred, key):
    """(B, H, W, 2) pairs with the channel order drawn per slice, and (B,) labels: 1 where
    channel 0 holds the ground truth."""
    gt_first = jax.random.bernoulli(key, 0.5, truth.shape[:1])
    a = jnp.where(gt_first[:, None, None], truth, pred)
    b = jnp.where(gt_first[:, None, None], pred, truth)
    return jnp.stack([a, b], axis=-1), gt_first.astype(jnp.float32)


@STEPS.register("toy_turing_test")
def turing_test_step(config, networks, task):
    """Discriminator update, then segmenter update on J_seg - alpha * J_adv."""
    seg, disc = networks["segmenter"], networks["discriminator"]
    alpha = float(config.toy.alpha)
    seg_streams = rng_streams(seg.model)

    def adversarial_loss(disc_params, pred, batch, key):
        pairs, labels = _turing_pairs(_target(batch), pred, key)
        logits = disc.model.apply({"params": disc_params}, pairs, train=True)
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))

    def disc_update(states, batch):
        s, d = states["segmenter"], states["discriminator"]
        x = batch["image"][..., None]
        pred = jax.nn.sigmoid(seg.model.apply(s.variables(), x, train=False)[..., 0])
        loss, g = jax.value_and_grad(adversarial_loss)(d.params, pred, batch, step_key(d))
        return apply_gradients(d, disc.tx, g), {"loss": loss}, {}

    def seg_update(states, batch):
        s, d = states["segmenter"], states["discriminator"]
        x = batch["image"][..., None]

        def loss_fn(params):
            out, ms = seg.model.apply({"params": params, **s.model_state}, x, train=True,
                                      rngs=model_rngs(step_key(s), seg_streams),
                                      mutable=list(s.model_state))
            j_seg = jnp.mean(task.per_sample_loss(out, batch))
            j_adv = adversarial_loss(d.params, jax.nn.sigmoid(out[..., 0]), batch,
                                     step_key(d))
            return j_seg - alpha * j_adv, (j_seg, j_adv, ms)

        (loss, (j_seg, j_adv, ms)), g = jax.value_and_grad(loss_fn, has_aux=True)(s.params)
        return (apply_gradients(s, seg.tx, g, model_state=dict(ms)),
                {"loss": loss, "seg_loss": j_seg, "adv_loss": j_adv}, {"loss": j_seg})

    return [("discriminator", disc_update), ("segmenter", seg_update)]


# ----------------------------------------------------------------------------------
# Config and data
# ----------------------------------------------------------------------------------


def _base_config():
    spec = importlib.util.spec_from_file_location("base_cfg", ROOT / "configs" / "base.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def stage_config(alpha: float = 0.5, **train_overrides):
    c = _base_config()
    c.name = "toy_adversarial"
    c.data.patch_size_zyx = (SIZE, SIZE)
    c.data.spatial_dims = 2
    c.model.name = "toy_segmenter"
    c.task.name = "toy_mask"
    c.optimizer.learning_rate = 1e-2
    c.train.batch_size = 16
    c.train.num_steps = NUM_STEPS
    c.train.log_every = 2
    c.train.checkpoint_every = 2
    c.train.async_checkpoint = False
    c.train.progress_bar = False
    for k, v in train_overrides.items():
        setattr(c.train, k, v)
    c.train.network = "segmenter"
    c.train.step = "toy_turing_test"
    c.networks.discriminator = dict(model=dict(name="toy_discriminator"),
                                    optimizer=dict(name="sgd", learning_rate=0.1),
                                    input_channels=2)
    c.toy = config_dict.ConfigDict(dict(alpha=float(alpha)))
    return c


def stage_data():
    rng = np.random.default_rng(0)
    images = rng.random((48, SIZE, SIZE), dtype=np.float32)
    return ArrayTrainData(images, np.zeros(48, np.int32), batch_size=16, seed=2,
                          steps_per_round=4)


def _tree(x):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(x))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted alpha=0.5 run: (workdir, engine, result)."""
    workdir = tmp_path_factory.mktemp("ref")
    engine = train.build_engine(stage_config())
    result = train.train_and_evaluate(stage_config(), str(workdir), data=stage_data(),
                                      engine=engine)
    return workdir, engine, result


# ----------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------


def test_alternating_stage_is_sharded_and_logs_each_network(reference):
    workdir, engine, result = reference
    states = result["state"]
    assert list(states) == ["segmenter", "discriminator"]
    assert engine.loss_keys == ("segmenter/loss", "discriminator/loss")
    for name in states:
        assert int(states[name].step) == NUM_STEPS  # one update of each per step
        for leaf in jax.tree_util.tree_leaves(states[name].params):
            assert len(leaf.sharding.device_set) == jax.device_count() == 8
    assert "batch_stats" in states["segmenter"].model_state
    with pytest.raises(ValueError, match="pick one by name"):
        states.params  # noqa: B018 -- several networks: no implicit one
    rows = [r for r in read_jsonl(workdir / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in rows] == [2, 4, 6]
    for key in ("segmenter/loss", "segmenter/seg_loss", "segmenter/adv_loss",
                "discriminator/loss"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert "loss" not in rows[0]
    assert set(result["train"]) >= {"segmenter/loss", "discriminator/loss"}
    assert any((workdir / "tb" / "train").iterdir())
    for png in (train.LEARNING_CURVE_PNG, "learning_curve_discriminator.png"):
        assert (workdir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    view = network_rows(rows, "discriminator")
    assert view[0]["loss"] == rows[0]["discriminator/loss"] and "seg_loss" not in view[0]


def test_adversarial_term_reaches_the_segmenter(tmp_path, reference):
    _, _, ref = reference  # alpha = 0.5
    r0 = train.train_and_evaluate(stage_config(alpha=0.0), str(tmp_path), data=stage_data())
    p0, p1 = _tree(r0["state"]["segmenter"].params), _tree(ref["state"]["segmenter"].params)
    diff = max(float(np.max(np.abs(a - b))) for a, b in
               zip(jax.tree_util.tree_leaves(p0), jax.tree_util.tree_leaves(p1)))
    assert diff > 1e-6


KILLED_RUN = textwrap.dedent("""
    import signal, sys
    sys.path.insert(0, {tests!r})
    from test_checkpoint import SignalAt
    from test_multinet import stage_config, stage_data
    from lungjax import train

    train.train_and_evaluate(stage_config(), sys.argv[1],
                             data=SignalAt(stage_data(), 5, signal.SIGKILL))
""")


def test_sigkill_then_resume_is_exact_for_every_network(tmp_path, reference):
    _, engine, ref = reference
    workdir = tmp_path / "run"
    run_until_killed(KILLED_RUN.format(tests=str(TESTS)), workdir)
    steps = Checkpointer(workdir / "checkpoints").all_steps()
    assert steps and max(steps) == 4, steps
    result = train.train_and_evaluate(stage_config(), str(workdir), data=stage_data(),
                                      engine=engine)
    assert result["step"] == NUM_STEPS and not result["preempted"]
    for name in ("segmenter", "discriminator"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, _tree(result["state"][name]),
                               _tree(ref["state"][name]))


def test_restore_init_from_and_export_pick_a_network(tmp_path, reference):
    workdir, engine, ref = reference
    ckdir = workdir / "checkpoints"
    for name in ("segmenter", "discriminator"):
        ck = restore_params(ckdir, network=name)
        assert ck["network"] == name and ck["step"] == NUM_STEPS
        jax.tree_util.tree_map(np.testing.assert_array_equal, ck["params"],
                               _tree(ref["state"][name].params))
    with pytest.raises(ValueError, match="discriminator, segmenter"):
        restore_params(ckdir)
    with pytest.raises(KeyError, match="no network 'generator'"):
        restore_params(ckdir, network="generator")

    # A single-network stage initialised from the adversarial run's segmenter.
    c = stage_config()
    del c.networks["discriminator"]
    c.train.step = "supervised"
    c.train.network = "net"
    c.train.init_from = str(workdir)
    c.train.init_network = "segmenter"
    c.train.init_paths = ("conv1:conv1",)
    state = train.build_engine(c).init_state()
    assert list(state) == ["net"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, _tree(state.params["conv1"]),
                           _tree(ref["state"]["segmenter"].params["conv1"]))

    # Export of the segmenter reproduces its predictions.
    fn = make_predict_fn(engine.model, engine.task, spatial_dims=2)
    sidecar = export_network(str(tmp_path / "export"), str(ckdir), fn, (SIZE, SIZE), {},
                             network="segmenter")
    assert sidecar["network"] == "segmenter" and sidecar["checkpoint_step"] == NUM_STEPS
    predict, _ = load_predictor(str(tmp_path / "export"))
    x = np.random.default_rng(1).random((3, SIZE, SIZE, 1), dtype=np.float32)
    ref_vars = ref["state"]["segmenter"].variables()
    np.testing.assert_allclose(predict(x), np.asarray(jax.jit(fn)(ref_vars, x)),
                               rtol=1e-6, atol=1e-6)
