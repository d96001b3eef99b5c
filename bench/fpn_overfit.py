"""xie2018 detector end to end on toy patches: bright spheres in noise.

    python bench/fpn_overfit.py                      # 300 steps, 32^3 patches, batch 4
    python bench/fpn_overfit.py --steps 600 --size 48

Trains a narrow ``XieFPN`` with the ``xie2018_detection`` task (sphere-IoU targets, OHEM
k = 5, smooth L1) on freshly drawn patches, each holding one sphere (diameter 4-14 voxels)
or none, then decodes held-out patches (sigmoid, sphere-IoU NMS) and prints: loss at the
start and end, sensitivity (best detection within the sphere's radius), false positives per
patch at the threshold, and the mean absolute error of centre and diameter of the hits.
This checks that targets, loss, gradient and decoding agree; it is no LUNA16 figure.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lungjax.models.resnet_fpn import XieFPN
from lungjax.tasks.anchors import AnchorDetectionTask
from lungjax.tasks.anchors_decode import decode_dense, select_candidates


def draw(rng: np.random.Generator, n: int, size: int, p_empty: float = 0.25):
    """n patches (n, S, S, S, 1) float32, sphere centres (n, 3), diameters (n,) (0 = none)."""
    g = np.arange(size, dtype=np.float32)
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    img = np.clip(rng.normal(0.1, 0.05, (n, size, size, size)), 0, 1).astype(np.float32)
    centres = rng.uniform(6, size - 7, (n, 3)).astype(np.float32)
    diam = rng.uniform(4, 14, n).astype(np.float32)
    diam[rng.random(n) < p_empty] = 0.0
    for i in range(n):
        if diam[i] > 0:
            c = centres[i]
            inside = (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= (diam[i] / 2) ** 2
            img[i][inside] = 0.8
    return img[..., None], centres, diam


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval", type=int, default=64, help="held-out patches")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    model = XieFPN(stem_features=8, stage_features=(16, 16, 16), stage_blocks=(1, 1, 1),
                   fpn_features=16, head_features=16)
    task = AnchorDetectionTask(heads=model.heads())
    rng = np.random.default_rng(args.seed)
    s = args.size
    key = jax.random.key(args.seed, impl="rbg")
    variables = jax.jit(model.init)(key, jnp.zeros((1, s, s, s, 1)))
    tx = optax.adam(args.lr)
    params, stats = variables["params"], variables["batch_stats"]
    opt = tx.init(params)

    @jax.jit
    def step(params, stats, opt, rng_key, x, offset, diam):
        batch = {"offset_zyx": offset, "diameter_mm": diam}

        def loss_fn(p):
            out, new = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                   rngs={"rrelu": rng_key}, mutable=["batch_stats"])
            return task.per_sample_loss(out, batch).mean(), new
        (loss, new), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), new["batch_stats"], opt, loss

    t0 = time.perf_counter()
    losses = []
    for i in range(args.steps):
        x, c, d = draw(rng, args.batch, s)
        offset = c - (s - 1) / 2.0
        params, stats, opt, loss = step(params, stats, opt, jax.random.fold_in(key, i),
                                        jnp.asarray(x), jnp.asarray(offset), jnp.asarray(d))
        losses.append(float(loss))
    train_s = time.perf_counter() - t0
    k = max(1, args.steps // 10)
    print(f"train: {args.steps} steps of {args.batch} x {s}^3 in {train_s:.1f} s; "
          f"loss first {k} steps {np.mean(losses[:k]):.3f}, last {k} {np.mean(losses[-k:]):.3f}")

    predict = jax.jit(lambda v, x: decode_dense(model.apply(v, x), task.cfg))
    x, c, d = draw(np.random.default_rng(args.seed + 1), args.eval, s)
    hits, fps, n_pos, cerr, derr = 0, 0, 0, [], []
    for i in range(args.eval):
        sc, ce, di = (np.asarray(v)[0] for v in
                      predict({"params": params, "batch_stats": stats}, x[i:i + 1]))
        det = select_candidates(sc, ce, di, threshold=args.threshold, iou_threshold=0.1)
        if d[i] > 0:
            n_pos += 1
            dist = np.linalg.norm(det.centre_zyx - c[i], axis=1) if len(det) else np.zeros(0)
            near = np.flatnonzero(dist <= d[i] / 2)
            if len(near):
                hits += 1
                j = near[0]  # the best-scored detection that hits
                cerr.append(dist[j])
                derr.append(abs(det.diameter[j] - d[i]))
            fps += len(det) - len(near)
        else:
            fps += len(det)
    print(f"eval on {args.eval} patches ({n_pos} with a sphere), threshold {args.threshold}: "
          f"sensitivity {hits / max(n_pos, 1):.3f}, FPs per patch {fps / args.eval:.2f}, "
          f"centre error {np.mean(cerr) if cerr else float('nan'):.2f} vox, "
          f"diameter error {np.mean(derr) if derr else float('nan'):.2f} vox")


if __name__ == "__main__":
    main()
