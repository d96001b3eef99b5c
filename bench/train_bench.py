"""Train-step throughput of the dou2017 screening FCN through the engine's sharded step.

Prints compile time, steps/s and patches/s (median over timed steps after warm-up) for
each convolution formulation asked for. Random patches (10, 30, 30) with random labels:
the step's cost does not depend on the data. On a shared machine the numbers are noisy.

    python bench/train_bench.py                       # default widths, batch 64
    python bench/train_bench.py --batch=128 --steps=10 --impl=xla,auto --osf=0
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lungjax import sharding as shd  # noqa: E402
from lungjax.models.fcn import Dou2017FCN  # noqa: E402
from lungjax.state import create_train_state, make_optimizer, param_count  # noqa: E402
from lungjax.steps import make_train_step  # noqa: E402
from lungjax.tasks.classification import ClassificationTask  # noqa: E402


def bench(impl: str, batch: int, steps: int, warmup: int, osf: bool, dtype: str,
          features) -> dict:
    model = Dou2017FCN(features=features, conv_impl=impl,
                       dtype=None if dtype == "float32" else jnp.bfloat16)
    task = ClassificationTask()
    tx = make_optimizer({"name": "adam", "learning_rate": 1e-3}, steps + warmup)
    mesh = shd.make_mesh()
    init = functools.partial(create_train_state, model, tx, jnp.zeros((1, 10, 30, 30, 1)))
    state, shardings, _ = shd.create_sharded_state(init, jax.random.key(0, impl="rbg"), mesh)
    step = make_train_step(model, task, tx, osf={"enabled": osf}, state_shardings=shardings,
                           mesh=mesh)
    rng = np.random.default_rng(0)
    host = {"image": rng.random((batch, 10, 30, 30, 1), dtype=np.float32),
            "label": rng.integers(0, 2, batch).astype(np.int32)}
    gb = shd.to_global_batch(host, mesh)
    t0 = time.perf_counter()
    compiled = step.lower(state, gb).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, m, _ = compiled(state, gb)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m, _ = compiled(state, gb)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    med = float(np.median(times))
    return {"impl": impl, "dtype": dtype, "batch": batch, "osf": osf,
            "devices": jax.device_count(), "params": param_count(state.params),
            "compile_s": round(compile_s, 2), "step_s_median": round(med, 4),
            "steps_per_s": round(1 / med, 3), "patches_per_s": round(batch / med, 1),
            "final_loss": float(m["loss"])}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--impl", default="auto,xla", help="comma-separated Conv impl names")
    p.add_argument("--osf", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--features", default="64,64,150,150")
    a = p.parse_args()
    features = tuple(int(f) for f in a.features.split(","))
    print(f"jax {jax.__version__}, {jax.device_count()} device(s) "
          f"({jax.devices()[0].platform}), cpu count {os.cpu_count()}", flush=True)
    for impl in a.impl.split(","):
        r = bench(impl, a.batch, a.steps, a.warmup, bool(a.osf), a.dtype, features)
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
