"""Engine designs beyond one network: two networks updated alternately with their own
optimizers, a stage initialised from another's params, bfloat16 compute."""

import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lungjax import sharding as shd
from lungjax import train
from lungjax.models.layers import Conv
from lungjax.state import (Network, TrainStates, create_train_state, create_train_states,
                           transfer_params)
from lungjax.steps import apply_gradients, make_alternating_step, model_rngs, rng_streams

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_engine import tiny_config, toy_patches  # noqa: E402


class _Seg(nn.Module):  # 2D: (B, H, W, 1) -> (B, H, W, 1) mask logits
    @nn.compact
    def __call__(self, x, train=False):
        return Conv(1, (3, 3), impl="xla", name="conv")(nn.relu(Conv(4, (3, 3), impl="xla")(x)))


class _Disc(nn.Module):  # (B, H, W, 2) -> (B,) "channel 0 is the reference" logit
    @nn.compact
    def __call__(self, x, train=False):
        h = nn.relu(Conv(4, (3, 3), strides=2, impl="xla")(x))
        return nn.Dense(1)(h.mean(axis=(1, 2)))[:, 0]


def test_alternating_updates_each_network_with_its_own_optimizer():
    seg, disc = _Seg(), _Disc()
    tx_s, tx_d = optax.adam(1e-2), optax.sgd(1e-1)
    key = jax.random.key(0, impl="rbg")
    states = create_train_states([Network("seg", seg, tx_s, jnp.zeros((1, 16, 16, 1))),
                                  Network("disc", disc, tx_d, jnp.zeros((1, 16, 16, 2)))], key)
    # The first network draws what a single-network stage of the same key draws.
    alone = create_train_state(seg, tx_s, jnp.zeros((1, 16, 16, 1)), key)
    jax.tree_util.tree_map(np.testing.assert_array_equal, states["seg"], alone)
    assert np.any(states["disc"].rng != alone.rng)

    def disc_update(states, batch):
        pred = jax.nn.sigmoid(seg.apply({"params": states["seg"].params}, batch["image"]))
        pair = jnp.concatenate([batch["mask"], jax.lax.stop_gradient(pred)], -1)

        def loss(p):
            return optax.sigmoid_binary_cross_entropy(
                disc.apply({"params": p}, pair), jnp.ones(pair.shape[0])).mean()

        l, g = jax.value_and_grad(loss)(states["disc"].params)
        return apply_gradients(states["disc"], tx_d, g), {"loss": l}, {}

    def seg_update(states, batch):
        def loss(p):
            logits = seg.apply({"params": p}, batch["image"])
            pair = jnp.concatenate([batch["mask"], jax.nn.sigmoid(logits)], -1)
            adv = optax.sigmoid_binary_cross_entropy(
                disc.apply({"params": states["disc"].params}, pair), jnp.ones(pair.shape[0]))
            return optax.sigmoid_binary_cross_entropy(logits, batch["mask"]).mean() \
                - 1e-3 * adv.mean()

        l, g = jax.value_and_grad(loss)(states["seg"].params)
        return apply_gradients(states["seg"], tx_s, g), {"loss": l}, {}

    mesh = shd.make_mesh()
    shards = shd.replicate_tree_shardings(states, mesh)
    step = make_alternating_step([("disc", disc_update), ("seg", seg_update)],
                                 state_shardings=shards, mesh=mesh)
    rng = np.random.default_rng(0)
    img = rng.random((8, 16, 16, 1), dtype=np.float32)
    batch = {"image": img, "mask": (img > 0.5).astype(np.float32)}
    before = jax.tree_util.tree_map(np.asarray, states)
    states = jax.device_put(states, shards)
    for _ in range(3):
        states, metrics, _ = step(states, shd.to_global_batch(batch, mesh))
    assert set(metrics) == {"disc/loss", "seg/loss"}
    assert int(states["seg"].step) == 3 and int(states["disc"].step) == 3
    # sgd keeps an empty state, adam its moments: each network has its own optimizer
    assert len(jax.tree_util.tree_leaves(states["disc"].opt_state)) == 0
    assert len(jax.tree_util.tree_leaves(states["seg"].opt_state)) > 0
    for name in ("seg", "disc"):
        changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != b)),
                                         states[name].params, before[name].params)
        assert all(jax.tree_util.tree_leaves(changed))


def test_train_states_single_network_reads_as_its_state():
    key = jax.random.key(0, impl="rbg")
    one = create_train_states([Network("net", _Seg(), optax.sgd(0.1),
                                       jnp.zeros((1, 8, 8, 1)))], key)
    assert isinstance(one, TrainStates) and list(one) == ["net"]
    assert one.params is one["net"].params and one.variables() == one["net"].variables()
    leaves, treedef = jax.tree_util.tree_flatten_with_path(one)
    assert jax.tree_util.keystr(leaves[0][0]).startswith("['net']")
    back = jax.tree_util.tree_unflatten(treedef, [x for _, x in leaves])
    assert isinstance(back, TrainStates) and list(back) == ["net"]
    with pytest.raises(KeyError, match="no network 'other'.*networks: net"):
        one.replace(other=one["net"])


def test_rng_streams_come_from_the_model():
    class Noisy(nn.Module):
        slope_stream: str = "slopes"

        @nn.compact
        def __call__(self, x, train=False):
            return x

    assert rng_streams(_Seg()) == ("dropout",)
    assert rng_streams(Noisy()) == ("dropout", "slopes")
    key = jax.random.key(3, impl="rbg")
    rngs = model_rngs(key, ("dropout", "slopes"))
    assert rngs["dropout"] is key
    np.testing.assert_array_equal(jax.random.key_data(rngs["slopes"]),
                                  jax.random.key_data(jax.random.fold_in(key, 1)))


def test_transfer_params_copies_named_subtrees_and_checks_shapes():
    src = {"conv1": {"conv": {"kernel": np.ones((3, 3, 1, 4)), "bias": np.ones(4)}}}
    dst = {"stem": {"conv1": {"conv": {"kernel": np.zeros((3, 3, 1, 4)), "bias": np.zeros(4)}}},
           "head": {"kernel": np.zeros((4, 2))}}
    out = transfer_params(dst, src, [("conv1", "stem/conv1")])
    assert np.all(out["stem"]["conv1"]["conv"]["kernel"] == 1)
    assert np.all(dst["stem"]["conv1"]["conv"]["kernel"] == 0)  # input untouched
    assert np.all(out["head"]["kernel"] == 0)
    with pytest.raises(KeyError, match="nope"):
        transfer_params(dst, src, [("nope", "stem/conv1")])
    bad = {"conv1": {"conv": {"kernel": np.ones((5, 5, 1, 4)), "bias": np.ones(4)}}}
    with pytest.raises(ValueError, match="shapes"):
        transfer_params(dst, bad, [("conv1", "stem/conv1")])


def test_bfloat16_compute_keeps_float32_params():
    c = tiny_config()
    c.train.compute_dtype = "bfloat16"
    engine = train.build_engine(c)
    images, labels = toy_patches(16)
    batch = shd.to_global_batch({"image": images, "label": labels}, engine.mesh)
    state, metrics, host = engine.train_step(engine.init_state(), batch)
    assert np.isfinite(float(metrics["loss"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state.params))
