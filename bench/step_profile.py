"""Where one train step of a benchmark network spends its time, per XLA operation.

Runs the same jitted step as ``bench/conv_vs_torch.py`` (forward + backward + Adam) under
``jax.profiler``, then sums the trace's per-thunk durations: by kind of operation
(``ynn_fusion`` = convolutions and matmuls XLA:CPU hands to YNNPACK, ``dot_general`` =
its own matmuls, ``convolution*`` = its native convolutions, ``slice_*``/``*concatenate*``
= building im2col columns, ...) and the largest single operations with their shapes.

Usage:
  python bench/step_profile.py [--net fpr] [--batch 16] [--impl auto] [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--net", default="fpr")
    p.add_argument("--batch", type=int, default=0, help="0: the network's benchmark batch")
    p.add_argument("--impl", default="auto", help="convolution override (set_conv_impl)")
    p.add_argument("--top", type=int, default=25)
    return p.parse_args()


ARGS = _parse()
from lungjax.models import conv_malloc  # noqa: E402

conv_malloc.keep_freed_memory()  # as conv_vs_torch does, before JAX starts its threads
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import conv_nets  # noqa: E402
from lungjax.models.layers import set_conv_impl  # noqa: E402


def run(compiled, args):
    args[0], args[1], args[2], loss = compiled(*args)
    loss.block_until_ready()


def main():
    if ARGS.net not in conv_nets.NETS:
        raise SystemExit(f"--net: unknown network {ARGS.net!r}; expected one of "
                         f"{sorted(conv_nets.NETS)}")
    set_conv_impl(ARGS.impl)
    jstep, args = conv_nets.train_step(ARGS.net, ARGS.batch or conv_nets.NETS[ARGS.net][2])
    compiled = jstep.lower(*args).compile()
    shapes = {}  # HLO instruction name -> result type, to label the trace's operations
    for line in compiled.as_text().split("\n"):
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ", line)
        if m:
            shapes[m.group(1)] = m.group(2)
    run(compiled, args)  # warm-up
    t0 = time.perf_counter()
    run(compiled, args)
    wall = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            run(compiled, args)
        path = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)[0]
        events = json.load(gzip.open(path))["traceEvents"]
    per_op, calls = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        # Executor and Python frames wrap the operations; "end: x" marks async completion.
        if e.get("ph") != "X" or name.startswith(("Thunk", "$", "end: ")) or name not in shapes:
            continue
        per_op[name] += e.get("dur", 0) / 1e3
        calls[name] += 1
    kinds = collections.Counter()
    for name, ms in per_op.items():
        kinds[re.sub(r"\.\d+$", "", name)] += ms
    print(f"{ARGS.net} batch {args[3].shape[0]}, impl {ARGS.impl}: step {wall:.3f} s (untraced); "
          f"traced operations sum to {sum(per_op.values()) / 1e3:.3f} s")
    print("\nms by kind of operation:")
    for kind, ms in kinds.most_common(ARGS.top):
        print(f"  {ms:10.1f}  {kind}")
    print("\nlargest operations (ms, calls, result):")
    for name, ms in per_op.most_common(ARGS.top):
        print(f"  {ms:10.1f}  {calls[name]:4d}  {name:34s} {shapes[name][:70]}")
    set_conv_impl(None)


if __name__ == "__main__":
    main()
