"""Winograd over the whole batch (split choice ``u``) against the same tiling run one depth
slab at a time (choice ``s``, ``conv_winograd.SLAB_BYTES`` of transformed buffer per loop
step), per pass and for several step sizes, on one layer shape.

Every variant is compiled first, then the variants run in turn, ``--rounds`` times, so that
the machine's drift hits all of them alike; medians and minima in ms.

Usage:
  python bench/winograd_slabs.py [--shape 16x24x60x60x32] [--cout 32] [--kernel 3x3x3]
                                 [--padding same|valid] [--slab-mb 8,32,128] [--rounds 5]
                                 [--igrad-forms]

The default shape is the residual FP net's full-resolution 32-channel layer
(``bench/conv_nets.py`` ``fpr``); ``--slab-mb`` values are step budgets in MiB (8 is the
library's default). ``--igrad-forms`` adds the input-gradient in each of its two Winograd
forms (``conv_winograd.input_grad``'s ``form``: the correlation with the flipped kernel, or
the transpose of the forward), whole batch and by slabs of the default size; e.g. the FCN's
64-channel layer: ``--shape 64x8x13x13x64 --cout 64 --kernel 3x5x5 --padding valid
--slab-mb 8 --igrad-forms``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lungjax.models.conv import malloc as conv_malloc  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="16x24x60x60x32", help="N x spatial.. x C_in")
    p.add_argument("--cout", type=int, default=32)
    p.add_argument("--kernel", default="3x3x3")
    p.add_argument("--slab-mb", default="8,32,128")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--padding", choices=("same", "valid"), default="same")
    p.add_argument("--igrad-forms", action="store_true",
                   help="also the input-gradient in each Winograd form (u and s)")
    args = p.parse_args()
    conv_malloc.keep_freed_memory()  # as conv_vs_torch: no page faults on reused buffers

    import jax
    import jax.numpy as jnp
    import numpy as np

    from lungjax.models.conv import split as conv_split, winograd as conv_winograd

    shape = tuple(int(v) for v in args.shape.split("x"))
    kernel = tuple(int(v) for v in args.kernel.split("x"))
    rank = len(kernel)
    if len(shape) != rank + 2:
        raise SystemExit(f"--shape {args.shape} needs {rank} spatial axes for --kernel "
                         f"{args.kernel}")
    pads = [((k - 1) // 2, k - 1 - (k - 1) // 2) if args.padding == "same" else (0, 0)
            for k in kernel]
    ones = (1,) * rank
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal((*kernel, shape[-1], args.cout)) * 0.05, jnp.float32)
    y = conv_split.pass_fn("fwd", "u", ones, pads, ones)(x, w, None)
    dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)

    variants = [("u", None)] + [("s", int(float(mb) * (1 << 20)))
                                for mb in args.slab_mb.split(",")]
    compiled = {}
    default = conv_winograd.SLAB_BYTES
    for pass_name in ("fwd", "igrad", "wgrad"):
        for choice, budget in variants:
            # The budget is read while tracing: set it, compile, restore.
            conv_winograd.SLAB_BYTES = budget or default
            fn = conv_split.pass_fn(pass_name, choice, ones, pads, ones)
            label = choice if budget is None else f"s {budget / (1 << 20):g} MiB"
            compiled[(pass_name, label)] = jax.jit(fn).lower(x, w, dy).compile()
    conv_winograd.SLAB_BYTES = default
    if args.igrad_forms:
        for slabs in (False, True):
            for form in conv_winograd.INPUT_GRAD_FORMS[1:]:
                fn = partial(conv_winograd.input_grad, in_spatial=shape[1:-1], pads=pads,
                             tile=0, slabs=slabs, form=form)
                label = f"{'s' if slabs else 'u'} {form[:5]}"
                compiled[("igrad", label)] = jax.jit(lambda x, w, dy, fn=fn: fn(dy, w)).lower(
                    x, w, dy).compile()
    for f in compiled.values():
        jax.block_until_ready(f(x, w, dy))

    times = {k: [] for k in compiled}
    for _ in range(args.rounds):
        for k, f in compiled.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(x, w, dy))
            times[k].append(time.perf_counter() - t0)
    if os.environ.get("SLABS_RAW"):
        for k, ts in times.items():
            print(k, " ".join(f"{t * 1e3:.0f}" for t in ts))
    print(f"layer {args.shape} -> {args.cout}, kernel {args.kernel}, {args.rounds} rounds")
    print(f"{'pass':6s} {'variant':14s} {'median ms':>10s} {'min ms':>8s} {'vs u':>6s}")
    for pass_name in ("fwd", "igrad", "wgrad"):
        base = float(np.median(times[(pass_name, "u")]))
        for (pn, label), ts in times.items():
            if pn != pass_name:
                continue
            med = float(np.median(ts))
            print(f"{pn:6s} {label:14s} {med * 1e3:10.1f} {min(ts) * 1e3:8.1f} "
                  f"{med / base:6.2f}")


if __name__ == "__main__":
    main()
