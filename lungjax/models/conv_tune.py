"""Timing of one convolution shape in each formulation (forward + backward), for the
per-shape choice of ``impl="auto"`` on CPU (see ``conv_select``)."""

from __future__ import annotations

import statistics
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lungjax.models import conv_ops


def _loss_fn(key, impl: str):
    """Scalar function of (x, w) whose gradient runs the layer's full backward."""
    def f(x, w, g):
        if key.kind == "conv":
            y = conv_ops.conv(x, w, strides=key.strides, pads=key.pads, dilation=key.dilation,
                              impl=impl)
        else:
            y = conv_ops.conv_transpose(x, w, strides=key.strides, pads=key.pads,
                                        dilation=key.dilation, impl=impl)
        return jnp.vdot(y.astype(jnp.float32), g)
    return f


def time_key(key, impls: Sequence[str], reps: int = 5, warmup: int = 0) -> dict[str, float]:
    """Median milliseconds of forward + input- and weight-gradient of ``key`` per impl.

    Args:
      key: a ``conv_select.ConvKey``.
      impls: formulations to time.
      reps: timed repetitions after ``warmup`` (compile excluded).

    Returns:
      {impl: median ms}.
    """
    dtype = jnp.dtype(key.dtype)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((key.batch, *key.spatial, key.cin)), dtype)
    w = jnp.asarray(rng.standard_normal((*key.kernel, key.cin, key.cout)) * 0.1, dtype)
    y_shape = jax.eval_shape(
        lambda a, b: (conv_ops.conv if key.kind == "conv" else conv_ops.conv_transpose)(
            a, b, strides=key.strides, pads=key.pads, dilation=key.dilation, impl="xla"), x, w)
    g = jnp.asarray(rng.standard_normal(y_shape.shape), jnp.float32)
    out = {}
    for impl in impls:
        step = jax.jit(jax.grad(_loss_fn(key, impl), argnums=(0, 1)))
        step = step.lower(x, w, g).compile()  # compile outside the timed runs
        for _ in range(warmup):
            jax.block_until_ready(step(x, w, g))
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(step(x, w, g))
            times.append(time.perf_counter() - t0)
            # A formulation already 2x slower than the best one cannot win: stop timing it.
            if out and times[-1] > 2e-3 * min(out.values()):
                break
        out[impl] = round(1e3 * statistics.median(times), 3)
    return out
