"""Batch normalization + ReLU, forward and backward (training mode: batch statistics,
running averages updated), as ``flax.linen.BatchNorm`` and as ``lungjax.models.layers.
BatchNorm``, on the activation shapes of the benchmark networks.

Both variants of a shape are compiled first, then run in turn ``--rounds`` times (the
machine's drift hits both alike); medians and minima in ms, and lungjax / flax.

Usage:
  python bench/norm_bench.py [--shapes 2x48x48x48x24,16x24x60x60x32,2x256x256x64]
                             [--rounds 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

from lungjax.models.conv import malloc as conv_malloc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="2x48x48x48x24,16x24x60x60x32,2x256x256x64",
                   help="comma-separated N x spatial.. x C")
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args()
    conv_malloc.keep_freed_memory()  # as the training programs: no page faults on reuse

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lungjax.models.layers import BatchNorm

    print(f"{'shape':22s} {'flax ms':>8s} {'lungjax ms':>11s} {'min flax':>9s} "
          f"{'min lungjax':>12s} {'ratio':>6s}")
    for spec in args.shapes.split(","):
        shape = tuple(int(v) for v in spec.split("x"))
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        g = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        compiled = {}
        for name, cls in (("flax", nn.BatchNorm), ("lungjax", BatchNorm)):
            module = cls(use_running_average=False, momentum=0.9, epsilon=1e-5)
            variables = module.init(jax.random.key(0), x)

            def loss(params, x, module=module, variables=variables, g=g):
                y, stats = module.apply({**variables, "params": params}, x,
                                        mutable=["batch_stats"])
                return jnp.vdot(nn.relu(y), g), stats

            step = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
            compiled[name] = (step.lower(variables["params"], x).compile(),
                              variables["params"])
        for fn, params in compiled.values():
            jax.block_until_ready(fn(params, x))
        times = {k: [] for k in compiled}
        for _ in range(args.rounds):
            for k, (fn, params) in compiled.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(params, x))
                times[k].append(1e3 * (time.perf_counter() - t0))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{spec:22s} {med['flax']:8.2f} {med['lungjax']:11.2f} "
              f"{min(times['flax']):9.2f} {min(times['lungjax']):12.2f} "
              f"{med['lungjax'] / med['flax']:6.2f}")


if __name__ == "__main__":
    main()
