"""Each convolution layer of a benchmark network alone, JAX against PyTorch: where a step's
gap to PyTorch sits, layer shape by layer shape.

``bench/conv_vs_torch.py`` times whole train steps; ``bench/step_profile.py`` shares a
traced step among its operations. This one times every distinct convolution (and
transposed convolution) of a network from ``bench/conv_nets.py`` on its own, in its own
jitted function, with the formulation lungjax runs there (``resolve("auto", key)``: this
machine's tuned plan where its cache has one, else the shipped table; ``LUNGJAX_CONV_TUNE=0``
for the shipped table alone), against ``torch.nn.Conv{2,3}d`` / ``ConvTranspose{2,3}d``
channels-last with the same shape, same thread count:

* ``--pass train``: forward, input-gradient and weight-gradient (JAX: ``value_and_grad`` of
  ``sum(conv(x, w) * g)`` with ``g`` an argument, so the forward is not dead code and
  nothing folds into a constant; PyTorch: forward + ``backward(g)``). The layer that reads
  the network's input takes no input-gradient on either side, as in the network.
* ``--pass forward``: the forward alone (inference); with ``--scan EDGE`` the detector's
  layers at batch 1 over an EDGE^3 volume (rounded up to a multiple of 16), the shapes of
  ``conv_vs_torch.py --scan``.

Prints one row per layer shape (how many times the network has it, the plan, milliseconds
per call on each side, their ratio, and count x difference) and the totals. Padding on the
PyTorch side is symmetric (``k // 2``, as the twins in ``bench/nets_torch.py``), biases are
left out on both sides. A layer alone runs in a warmer cache than inside its network, so the
totals bound the convolutions' share of a step rather than equal it.

Usage:
  python bench/layers_vs_torch.py [--net resnet50_3d] [--pass train|forward] [--scan 300]
                                  [--reps 7]
(``pip install torch==2.13.0`` first.)
"""

from __future__ import annotations

import argparse
import collections
import os
import sys


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--net", default="resnet50_3d")
    p.add_argument("--pass", dest="mode", choices=("train", "forward"), default="train")
    p.add_argument("--scan", type=int, default=0, help="forward pass of the detector at "
                   "batch 1 over an EDGE^3 volume (--net det --pass forward)")
    p.add_argument("--reps", type=int, default=7, help="timed calls per layer (median)")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


ARGS = _parse()
from lungjax.models.conv import malloc as conv_malloc  # noqa: E402

# As conv_vs_torch does, before JAX starts its threads (see malloc_bench.py).
conv_malloc.reexec_with_malloc_env()
# Same cores for both frameworks: XLA and torch size their pools from the affinity mask.
os.sched_setaffinity(0, list(sorted(os.sched_getaffinity(0)))[:ARGS.threads])
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import conv_nets  # noqa: E402
from conv_nets import SCAN_STRIDE, median_seconds  # noqa: E402
from lungjax.models.conv import ops as conv_ops  # noqa: E402
from lungjax.models.conv import select as conv_select  # noqa: E402


def _median_ms(fn, reps: int) -> float:
    return 1e3 * median_seconds(fn, reps, 2)


def layer_keys(net: str, mode: str, scan: int):
    """(input shape (B, *spatial, C), Counter of the network's ``ConvKey``s) recorded while
    tracing it for ``mode`` ("train": training mode; "forward": inference, forward-only
    keys)."""
    factory, shape, batch = conv_nets.NETS[net]
    if factory is None:
        raise SystemExit(f"--net {net}: a lungjax engine step, not one network; pick one of "
                         f"{sorted(n for n, v in conv_nets.NETS.items() if v[0] is not None)}")
    if scan:
        if net != "det":
            raise SystemExit("--scan: only the detector (--net det) runs whole volumes")
        edge = -(-scan // SCAN_STRIDE) * SCAN_STRIDE
        shape, batch = (edge,) * 3 + (shape[-1],), 1
    model = factory()
    x = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape),
                                                  train=False))
    with conv_select.record_keys() as keys:
        if mode == "forward":
            with conv_select.forward_only():
                jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
        else:
            jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
                           variables, x)
    return (batch, *shape), collections.Counter(keys)


def jax_ms(key, impl: str, mode: str, needs_dx: bool, reps: int) -> float:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((key.batch, *key.spatial, key.cin)), jnp.float32)
    w = jnp.asarray(0.05 * rng.standard_normal((*key.kernel, key.cin, key.cout)), jnp.float32)
    op = conv_ops.conv if key.kind == "conv" else conv_ops.conv_transpose

    def conv(x, w):
        return op(x, w, strides=key.strides, pads=key.pads, dilation=key.dilation, impl=impl)

    if mode == "forward":
        f = jax.jit(conv)
        return _median_ms(lambda: jax.block_until_ready(f(x, w)), reps)
    g = jnp.asarray(rng.standard_normal(jax.eval_shape(conv, x, w).shape), jnp.float32)
    step = jax.jit(jax.value_and_grad(lambda x, w, g: jnp.sum(conv(x, w) * g),
                                      argnums=(0, 1) if needs_dx else (1,)))
    return _median_ms(lambda: jax.block_until_ready(step(x, w, g)), reps)


def torch_ms(key, mode: str, needs_dx: bool, reps: int) -> float:
    import torch

    rank = len(key.spatial)
    fmt = torch.channels_last_3d if rank == 3 else torch.channels_last
    if key.kind == "conv":
        cls = torch.nn.Conv3d if rank == 3 else torch.nn.Conv2d
        layer = cls(key.cin, key.cout, key.kernel, key.strides,
                    padding=tuple(k // 2 for k in key.kernel), dilation=key.dilation,
                    bias=False)
    else:
        cls = torch.nn.ConvTranspose3d if rank == 3 else torch.nn.ConvTranspose2d
        layer = cls(key.cin, key.cout, key.kernel, key.strides, bias=False)
    layer = layer.to(memory_format=fmt)
    x = torch.randn(key.batch, key.cin, *key.spatial).contiguous(memory_format=fmt)
    if mode == "forward":
        def run():
            with torch.no_grad():
                layer(x)
        return _median_ms(run, reps)
    x.requires_grad_(needs_dx)
    with torch.no_grad():
        g = torch.randn_like(layer(x))

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(g)
    return _median_ms(step, reps)


def main():
    import torch

    torch.set_num_threads(ARGS.threads)
    in_shape, keys = layer_keys(ARGS.net, ARGS.mode, ARGS.scan)
    print(f"{ARGS.net} {ARGS.mode}, input {'x'.join(map(str, in_shape))}: {len(keys)} layer "
          f"shapes, {sum(keys.values())} layers; jax {jax.__version__}, torch "
          f"{torch.__version__}, {ARGS.threads} threads")
    print("| layers | shape (B x spatial x C_in -> C_out) | kernel/stride | plan | jax ms | "
          "torch ms | jax/torch | count x (jax - torch) ms |")
    print("|---|---|---|---|---|---|---|---|")
    tot_j = tot_t = 0.0
    # The first layer measured ran up to 5x slow while the process's heap grew (its
    # buffers first touched): measure it once untimed.
    first = next(iter(keys))
    jax_ms(first, conv_select.resolve("auto", first), ARGS.mode, True, 1)
    torch_ms(first, ARGS.mode, True, 1)
    for key, n in keys.items():
        # The first layer reads the network's input, whose gradient the step never takes.
        needs_dx = not (key.spatial == tuple(in_shape[1:-1]) and key.cin == in_shape[-1]
                        and key.batch == in_shape[0] and key.kind == "conv")
        impl = conv_select.resolve("auto", key)
        a = jax_ms(key, impl, ARGS.mode, needs_dx, ARGS.reps)
        b = torch_ms(key, ARGS.mode, needs_dx, ARGS.reps)
        tot_j, tot_t = tot_j + n * a, tot_t + n * b
        kind = "" if key.kind == "conv" else " (transposed)"
        print(f"| {n} | {key.batch}x{'x'.join(map(str, key.spatial))}x{key.cin} -> {key.cout}"
              f"{kind} | {'x'.join(map(str, key.kernel))}/{key.strides[0]} | {impl} | "
              f"{a:.1f} | {b:.1f} | {a / b:.2f} | {n * (a - b):+.1f} |", flush=True)
    print(f"\nall layers, each counted as often as the network has it: jax {tot_j:.0f} ms, "
          f"torch {tot_t:.0f} ms, jax/torch {tot_j / tot_t:.2f}")


if __name__ == "__main__":
    main()
