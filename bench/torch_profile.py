"""Where one train step of a benchmark network's PyTorch twin spends its time, per
operation and input shape: the counterpart of ``bench/step_profile.py`` for the torch side
of ``bench/conv_vs_torch.py`` (same network, batch, loss, Adam, channels-last, 2 threads).

Needs ``pip install torch==2.13.0`` (a benchmark-only extra, never a lungjax dependency).

Usage:
  python bench/torch_profile.py [--net fpr] [--top 25] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--net", default="fpr")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    import conv_nets
    import nets_torch
    import torch
    from torch.profiler import profile

    if args.net not in nets_torch.NETS:
        raise SystemExit(f"--net: unknown network {args.net!r}; expected one of "
                         f"{sorted(nets_torch.NETS)}")
    torch.set_num_threads(args.threads)
    _, shape, batch = conv_nets.NETS[args.net]
    run, _ = nets_torch.train_step(args.net, shape, batch)

    run()  # warm-up
    t0 = time.perf_counter()
    run()
    print(f"{args.net} batch {batch}, torch {torch.__version__}, {args.threads} threads: "
          f"step {time.perf_counter() - t0:.3f} s (unprofiled)")
    with profile(record_shapes=True) as prof:
        run()
    print(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=32,
        max_shapes_column_width=100))


if __name__ == "__main__":
    main()
