"""Plateau learning-rate schedule: decays after `patience` flat evaluations, not while the
loss improves, stops at min_scale; the jitted sharded step logs it and a checkpoint carries
it through a resume; config errors name the field."""

import functools
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lungjax import sharding as shd
from lungjax.config_schema import get_config
from lungjax.checkpointing import Checkpointer
from lungjax.state import TrainState, create_train_state, make_optimizer, plateau_scale
from lungjax.steps import apply_gradients, make_train_step
from lungjax.tasks.classification import ClassificationTask

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_engine import toy_patches  # noqa: E402



def _optimizer(**overrides):
    """The schema's optimizer section, plain SGD with lr 1 (updates = -scale * grad)."""
    c = get_config().optimizer
    c.update(dict(name="sgd", momentum=0.0, learning_rate=1.0, schedule="plateau",
                  plateau_accumulation_steps=1, plateau_patience=2, plateau_min_scale=1e-3))
    c.update(overrides)
    return make_optimizer(c, num_steps=100)


def _scales(tx, values):
    """The plateau scale after each update fed ``values``; checks updates = -scale * grad."""
    params = {"w": jnp.ones((3,), jnp.float32)}
    grads = {"w": jnp.full((3,), 2.0, jnp.float32)}
    update = jax.jit(tx.update)
    state, out = tx.init(params), []
    for v in values:
        updates, state = update(grads, state, params, value=jnp.float32(v))
        scale = float(plateau_scale(state))
        np.testing.assert_allclose(updates["w"], -2.0 * scale, rtol=1e-6)
        out.append(scale)
    return np.array(out)


def test_scale_holds_while_loss_improves_and_drops_after_patience_flat_evaluations():
    improving = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    np.testing.assert_array_equal(_scales(_optimizer(), improving), 1.0)
    # After the improvements, two flat evaluations (patience 2) give one decay by 0.1,
    # two more another, down to min_scale 1e-3, where it stays.
    got = _scales(_optimizer(), improving + [0.5] * 10)
    expect = [1.0] * 6 + [1.0, 0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3]
    np.testing.assert_allclose(got, expect, rtol=1e-5)
    # A new improvement resets the count: the drop comes two flat evaluations after it.
    got = _scales(_optimizer(), [1.0, 1.0, 0.5, 0.5, 0.5])
    np.testing.assert_allclose(got, [1.0, 1.0, 1.0, 1.0, 0.1], rtol=1e-5)


def test_accumulation_averages_steps_and_cooldown_waits():
    # Noisy per-step losses whose 3-step means are flat at 1.0: one comparison per 3 steps.
    noisy = [0.5, 1.5, 1.0] * 6
    got = _scales(_optimizer(plateau_accumulation_steps=3, plateau_patience=1), noisy)
    # Comparison 1 (step 3) sets the best; 2 (step 6) is flat -> decay; 3 (step 9) -> ...
    expect = [1.0] * 5 + [0.1] * 3 + [0.01] * 3 + [1e-3] * 7
    np.testing.assert_allclose(got, expect, rtol=1e-5)
    # Cooldown 2: after a decay, two evaluations are not counted.
    got = _scales(_optimizer(plateau_patience=1, plateau_cooldown=2), [1.0] * 8)
    np.testing.assert_allclose(got, [1.0, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 1e-3], rtol=1e-5)


def test_other_optimizers_ignore_the_loss_value():
    tx = optax.adam(1e-2)  # not built for extra args
    params = {"w": jnp.ones((2,))}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state={},
                       opt_state=tx.init(params), rng=jnp.zeros((4,), jnp.uint32))
    grads = {"w": jnp.ones((2,))}
    a = apply_gradients(state, tx, grads, value=jnp.float32(3.0))
    b = apply_gradients(state, tx, grads)
    np.testing.assert_array_equal(a.params["w"], b.params["w"])
    assert plateau_scale(a.opt_state) is None


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"config\.optimizer\.schedule.*'platau'"):
        _optimizer(schedule="platau")
    with pytest.raises(ValueError, match=r"config\.optimizer\.plateau_patience"):
        _optimizer(plateau_patience=0)
    with pytest.raises(ValueError, match=r"config\.optimizer\.decay_factor"):
        _optimizer(decay_factor=1.5)
    with pytest.raises(ValueError, match=r"plateau_rtol / plateau_atol"):
        _optimizer(plateau_rtol=0.0, plateau_atol=0.0)


# ---------------------------------------------------------------------------------
# The jitted sharded train step with a plateau schedule; a checkpoint carries the scale.
# ---------------------------------------------------------------------------------


class _Linear(nn.Module):
    """Logits from flattened voxels: a step that compiles in well under a second."""

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(2)(x.reshape(x.shape[0], -1))


def test_sharded_step_carries_plateau_scale_through_checkpoint_resume(tmp_path):
    assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
    # atol larger than any loss change: only the first evaluation (best = inf) improves,
    # so with patience 2 the scale drops every 2 steps: 1, 1, 0.1, 0.1, 0.01, 0.01.
    tx = _optimizer(learning_rate=0.1, plateau_atol=10.0, plateau_min_scale=1e-4)
    model, mesh = _Linear(), shd.make_mesh()
    init_fn = functools.partial(create_train_state, model, tx, jnp.zeros((1, 2, 3, 3, 1)))
    init, shardings, abstract = shd.make_sharded_init(init_fn, jax.random.key(0, impl="rbg"),
                                                      mesh)
    step = make_train_step(model, ClassificationTask(), tx, state_shardings=shardings,
                           mesh=mesh)
    images, labels = toy_patches(8)
    batch = shd.to_global_batch({"image": images[:, :2, :3, :3],
                                 "label": labels}, mesh)

    def run(state, n):
        scales = []
        for _ in range(n):
            state, metrics, _ = step(state, batch)
            scales.append(float(metrics["lr_scale"]))
        return state, scales

    state, first = run(init(jax.random.key(0, impl="rbg")), 3)
    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
    ckpt.save(3, state)
    ref, rest = run(state, 3)
    np.testing.assert_allclose(first + rest, [1.0, 1.0, 0.1, 0.1, 0.01, 0.01], rtol=1e-5)

    # Resume from step 3 (scale 0.1, one flat evaluation counted): had the plateau state
    # restarted, step 4 would log scale 1.
    _, restored, _ = ckpt.restore(abstract)
    ckpt.close()
    resumed, rest2 = run(restored, 3)
    assert rest2 == rest
    jax.tree_util.tree_map(np.testing.assert_array_equal,
                           jax.device_get((resumed.opt_state, resumed.params)),
                           jax.device_get((ref.opt_state, ref.params)))
