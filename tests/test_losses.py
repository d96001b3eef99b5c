"""Shared elementwise losses (lungjax.tasks.losses)."""

import jax
import jax.numpy as jnp
import numpy as np

from lungjax.tasks.losses import smooth_l1


def test_smooth_l1_hand_values():
    x = jnp.array([-2.0, -1.0, -0.5, 0.0, 0.5, 0.9, 1.0, 3.0])
    np.testing.assert_allclose(smooth_l1(x),
                               [1.5, 0.5, 0.125, 0.0, 0.125, 0.405, 0.5, 2.5], rtol=1e-6)
    np.testing.assert_allclose(smooth_l1(x, beta=2.0),
                               [1.0, 0.25, 0.0625, 0.0, 0.0625, 0.2025, 0.25, 2.0], rtol=1e-6)
    np.testing.assert_array_equal(smooth_l1(x, beta=0.0), np.abs(x))
    assert smooth_l1(x.astype(jnp.bfloat16)).dtype == jnp.float32


def test_smooth_l1_beta_1_is_bitwise_dou2017_dist():
    # The hybrid loss's dist(a) = 0.5 a^2 (|a| < 1) else |a| - 0.5, written on a rather
    # than |a|: values and gradients agree bit for bit in float32.
    def dist(a):
        return jnp.where(jnp.abs(a) < 1.0, 0.5 * a * a, jnp.abs(a) - 0.5)

    x = jnp.asarray(np.random.default_rng(0).normal(scale=2.0, size=4096), jnp.float32)
    x = jnp.concatenate([x, jnp.array([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-40], jnp.float32)])
    np.testing.assert_array_equal(smooth_l1(x), dist(x))
    np.testing.assert_array_equal(jax.grad(lambda v: smooth_l1(v).sum())(x),
                                  jax.grad(lambda v: dist(v).sum())(x))
