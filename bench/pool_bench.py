"""Max-pooling forward + backward: ``lungjax.models.layers.max_pool`` (reshape + max, strided-
view gradient) vs ``flax.linen.max_pool`` (XLA's reduce-window and select-and-scatter), same
run, on the pooling shapes of the benchmark networks (ReLU outputs, so windows tie at 0).

Usage:
  python bench/pool_bench.py [--reps 7]

Prints the median milliseconds of each and their ratio, per shape.
"""

from __future__ import annotations

import argparse
import statistics
import time

from lungjax.models.conv import malloc as conv_malloc

conv_malloc.keep_freed_memory()  # as the tuner and conv_vs_torch, before JAX starts

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lungjax.models.layers import max_pool  # noqa: E402

# (input (N, *spatial, C), window): fcn's pool, the U-Net's first pool, Dou2017FPR's last.
SHAPES = [((64, 8, 26, 26, 64), (1, 2, 2)), ((2, 256, 256, 64), (2, 2)),
          ((16, 10, 11, 13, 64), (2, 2, 2))]


def _median_ms(fn, x, reps):
    jax.block_until_ready(fn(x))  # compile and warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    for shape, window in SHAPES:
        x = jax.nn.relu(jax.random.normal(jax.random.key(0), shape))
        ms = {}
        for name, pool in (("flax", lambda x: nn.max_pool(x, window, strides=window)),
                           ("lungjax", lambda x: max_pool(x, window))):
            step = jax.jit(jax.value_and_grad(lambda x: jnp.sum(jnp.sin(pool(x)))))
            ms[name] = _median_ms(step, x, args.reps)
        print(f"{str(shape):22s} window {str(window):10s} flax {ms['flax']:7.1f} ms  "
              f"lungjax {ms['lungjax']:7.1f} ms  ratio {ms['flax'] / ms['lungjax']:.2f}x",
              flush=True)


if __name__ == "__main__":
    main()
