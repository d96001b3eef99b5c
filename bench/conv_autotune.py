"""Measures every convolution formulation on the layer shapes of the benchmark networks
(forward + input- and weight-gradient, median ms) and writes the table that
``impl="auto"`` reads on CPU: ``lungjax/models/conv_table.json``.

Usage:
  python bench/conv_autotune.py [--nets fcn,fpr,det,unet] [--reps 3] [--out PATH] [--merge]

The table is rewritten (atomically) after every shape, so an interrupted run leaves a valid
partial table; ``--merge`` keeps entries of shapes not measured in this run. Run it on the
CPU the table is meant for; timings on a shared machine are noisy (medians of --reps).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import conv_nets  # noqa: E402
from lungjax.data.tables import atomic_write_text  # noqa: E402
from lungjax.models import conv_ops, conv_select, conv_tune  # noqa: E402


def net_keys(names):
    """Unique ConvKeys of the networks' layers, in first-seen order."""
    keys = []
    for name in names:
        factory, shape, batch = conv_nets.NETS[name]
        model = factory()
        x = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
        with conv_select.record_keys() as seen:
            jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
        keys += [k for k in seen if k not in keys]
    return keys


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nets", default="fcn,fpr,det,unet")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=str(conv_select.TABLE_PATH))
    p.add_argument("--merge", action="store_true")
    args = p.parse_args()
    keys = net_keys([n for n in args.nets.split(",") if n])
    entries = []
    if args.merge and os.path.isfile(args.out):
        entries = json.loads(open(args.out).read())["entries"]
    entries = [e for e in entries if conv_select.ConvKey.from_json(e["key"]) not in keys]
    print(f"{len(keys)} layer shapes", flush=True)
    for i, key in enumerate(keys):
        impls = conv_ops.CONV_IMPLS if key.kind == "conv" else conv_ops.CONV_TRANSPOSE_IMPLS
        t0 = time.perf_counter()
        ms = conv_tune.time_key(key, impls, reps=args.reps)
        best = min(ms, key=ms.get)
        entries.append({"key": key.to_json(), "ms": ms, "best": best})
        atomic_write_text(args.out, json.dumps(
            {"machine": f"{os.cpu_count()} cores; {jax.__version__}", "entries": entries},
            indent=1))
        desc = (f"{key.kind} b{key.batch} {key.spatial} {key.cin}->{key.cout} k{key.kernel} "
                f"s{key.strides}")
        print(f"[{i + 1}/{len(keys)}] {desc}: " + ", ".join(f"{k} {v:.1f}" for k, v in ms.items())
              + f" -> {best} ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
