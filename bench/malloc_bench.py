"""Page faults, resident memory and seconds per train step under each malloc setting.

XLA:CPU allocates a step's temporaries afresh at every call; whether glibc hands the same
pages back or the kernel has to fault in (and zero) new ones decides a large part of a big
step's time (``lungjax.models.conv.malloc``). Each setting runs in its own process (glibc
reads them before JAX starts its threads), the benchmark network's jitted step
(``bench/conv_nets.py``) ``--steps`` times after compiling:

* ``default``: glibc's defaults;
* ``trim2g``: ``keep_freed_memory()`` but with the largest positive trim threshold mallopt
  takes (2 GiB), the setting before trimming was switched off;
* ``keep``: ``keep_freed_memory()`` (shared heap, no mmap, trimming off);
* ``thp``: glibc's defaults but large blocks on transparent huge pages
  (``glibc.malloc.hugetlb=1`` alone, ``THP_ENV``): still mapped and unmapped per call, but
  faulted 2 MiB at a time;
* ``env``: ``MALLOC_ENV`` alone (tunables incl. transparent huge pages; trimming at 4 GiB);
* ``env+keep``: ``MALLOC_ENV`` and ``keep_freed_memory()``, what ``conv_vs_torch`` and
  ``step_profile`` run under (``reexec_with_malloc_env``).

Prints per step: seconds, minor page faults, peak resident set; then the median of the
steps after the first two (the heap settles by then).

Usage:
  python bench/malloc_bench.py [--net fpr] [--steps 6] [--modes default,trim2g,keep,env,env+keep]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

MODES = ("default", "trim2g", "keep", "thp", "env", "env+keep")


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--net", default="fpr")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    return p.parse_args()


def child(mode: str, net: str, steps: int) -> None:
    """One setting, in this process: prints one JSON line per step."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from lungjax.models.conv import malloc as conv_malloc

    if mode in ("keep", "trim2g", "env+keep"):
        conv_malloc.keep_freed_memory()
    if mode == "trim2g":
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(conv_malloc._M_TRIM_THRESHOLD, 2 ** 31 - 1)
    import resource
    import time

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import conv_nets

    jstep, args = conv_nets.train_step(net, conv_nets.NETS[net][2])
    compiled = jstep.lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    for i in range(steps):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        args[0], args[1], args[2], loss = compiled(*args)
        loss.block_until_ready()
        sec = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        print(json.dumps({"step": i, "s": sec, "faults": r1.ru_minflt - r0.ru_minflt,
                          "rss_gb": r1.ru_maxrss / 1e6, "temp_gb": temp / 1e9}), flush=True)


def main():
    args = _parse()
    if args.child:
        child(args.child, args.net, args.steps)
        return
    from lungjax.models.conv.malloc import MALLOC_ENV, THP_ENV

    print(f"{args.net}: {args.steps} steps per setting, each setting in a fresh process")
    summary = []
    for mode in [m for m in args.modes.split(",") if m]:
        if mode not in MODES:
            raise SystemExit(f"--modes: unknown setting {mode!r}; expected some of {MODES}")
        env = dict(os.environ)
        env.pop("GLIBC_TUNABLES", None)
        if mode.startswith("env"):
            env.update(MALLOC_ENV)
        elif mode == "thp":
            env.update(THP_ENV)
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode,
                              "--net", args.net, "--steps", str(args.steps)], env=env,
                             capture_output=True, text=True, check=False)
        if out.returncode:
            raise SystemExit(f"setting {mode}: the step process failed:\n{out.stderr[-3000:]}")
        rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        print(f"\n{mode} (XLA temporaries {rows[0]['temp_gb']:.2f} GB):")
        for r in rows:
            print(f"  step {r['step']}: {r['s']:7.3f} s  {r['faults']:9d} page faults  "
                  f"peak resident {r['rss_gb']:.1f} GB")
        settled = [r["s"] for r in rows[2:]] or [rows[-1]["s"]]
        summary.append((mode, statistics.median(settled), rows[-1]["faults"],
                        rows[-1]["rss_gb"]))
    print("\n| setting | median s/step (steps 3..) | faults, last step | peak resident GB |")
    print("|---|---|---|---|")
    for mode, med, faults, rss in summary:
        print(f"| {mode} | {med:.3f} | {faults} | {rss:.1f} |")


if __name__ == "__main__":
    main()
