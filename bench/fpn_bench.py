"""xie2018 detector: parameter count, training-step and whole-volume detection timings.

    python bench/fpn_bench.py                       # default net, 96^3 patches, batch 1
    python bench/fpn_bench.py --size 64 --steps 3 --volume 128,160,160

Prints: parameters; anchors per patch; compile and median time of one training step
(forward, target assignment, OHEM loss, gradient, SGD update); median time of
target assignment alone; seconds for one whole-volume detection (network + decoding +
sphere NMS) on a random volume. CPU timings depend on the machine's load.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lungjax.models.resnet_fpn import XieFPN
from lungjax.tasks.anchors import AnchorDetectionTask, anchor_table, assign_targets
from lungjax.tasks.anchors_decode import detect_volume


def _timed(fn, *args, steps: int):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return out, first, statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=96, help="patch edge (voxels)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed repetitions after the first")
    p.add_argument("--volume", default="", help="D,H,W of a detection volume ('' = skip)")
    p.add_argument("--conv-impl", default="auto")
    args = p.parse_args()

    model = XieFPN(conv_impl=args.conv_impl)
    task = AnchorDetectionTask(heads=model.heads())
    s = args.size
    x = jnp.asarray(np.random.default_rng(0).random((args.batch, s, s, s, 1)), jnp.float32)
    key = jax.random.key(0, impl="rbg")
    variables = jax.jit(model.init)(key, x)
    n_params = sum(int(a.size) for a in jax.tree_util.tree_leaves(variables["params"]))
    print(f"device: {jax.devices()[0].device_kind}; backend {jax.default_backend()}")
    print(f"parameters: {n_params:,}")
    print(f"anchors per {s}^3 patch: {task.cfg.num_anchors((s, s, s)):,}")

    batch = {"offset_zyx": jnp.zeros((args.batch, 3)),
             "diameter_mm": jnp.full((args.batch,), 8.0)}
    tx = optax.sgd(1e-3, momentum=0.9)
    opt = tx.init(variables["params"])

    @jax.jit
    def train_step(params, stats, opt, rng):
        def loss_fn(p):
            out, new = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                   rngs={"rrelu": rng}, mutable=["batch_stats"])
            return task.per_sample_loss(out, batch).mean(), new
        (loss, new), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), new["batch_stats"], opt, loss

    _, first, med = _timed(train_step, variables["params"], variables["batch_stats"], opt,
                           key, steps=args.steps)
    print(f"train step {s}^3 x {args.batch}: first (compile + run) {first:.2f} s, "
          f"median {med:.3f} s")

    anc_c, anc_d = anchor_table(task.cfg, (s, s, s))
    assign = jax.jit(lambda c, d: assign_targets(anc_c, anc_d, c, d, task.cfg)[0])
    nod_c = jnp.asarray([[s / 2, s / 2, s / 2], [10.0, 20.0, 30.0], [0, 0, 0], [0, 0, 0]])
    nod_d = jnp.asarray([8.0, 20.0, 0.0, 0.0])
    _, _, med = _timed(assign, nod_c, nod_d, steps=args.steps)
    print(f"target assignment ({len(anc_d):,} anchors, 4 nodule slots): median {med*1e3:.1f} ms")

    if args.volume:
        shape = tuple(int(v) for v in args.volume.split(","))
        vol = np.random.default_rng(1).random(shape).astype(np.float32)
        apply = lambda v, xx: model.apply(v, xx)  # noqa: E731
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            det = detect_volume(apply, vol, task.cfg, variables=variables, threshold=0.5)
            times.append(time.perf_counter() - t0)
        print(f"detect_volume {shape}: first {times[0]:.2f} s, second {times[1]:.2f} s, "
              f"{len(det)} detections")


if __name__ == "__main__":
    main()
