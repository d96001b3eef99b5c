"""How well a yu2021 run's ResNet50 ranks benign against malignant nodule ROIs, on its
own training ROIs and on the held-out ones, beside the annotated diameter alone.

An underfit classifier and a broken evaluation look alike in the held-out figures; the
training ROIs tell them apart (the network near chance on the ROIs it trained on is
underfit), and batch statistics against running averages tell whether batch
normalisation's averages are the problem. The diameter is the yardstick: size is what the
generated nodules' malignancy shows most.

    python bench/yu2021_roi_check.py --workdir=RUN

RUN is a yu2021 main job's ``--workdir``: its ``cls`` stage folder holds the network and
the stage's own config (``config.json``: the store, the fold, the ROI size). Prints, for
the training and the held-out ROIs with a label (median malignancy 1-2 benign, 4-5
malignant, 3 per ``data.malignancy_uncertain``): count, malignant count, the network's
accuracy and ROC AUC with running averages and with each set's batch statistics, and the
ROC AUC of the diameter; then the diameter alone as a classifier (the cls stage's
``size_rule`` evaluator: its threshold fitted on the training ROIs, its figures on the
held-out ones).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import ml_collections
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    args = p.parse_args()

    from lungjax import stages, train as train_lib
    from lungjax.data.dense_sampling import RoiTrainData
    from lungjax.data.store import PatchStore
    from lungjax.evaluation.classification import roc_auc
    from lungjax.evaluation.evaluators import SizeRuleEvaluator
    from lungjax.steps import forward_apply
    from lungjax.train_data import held_out_uids, prepare_data

    cls_dir = os.path.join(args.workdir, "cls")
    with open(os.path.join(cls_dir, "config.json"), encoding="utf-8") as f:
        cfg = ml_collections.ConfigDict(json.load(f))
    model, task = train_lib.build_model(cfg), train_lib.build_task(cfg)
    variables, step = stages.restore_variables(cls_dir)
    store = PatchStore.open(prepare_data(cfg))
    test = held_out_uids(cfg, store)
    train = [u for u in store.uids() if u not in set(test)]
    size = tuple(int(v) for v in cfg.data.patch_size_zyx)

    @jax.jit
    def running(v, x):  # (B, *size, 1) -> (B,) malignant probability
        return task.probabilities(task.logits(forward_apply(model, v, x)))

    @jax.jit
    def batch_stats(v, x):  # the same with the batch's own statistics
        out, _ = model.apply(v, x, train=True, mutable=["batch_stats"],
                             rngs={"dropout": jax.random.key(0)})
        return task.probabilities(task.logits(out))

    print(f"{args.workdir}/cls at step {step}, ROIs {size}")
    # The stage's own ROIs: training ones without the held-out nodules' patients.
    data = RoiTrainData(cfg, store, train, test)
    held = data.eval_index.samples[data.eval_index.samples["weight"] > 0]
    for name, rows, uids in (("training", data.sampler.pool, data.sampler.uids),
                             ("held-out", held, data.eval_index.uids)):
        x = np.stack([store.read_patch(uids[int(r["scan"])],
                                       np.rint(r["center_zyx"]).astype(np.int64), size)
                      for r in rows])[..., None].astype(np.float32)
        y = rows["label"].astype(np.int64)
        s1 = np.concatenate([np.asarray(running(variables, x[i:i + 32]))
                             for i in range(0, len(x), 32)])
        s2 = np.asarray(batch_stats(variables, x))
        print(f"{name}: {len(y)} ROIs, {int(y.sum())} malignant; running averages accuracy "
              f"{np.mean((s1 > 0.5) == y):.3f} AUC {roc_auc(y, s1):.3f}; batch statistics "
              f"accuracy {np.mean((s2 > 0.5) == y):.3f} AUC {roc_auc(y, s2):.3f}; diameter "
              f"AUC {roc_auc(y, rows['diameter_mm'].astype(np.float64)):.3f}", flush=True)
    rule = SizeRuleEvaluator(n_bootstrap=1000, seed=int(cfg.seed))(None, None, data)
    print(f"diameter alone: malignant from {rule['threshold_mm']:.1f} mm (fitted on the "
          f"training ROIs); held-out accuracy {rule['accuracy']:.3f} "
          f"({rule['accuracy_lo']:.3f}-{rule['accuracy_hi']:.3f}), AUC {rule['roc_auc']:.3f}, "
          f"specificity {rule['specificity']:.3f}", flush=True)


if __name__ == "__main__":
    main()
