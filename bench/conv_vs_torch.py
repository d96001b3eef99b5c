"""Full train step (forward + backward + Adam) of the benchmark networks (``conv_nets``: four
networks shaped like the methods' and lungjax's own dou2017 stage-2 network) in JAX (native
XLA convolutions and the CPU-fast formulations) and PyTorch eager (float32, channels-last),
same process, same thread count; plus full-scan inference of the detector-like net.
Each network runs in a fresh process of its own (as a training run would): in one process
the heap left behind by a previous network changes the next one's step time (the residual
FP net's JAX step took 8.10 s after lungjax's stage-2 net in the same process, 6.46 s
alone); ``--same-process`` runs them all in this one.

Usage:
  python bench/conv_vs_torch.py [--nets fcn,fpr,det,unet,dou2017_fpr] [--steps 3] [--threads 2]
      (also: sathish_unet, sumnet_adv: sathish2020's U-Net, and its SUMNet + Turing-test
      discriminator in lungjax's own alternating step; res_unet3d, resnet50_3d: yu2021's
      3D Res U-Net and 3D ResNet50)
                                [--rounds 4] [--warmup 3] [--jax-impls xla,auto]
                                [--scan 300 | --small | --scan 0] [--same-process]

``--jax-impls`` lists global overrides (``lungjax.models.layers.set_conv_impl``): "xla" is
XLA's native convolution, "auto" the per-layer choice from the shipped table
``lungjax/models/conv/table.json`` alone (``LUNGJAX_CONV_TUNE=0``), "tuned" the per-layer
choice this machine measured (``lungjax.models.conv.select``: its cache, and the shapes it
lacks measured now, up to ``TUNED_SECONDS`` each; the seconds spent are printed as the
network's tuning time, 0 when the cache held every shape), "im2col"/"matmul"/"hybrid"
force one formulation everywhere. ``--jax-impls auto,tuned`` gives the ratio with the
shipped table and with the machine's own tuning, same run. Prints a table of median step
seconds and the ratio JAX / PyTorch (<= 1.0: JAX no slower). Timings on a shared machine
are noisy: medians of ``--rounds`` x ``--steps`` steps (default 4 x 3) after ``--warmup``
(3) untimed ones.

The frameworks alternate: every JAX formulation and PyTorch each run a block of
``--steps`` timed steps, ``--rounds`` times over (``--warmup`` untimed steps before each
one's first block), so that a slowdown of the machine part-way through hits both sides
instead of whichever runs last; the table also gives the lowest and highest per-round
ratio. On this project's 2-core machine the same JAX step has measured 0.247 and 0.270 s in
two sequential runs a minute apart, as much as separates some ratios from 1.0. Between
blocks the script sleeps ``conv_nets.PAUSE_S`` (untimed), long enough for the other framework's
worker threads to stop spinning (OpenMP's idle threads spin for up to ~0.2 s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nets", default="fcn,fpr,det,unet,dou2017_fpr")
    p.add_argument("--steps", type=int, default=3, help="timed steps per block")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=4,
                   help="alternate JAX and PyTorch blocks of --steps steps this many times")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--jax-impls", default="xla,auto")
    p.add_argument("--scan", type=int, default=300, help="full-scan edge (voxels), rounded "
                   "up to the detector's stride (16); 0 = skip")
    p.add_argument("--small", action="store_true", help="full-scan edge 128 instead of --scan")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--same-process", action="store_true",
                   help="all networks in this process (default: one fresh process each)")
    p.add_argument("--row-json", default="", help=argparse.SUPPRESS)  # a child's result
    p.add_argument("--batch", type=str, default="", help="override batch sizes: fcn=8,det=1")
    p.add_argument("--malloc", choices=("keep", "default"), default="keep",
                   help="keep: glibc keeps freed memory (lungjax.models.conv.malloc), for "
                   "both frameworks; default: glibc's defaults")
    return p.parse_args()


ARGS = _parse()
if ARGS.malloc == "keep":
    from lungjax.models.conv import malloc as conv_malloc

    # Before JAX or torch start their threads. Restarting with the environment form also
    # switches on transparent huge pages for malloc, which a running process cannot.
    conv_malloc.reexec_with_malloc_env()
# Same cores for both frameworks: XLA and torch size their pools from the affinity mask.
os.sched_setaffinity(0, list(sorted(os.sched_getaffinity(0)))[:ARGS.threads])
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import conv_nets  # noqa: E402
from conv_nets import SCAN_STRIDE, interleaved_times, median_seconds  # noqa: E402
from lungjax.models.layers import set_conv_impl  # noqa: E402


TUNED_SECONDS = 30.0  # per shape, for "tuned" (the first-use default is shorter)


def _count(tree):
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def _select_plans(impl: str) -> str:
    """Sets up ``impl`` ("auto": the shipped table only; "tuned": this machine's plans,
    measuring the missing shapes); returns the override ``set_conv_impl`` takes."""
    from lungjax.models.conv import select as conv_select

    if impl in ("auto", "tuned"):
        os.environ[conv_select.ENV_TUNE] = "1" if impl == "tuned" else "0"
        os.environ.setdefault(conv_select.ENV_TUNE_SECONDS, str(TUNED_SECONDS))
        os.environ[conv_select.ENV_TUNE_TOTAL] = "inf"
        return "auto"
    return impl


def _tuning_spent() -> float:
    from lungjax.models.conv import select as conv_select

    return conv_select._state.spent


def jax_train_step(name, impl, batch):
    """A function running one jitted train step to completion, its compile seconds (the
    tuning of "tuned" included: see ``_tuning_spent``) and the parameter count."""
    set_conv_impl(_select_plans(impl))
    if conv_nets.NETS[name][0] is None:
        jstep, args, n_params = conv_nets.engine_train_step(name, batch)
    else:
        jstep, args = conv_nets.train_step(name, batch)
        n_params = _count(args[0])
    t0 = time.perf_counter()
    compiled = jstep.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    set_conv_impl(None)

    def run():
        # The step returns the updated state (replacing the donated inputs) and the loss.
        *state, loss = compiled(*args)
        args[:len(state)] = state
        loss.block_until_ready()

    return run, compile_s, n_params


def torch_train_step(name, batch):
    """A function running one PyTorch train step, and the parameter count."""
    import nets_torch

    run, model = nets_torch.train_step(name, conv_nets.NETS[name][1], batch)
    return run, sum(p.numel() for p in model.parameters())


def jax_scan_seconds(impl, edge):
    """Seconds of one fully-convolutional forward pass of the detector over edge^3 (eval)."""
    from lungjax.steps import forward_apply

    model = conv_nets.Detector()
    set_conv_impl(_select_plans(impl))
    x = jnp.zeros((1, edge, edge, edge, 1), jnp.float32)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 16, 1)), train=False)
    f = jax.jit(lambda v, x: forward_apply(model, v, x))  # forward-only plans
    t0 = time.perf_counter()
    compiled = f.lower(variables, x).compile()
    compile_s = time.perf_counter() - t0
    x = jnp.asarray(np.random.default_rng(0).standard_normal(x.shape), jnp.float32)
    sec = median_seconds(lambda: jax.block_until_ready(compiled(variables, x)), 2, 1)
    set_conv_impl(None)
    return sec, compile_s


def torch_scan_seconds(edge):
    import nets_torch
    import torch

    model = nets_torch.Detector().to(memory_format=torch.channels_last_3d).eval()
    x = torch.randn(1, 1, edge, edge, edge).contiguous(memory_format=torch.channels_last_3d)

    def run():
        with torch.no_grad():
            model(x)
    return median_seconds(run, 2, 1)


def _row_in_child(name: str) -> dict:
    """One network's row, measured by this script in a fresh process."""
    argv, skip = [], False
    for a in sys.argv[1:]:  # drop --nets and --scan (the parent does the scan)
        if skip:
            skip = False
        elif a in ("--nets", "--scan"):
            skip = True
        elif not a.startswith(("--nets=", "--scan=")) and a != "--small":
            argv.append(a)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--nets", name,
                        "--scan", "0", "--row-json", out], check=True)
        with open(out, encoding="utf-8") as f:
            return json.load(f)


def main():
    impls = [i for i in ARGS.jax_impls.split(",") if i]
    batches = dict(kv.split("=") for kv in ARGS.batch.split(",") if kv)
    if not ARGS.no_torch:
        import torch
        torch.set_num_threads(ARGS.threads)
        if not ARGS.row_json:  # a child's parent has said it
            print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    cores = sorted(os.sched_getaffinity(0))
    if not ARGS.row_json:
        print(f"jax {jax.__version__} on {jax.default_backend()}, cores {cores}, "
              f"malloc {ARGS.malloc} (GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r})")
    rows = []
    names = [n for n in ARGS.nets.split(",") if n]
    for name in names:
        if len(names) > 1 and not ARGS.same_process:
            rows.append(_row_in_child(name))
            continue
        _, shape, batch = conv_nets.NETS[name]
        batch = int(batches.get(name, batch))
        row = {"net": f"{name} {'x'.join(map(str, shape[:-1]))} ({batch})"}
        counts, runs = set(), {}
        for impl in impls:
            spent = _tuning_spent()
            runs[impl], comp, n = jax_train_step(name, impl, batch)
            counts.add(n)
            tuned = _tuning_spent() - spent
            if impl == "tuned":
                row["tuning_s"] = round(tuned, 1)
            print(f"  {name:5s} jax[{impl}] compiled in {comp:.1f} s"
                  + (f", tuned in {tuned:.1f} s (while tracing)" if impl == "tuned" else "")
                  + f", {n} params", flush=True)
        if not ARGS.no_torch:
            runs["torch"], n = torch_train_step(name, batch)
            counts.add(n)
        if len(counts) != 1:
            raise SystemExit(f"parameter counts differ for {name}: {sorted(counts)}")
        times = interleaved_times(runs, ARGS.steps, ARGS.warmup, ARGS.rounds)
        for label, blocks in times.items():
            row[label] = statistics.median(t for b in blocks for t in b)
            print(f"  {name:5s} {'jax[' + label + ']' if label != 'torch' else 'torch':10s} "
                  f"{row[label]:.3f} s/step (per round: "
                  + ", ".join(f"{statistics.median(b):.3f}" for b in blocks) + ")", flush=True)
        if not ARGS.no_torch:
            row["round_ratios"] = {
                i: [statistics.median(a) / statistics.median(b)
                    for a, b in zip(times[i], times["torch"])] for i in impls}
        rows.append(row)
    if ARGS.row_json:
        with open(ARGS.row_json, "w", encoding="utf-8") as f:
            json.dump(rows[0], f)
        return

    cols = impls + ([] if ARGS.no_torch else ["torch"])
    spread = " (rounds: lowest-highest)" if ARGS.rounds > 1 else ""
    tuned = "tuned" in impls
    print(("\n| network (batch) | " + " | ".join(f"{c} s" for c in cols)
           + ("" if ARGS.no_torch else " | " + " | ".join(f"{i}/torch{spread}" for i in impls))
           + (" | tuning s" if tuned else "") + " |"))
    print("|---" * (1 + len(cols) + (0 if ARGS.no_torch else len(impls)) + tuned) + "|")
    for r in rows:
        cells = [f"{r[c]:.3f}" for c in cols]
        if not ARGS.no_torch:
            cells += [f"{r[i] / r['torch']:.2f}" + (
                f" ({min(r['round_ratios'][i]):.2f}-{max(r['round_ratios'][i]):.2f})"
                if ARGS.rounds > 1 else "") for i in impls]
        if tuned:
            cells.append(f"{r.get('tuning_s', 0):.0f}")
        print(f"| {r['net']} | " + " | ".join(cells) + " |")

    edge = 128 if ARGS.small else ARGS.scan
    if edge:
        # The detector halves the volume four times and adds up-sampled pyramid levels back,
        # which needs an edge divisible by 16: a 300^3 scan runs as 304^3, zero-padded at
        # the far end as lungjax.tasks.anchors_decode pads a scan for xie2018's detector.
        asked, edge = edge, -(-edge // SCAN_STRIDE) * SCAN_STRIDE
        print(f"\nfull-scan inference, detector, one pass over {edge}^3 (1 mm)"
              + (f", the {asked}^3 asked for padded" if edge != asked else "") + ":")
        for impl in impls:
            sec, comp = jax_scan_seconds(impl, edge)
            print(f"  jax[{impl}] {sec:.2f} s (compile {comp:.1f} s)", flush=True)
        if not ARGS.no_torch:
            print(f"  torch      {torch_scan_seconds(edge):.2f} s", flush=True)


if __name__ == "__main__":
    main()
