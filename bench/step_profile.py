"""Where one train step of a benchmark network spends its time, per XLA operation.

Runs the same jitted step as ``bench/conv_vs_torch.py`` (forward + backward + Adam) under
``jax.profiler``, then shares the traced wall time among the operations (time when k run
at once counts 1/k to each) and sums the shares: by layer (the Flax module path
in each operation's metadata, forward and backward apart), by kind of operation
(``ynn_fusion`` = convolutions and matmuls XLA:CPU hands to YNNPACK, ``dot_general`` =
its own matmuls, ``convolution*`` = its native convolutions, ``slice_*``/``*concatenate*``
= building im2col columns, ...) and the largest single operations with their shapes.
Some of XLA:CPU's own matmuls (``dot_general``) return before their thread-pool work ends;
that time then shows up on the next operation of the same layer (a slice after a 0.1 ms
``dot_general``), so read the per-layer sums rather than single operations there.

Usage:
  python bench/step_profile.py [--net fpr] [--batch 16] [--impl auto] [--top 25]
                               [--layer ResUnit_2/Conv_1]
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
    p.add_argument("--layer", default="", help="only this module path's operations "
                   "(e.g. ResUnit_2/Conv_1) in the kind and largest-operation lists")
    return p.parse_args()


ARGS = _parse()
from lungjax.models.conv import malloc as conv_malloc  # noqa: E402

# As conv_vs_torch does, before JAX starts its threads: the environment form (restarting
# this script) also gives malloc transparent huge pages; without it a large step's
# temporaries can page-fault again every step and the profile times the kernel's faults.
conv_malloc.reexec_with_malloc_env()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import conv_nets  # noqa: E402
from lungjax.models.layers import set_conv_impl  # noqa: E402


# Instructions whose trace event spans the operations of their body, which are traced too.
CONTAINERS = ("while", "conditional", "call")
# Parts of an operation's op_name path that are JAX's, not a module's.
JAX_PARTS = {"while", "body", "cond", "closed_call", "checkpoint", "remat", "pjit", "jit",
             "custom_jvp_call", "custom_vjp_call", "scan", "map"}


def _layer(hlo_line):
    """(module path, pass) of one HLO instruction from its ``op_name`` metadata:
    ``jit(step)/transpose(jvp(FPR))/ResUnit_2/Conv_1/slice`` -> ("ResUnit_2/Conv_1", "bwd");
    operations outside the model (loss, optimizer) -> ("(step)", "")."""
    m = re.search(r'op_name="([^"]*)"', hlo_line)
    if m is None:
        return ("(no metadata)", "")
    parts = m.group(1).split("/")
    net = next((i for i, p in enumerate(parts) if p.startswith(("jvp(", "transpose("))), None)
    if net is None:
        return ("(step)", "")
    # Module names (Flax's "ResUnit_2" or a given "stage1_block0", "conv2") up to the first
    # part that is a JAX construct (a loop body, a nested transformation).
    path = []
    for p in parts[net + 1:-1]:
        if p in JAX_PARTS or not re.match(r"^[A-Za-z]\w*$", p):
            break
        path.append(p)
    return ("/".join(path) or "(model, no module)",
            "bwd" if parts[net].startswith("transpose(") else "fwd")


def _wall_shares(events, shapes):
    """Per HLO operation: milliseconds of wall time it ran, an interval shared by k
    operations running at once (XLA:CPU executes independent operations concurrently on
    its threads) counting 1/k to each, so the shares add up to the traced wall time; its
    number of calls; and the milliseconds during which k operations ran, per k."""
    spans, calls = [], collections.Counter()
    for e in events:
        name = e.get("name", "")
        # Executor and Python frames wrap the operations; "end: x" marks async completion.
        if e.get("ph") != "X" or name.startswith(("Thunk", "$", "end: ")) or name not in shapes:
            continue
        if re.sub(r"\.\d+$", "", name) in CONTAINERS:
            continue  # its body's operations are traced one by one
        spans.append((e["ts"], e["ts"] + e.get("dur", 0), name))
        calls[name] += 1
    edges = sorted({t for s, e, _ in spans for t in (s, e)})
    starts = collections.defaultdict(list)
    ends = collections.defaultdict(list)
    for s, e, name in spans:
        starts[s].append(name)
        ends[e].append(name)
    active, per_op, concurrency = collections.Counter(), collections.Counter(), collections.Counter()
    for t0, t1 in zip(edges, edges[1:] + edges[-1:]):
        for name in ends[t0]:
            active[name] -= 1
        for name in starts[t0]:
            active[name] += 1
        running = [n for n, k in active.items() if k > 0 for _ in range(k)]
        for name in running:
            per_op[name] += (t1 - t0) / 1e3 / len(running)
        concurrency[len(running)] += (t1 - t0) / 1e3
    return per_op, calls, concurrency


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
    layers = {}  # HLO instruction name -> (module path, "fwd"/"bwd") from its op_name
    for line in compiled.as_text().split("\n"):
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ", line)
        if m:
            shapes[m.group(1)] = m.group(2)
            layers[m.group(1)] = _layer(line)
    for _ in range(2):  # warm-up: the heap settles over the first two steps (malloc_bench)
        run(compiled, args)
    t0 = time.perf_counter()
    run(compiled, args)
    wall = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            run(compiled, args)
        path = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)[0]
        events = json.load(gzip.open(path))["traceEvents"]
    per_op, calls, concurrency = _wall_shares(events, shapes)
    kinds, by_layer = collections.Counter(), collections.defaultdict(collections.Counter)
    for name, ms in per_op.items():
        path, direction = layers[name]
        by_layer[path][direction] += ms
        if ARGS.layer and path != ARGS.layer:
            continue
        kinds[re.sub(r"\.\d+$", "", name)] += ms
    print(f"{ARGS.net} batch {args[3].shape[0]}, impl {ARGS.impl}: step {wall:.3f} s (untraced); "
          f"operations ran {sum(per_op.values()) / 1e3:.3f} s of the traced step")
    print("traced time with k operations running at once: " + ", ".join(
        f"k={k}: {ms / 1e3:.3f} s" for k, ms in sorted(concurrency.items())))
    print("\nms by layer (module path; forward, backward, outside the model):")
    for path, ms in sorted(by_layer.items(), key=lambda kv: -sum(kv[1].values())):
        print(f"  {sum(ms.values()):10.1f}  fwd {ms['fwd']:8.1f}  bwd {ms['bwd']:8.1f}  "
              f"other {ms['']:7.1f}  {path}")
    print("\nms by kind of operation:")
    for kind, ms in kinds.most_common(ARGS.top):
        print(f"  {ms:10.1f}  {kind}")
    print("\nlargest operations (ms, calls, result):")
    mine = collections.Counter({n: ms for n, ms in per_op.items()
                                if not ARGS.layer or layers[n][0] == ARGS.layer})
    for name, ms in mine.most_common(ARGS.top):
        path, direction = layers[name]
        print(f"  {ms:10.1f}  {calls[name]:4d}  {name:34s} {shapes[name][:50]:50s} "
              f"{path} {direction}")
    set_conv_impl(None)


if __name__ == "__main__":
    main()
