"""Measures every convolution formulation on the layer shapes of the benchmark networks and
of the lungjax models, and writes the table that ``impl="auto"`` reads on CPU:
``lungjax/models/conv/table.json``.

Per convolution shape: each pass (forward, input-gradient, weight-gradient) alone in each of
its ``split`` choices (``lungjax.models.conv.split``), the fastest per pass composed into one
``"split_FIW"`` plan, then the full forward + backward of that plan and of the reference
formulations (``--full``, default "matmul,xla"); the fastest full timing is the entry's
"best". Transposed convolutions: the full timing of each of their formulations.

Usage:
  python bench/conv_autotune.py [--nets fcn,fpr,det,unet,model_fcn,model_fpr,model_fpn]
                                [--reps 2] [--out PATH] [--merge] [--missing]
                                [--order net|flops] [--limit N] [--strided] [--winograd]
                                [--max-buffer-gb 2]
                                [--malloc keep|default]

The table is rewritten (atomically) after every shape, so an interrupted run leaves a valid
partial table; ``--merge`` keeps entries of shapes not measured in this run; ``--missing``
(implies ``--merge``) measures only the shapes the table lacks, so an interrupted run resumes
where it stopped; ``--order flops`` measures the shapes with the most arithmetic first (the
ones that matter most when time is short); ``--strided`` (implies ``--merge``) measures
only the strided convolutions (after a change to how those are computed), ``--winograd``
(implies ``--merge``) only those the Winograd choice applies to (stride 1, undilated).
``--max-buffer-gb`` bounds each formulation's
temporary memory as XLA compiled it (``conv_tune.temp_bytes``): per-pass choices over it run
over the batch in chunks (``"split_FIWbK"``, see ``split``). Run it on the
CPU the table is meant for, with the allocator setting the programs will use (``--malloc
keep`` = ``lungjax.models.conv.malloc.keep_freed_memory``, the default: with it, large column
buffers stop page-faulting and the choice shifts toward im2col). Timings on a shared machine
are noisy (medians of --reps).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lungjax.models.conv import malloc as conv_malloc  # noqa: E402


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nets", default="fcn,fpr,det,unet,model_fcn,model_fpr,model_fpn")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--full", default="matmul,xla", help="formulations timed in full besides "
                   "the per-pass plan")
    p.add_argument("--out", default=None, help="default: lungjax/models/conv/table.json")
    p.add_argument("--merge", action="store_true")
    p.add_argument("--missing", action="store_true", help="only shapes absent from the table "
                   "(implies --merge)")
    p.add_argument("--strided", action="store_true", help="only convolutions with a stride "
                   "> 1 (implies --merge)")
    p.add_argument("--winograd", action="store_true", help="only stride-1 undilated "
                   "convolutions with a kernel > 1 (implies --merge)")
    p.add_argument("--order", choices=("net", "flops"), default="net",
                   help="net: first-seen order; flops: largest forward + backward first")
    p.add_argument("--limit", type=int, default=0, help="measure only the first N shapes "
                   "(after --missing and --order); 0: all")
    p.add_argument("--max-buffer-gb", type=float, default=2.0,
                   help="memory limit (GB) on a formulation's column buffer or compiled "
                   "temporary memory: a pass over it runs in batch chunks (split_FIWbK), a "
                   "full formulation over it is skipped; the native one always runs")
    p.add_argument("--malloc", choices=("keep", "default"), default="keep")
    return p.parse_args()


ARGS = _parse()
if ARGS.malloc == "keep":
    conv_malloc.keep_freed_memory()  # before JAX starts its threads

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import conv_nets  # noqa: E402
from lungjax.atomic import atomic_write_text  # noqa: E402
from lungjax.models.conv import select as conv_select  # noqa: E402
from lungjax.models.conv import split as conv_split  # noqa: E402
from lungjax.models.conv import tune as conv_tune  # noqa: E402


def _model_nets():
    """The lungjax models at their training patch sizes: name -> (factory, shape, batch)."""
    from lungjax.models.fcn import Dou2017FCN
    from lungjax.models.fp_reduction import Dou2017FPR
    from lungjax.models.resnet_fpn import XieFPN
    return {"model_fcn": (Dou2017FCN, (10, 30, 30, 1), 64),
            "model_fpr": (Dou2017FPR, (24, 60, 60, 1), 16),
            "model_fpn": (XieFPN, (96, 96, 96, 1), 2)}


def net_keys(names):
    """Unique ConvKeys of the networks' layers, in first-seen order."""
    nets = dict(conv_nets.NETS)
    nets.update(_model_nets())
    keys = []
    for name in names:
        if name not in nets:
            raise SystemExit(f"--nets: unknown network {name!r}; expected some of {sorted(nets)}")
        factory, shape, batch = nets[name]
        model = factory()
        x = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
        with conv_select.record_keys() as seen:
            jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
        keys += seen
    return list(dict.fromkeys(keys))


def main():
    args = ARGS
    args.out = args.out or str(conv_select.TABLE_PATH)
    keys = net_keys([n for n in args.nets.split(",") if n])
    entries = []
    if (args.merge or args.missing or args.strided or args.winograd) and os.path.isfile(args.out):
        entries = json.loads(open(args.out, encoding="utf-8").read())["entries"]
    if args.missing:
        have = {conv_select.ConvKey.from_json(e["key"]) for e in entries}
        keys = [k for k in keys if k not in have]
    if args.strided:
        keys = [k for k in keys if k.kind == "conv" and max(k.strides) > 1]
    if args.winograd:
        keys = [k for k in keys if k.kind == "conv"
                and conv_split.winograd_ok(k.kernel, k.strides, k.dilation)]
    if args.order == "flops":
        keys = sorted(keys, key=conv_tune.pass_flops, reverse=True)
    if args.limit:
        keys = keys[:args.limit]
    max_buffer = int(args.max_buffer_gb * 2 ** 30)
    full = [i for i in args.full.split(",") if i]
    machine = f"{os.cpu_count()} cores; jax {jax.__version__}; malloc {args.malloc}"
    print(f"{len(keys)} layer shapes", flush=True)
    for i, key in enumerate(keys):
        t0 = time.perf_counter()
        entry = conv_tune.tune_key(key, args.reps, full, max_buffer_bytes=max_buffer)
        # Replace this shape's old entry only now: an interrupted run keeps the rest.
        entries = [e for e in entries if conv_select.ConvKey.from_json(e["key"]) != key]
        entries.append(entry)
        atomic_write_text(args.out, json.dumps({"machine": machine, "entries": entries},
                                               indent=1))
        desc = (f"{key.kind} b{key.batch} {key.spatial} {key.cin}->{key.cout} k{key.kernel} "
                f"s{key.strides} ({3 * conv_tune.pass_flops(key) / 1e9:.1f} GFLOP)")
        passes = "".join(f" {p}={ms}" for p, ms in entry.get("passes", {}).items())
        print(f"[{i + 1}/{len(keys)}] {desc}:{passes} full: "
              + ", ".join(f"{k} {v:.1f}" for k, v in entry["ms"].items())
              + f" -> {entry['best']} ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
