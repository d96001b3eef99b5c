"""Elementwise losses shared by the tasks."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["smooth_l1"]


def smooth_l1(x, beta: float = 1.0) -> jax.Array:
    """Elementwise smooth L1 (Huber with slope 1), computed in float32.

    0.5 x^2 / beta where |x| < beta, else |x| - 0.5 beta; with beta = 1 this is Faster
    R-CNN's smooth L1 and dou2017's dist(a). beta <= 0 gives |x|.

    Args:
      x: any shape, any float dtype (cast to float32), e.g. prediction - target.
      beta: the transition point, a Python float (it picks the formula at trace time).

    Returns:
      float32, the shape of ``x``.
    """
    a = jnp.abs(jnp.asarray(x, jnp.float32))
    if beta <= 0:
        return a
    return jnp.where(a < beta, 0.5 * a * a / beta, a - 0.5 * beta)
