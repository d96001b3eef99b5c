"""Timing of one convolution shape in each formulation (forward + backward), and of each
pass (forward, input-gradient, weight-gradient) alone in each of its ``split`` choices, for
the per-shape choice of ``impl="auto"`` on CPU (see ``conv_select``, ``conv_split``)."""

from __future__ import annotations

import statistics
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lungjax.models import conv_ops, conv_split


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


def _inputs(key):
    """Random x (N, *spatial, C_in), w (*kernel, C_in, C_out) and output cotangent."""
    dtype = jnp.dtype(key.dtype)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((key.batch, *key.spatial, key.cin)), dtype)
    w = jnp.asarray(rng.standard_normal((*key.kernel, key.cin, key.cout)) * 0.1, dtype)
    y_shape = jax.eval_shape(
        lambda a, b: (conv_ops.conv if key.kind == "conv" else conv_ops.conv_transpose)(
            a, b, strides=key.strides, pads=key.pads, dilation=key.dilation, impl="xla"), x, w)
    g = jnp.asarray(rng.standard_normal(y_shape.shape), jnp.float32)
    return x, w, g


def _median_ms(compiled, args, reps, warmup, give_up_ms):
    """Median ms of ``compiled(*args)`` over ``reps`` runs after ``warmup`` runs.

    The first warm-up run (which also pays for growing the heap the first time a buffer
    size is seen) is timed: if it exceeds ``give_up_ms`` that time is returned at once.
    """
    for i in range(warmup):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        if i == 0 and 1e3 * (time.perf_counter() - t0) > give_up_ms:
            return round(1e3 * (time.perf_counter() - t0), 3)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
        if 1e3 * times[-1] > give_up_ms:
            break
    return round(1e3 * statistics.median(times), 3)


def time_passes(key, reps: int = 3, warmup: int = 1,
                max_buffer_bytes: int = 2 << 30) -> dict[str, dict[str, float]]:
    """Median ms of each pass of a convolution alone, in each of its split choices.

    A choice already 2x slower than the best one of its pass is timed once only; one whose
    column buffer would exceed ``max_buffer_bytes`` is not run (absent from the result).

    Args:
      key: a ``conv_select.ConvKey`` of kind "conv".

    Returns:
      {"fwd": {choice: ms}, "igrad": {...}, "wgrad": {...}} (choices as in
      ``conv_split.choices``; "x" is always there).
    """
    x, w, g = _inputs(key)
    dy = g.astype(x.dtype)
    itemsize = jnp.dtype(key.dtype).itemsize
    out = {}
    for pass_name, options in conv_split.choices(len(key.kernel), key.kernel).items():
        # Largest im2col first: usually the fastest, so the slow ones stop early.
        options = sorted(options, key=lambda c: -int(c) if c.isdigit() else 10)
        # A matmul contracting fewer than 8 numbers (im2col over few taps of a 1-channel
        # input) is lowered as broadcast-multiplies that XLA fuses into, and recomputes in,
        # the layer's consumers: fast alone, far slower inside a network. Not offered.
        options = [c for c in options if not c.isdigit() or conv_split.contraction_size(
            pass_name, c, key.kernel, key.cin, key.cout) >= 8]
        options = [c for c in options if conv_split.buffer_bytes(
            pass_name, c, key.batch, key.spatial, dy.shape[1:-1], key.kernel, key.cin,
            key.cout, itemsize) <= max_buffer_bytes]
        ms = {}
        for choice in options:
            fn = conv_split.pass_fn(pass_name, choice, key.strides, key.pads, key.dilation)
            compiled = jax.jit(fn).lower(x, w, dy).compile()
            ms[choice] = _median_ms(compiled, (x, w, dy), reps, warmup,
                                    2 * min(ms.values()) if ms else float("inf"))
        out[pass_name] = ms
    return out


def best_plan(passes: dict[str, dict[str, float]]) -> str:
    """The ``"split_FIW"`` impl made of the fastest choice of each pass."""
    pick = {p: min(ms, key=ms.get) for p, ms in passes.items()}
    return conv_split.PREFIX + pick["fwd"] + pick["igrad"] + pick["wgrad"]


def time_key(key, impls: Sequence[str], reps: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median milliseconds of forward + input- and weight-gradient of ``key`` per impl.

    Args:
      key: a ``conv_select.ConvKey``.
      impls: formulations to time.
      reps: timed repetitions after ``warmup`` (compile excluded).

    Returns:
      {impl: median ms}.
    """
    x, w, g = _inputs(key)
    out = {}
    for impl in impls:
        step = jax.jit(jax.grad(_loss_fn(key, impl), argnums=(0, 1)))
        step = step.lower(x, w, g).compile()  # compile outside the timed runs
        # A formulation already 2x slower than the best one cannot win: stop timing it.
        out[impl] = _median_ms(step, (x, w, g), reps, warmup,
                               2 * min(out.values()) if out else float("inf"))
    return out


def pick_best(ms: dict[str, float], margin: float = 0.9) -> str:
    """The fastest formulation, except that a ``split`` plan must beat the fastest other
    one by ``margin`` (10%): per-pass choices are timed alone, and a plan that only ties
    in isolation has shown it can lose inside a network (fusion with its neighbours)."""
    others = {k: v for k, v in ms.items() if not conv_split.is_split(k)}
    best = min(ms, key=ms.get)
    if others and conv_split.is_split(best) and ms[best] > margin * min(others.values()):
        return min(others, key=others.get)
    return best


def tune_key(key, reps: int = 2, full: Sequence[str] = ("matmul", "xla")) -> dict:
    """A table entry for ``key``: {"key", "ms", "best"[, "passes"]}.

    Convolutions: each pass timed alone in each split choice (``time_passes``), the fastest
    per pass composed into a ``"split_FIW"`` plan, then the full forward + backward of the
    plan and of ``full``; "best" is the fastest full timing (``pick_best``). Transposed convolutions: the full
    timing of each of their formulations.
    """
    if key.kind != "conv":
        ms = time_key(key, conv_ops.CONV_TRANSPOSE_IMPLS, reps=reps)
        return {"key": key.to_json(), "ms": ms, "best": pick_best(ms)}
    passes = time_passes(key, reps=reps)
    plan = best_plan(passes)
    ms = time_key(key, [plan] + [i for i in full if i != plan], reps=reps)
    return {"key": key.to_json(), "ms": ms, "best": pick_best(ms), "passes": passes}
