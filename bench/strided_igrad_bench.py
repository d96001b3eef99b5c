"""Input-gradient of strided depth-folded 3-D convolutions: one stride-1 convolution per
output phase (``conv_split.fold_input_grad``, what ``split_?f?`` runs) vs XLA's autodiff of
the folded forward (one convolution over the zero-dilated output gradient), same run.

Usage:
  python bench/strided_igrad_bench.py [--reps 7]

Prints min / median milliseconds of each, per layer shape of the benchmark networks.
"""

from __future__ import annotations

import argparse
import statistics
import time

from lungjax.models.conv import malloc as conv_malloc

conv_malloc.keep_freed_memory()  # as the tuner and conv_vs_torch, before JAX starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lungjax.models.conv import ops as conv_ops, split as conv_split  # noqa: E402

# (input (N, D, H, W, C_in), C_out): stride-2 3x3x3 layers of fpr, det and model_fpr.
SHAPES = [((16, 24, 60, 60, 32), 64), ((16, 12, 30, 30, 64), 128),
          ((2, 96, 96, 96, 16), 32), ((2, 48, 48, 48, 32), 64), ((16, 16, 18, 18, 64), 128)]
STRIDES, PADS, DILATION = (2, 2, 2), ((1, 1),) * 3, (1, 1, 1)


def autodiff_igrad(x, w, dy):
    _, vjp = jax.vjp(lambda xx: conv_split.fold_forward(xx, w, STRIDES, PADS, DILATION), x)
    return vjp(dy)[0]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=7)
    reps = p.parse_args().reps
    rng = np.random.default_rng(0)
    phase = jax.jit(lambda x, w, dy: conv_split.fold_input_grad(x, w, dy, STRIDES, PADS,
                                                                 DILATION))
    native = jax.jit(autodiff_igrad)
    print("input (N,D,H,W,C) -> C_out | phases ms min/median | autodiff ms min/median | max |diff|")
    for shape, cout in SHAPES:
        x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        w = jnp.asarray(rng.standard_normal((3, 3, 3, shape[-1], cout)) * 0.05, jnp.float32)
        y = conv_ops.conv_xla(x, w, STRIDES, PADS, DILATION)
        dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
        diff = float(jnp.max(jnp.abs(phase(x, w, dy) - native(x, w, dy))))
        ms = {"phase": [], "native": []}
        for _ in range(reps):  # alternate, so that machine drift hits both alike
            for name, fn in (("phase", phase), ("native", native)):
                t0 = time.perf_counter()
                fn(x, w, dy).block_until_ready()
                ms[name].append((time.perf_counter() - t0) * 1e3)
        cells = [f"{min(v):.0f} / {statistics.median(v):.0f}" for v in ms.values()]
        print(f"{shape} -> {cout} | {cells[0]} | {cells[1]} | {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
