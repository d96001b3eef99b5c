"""The "segmentation" and "classification" evaluators end to end on a fake engine/data
pair (a tiny jitted model on the 8-device CPU mesh), against the pure metric functions
applied to the same predictions."""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from lungjax import sharding as shd
from lungjax.evaluation.classification import FIGURES, classification_record
from lungjax.evaluation.evaluators import (ClassificationEvaluator, SegmentationEvaluator,
                                          SizeRuleEvaluator)
from lungjax.evaluation.segmentation import SegmentationPool
from lungjax.registry import EVALUATORS
from lungjax.tasks.classification import ClassificationTask
from lungjax.tasks.segmentation import SegmentationTask

BATCH = 8  # one row per simulated device


class TinyConv(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Conv(self.features, (3,) * (x.ndim - 2), padding="SAME")(x)


class TinyDense(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(self.features)(x.reshape(x.shape[0], -1))


def _centre_kernel(params, features):
    """A kernel that maps an image x in [0, 1] to the foreground logit 12 x - 6 (the
    centre tap only), so predictions follow the image."""
    k = np.zeros(params["Conv_0"]["kernel"].shape, np.float32)
    centre = tuple(s // 2 for s in k.shape[:-2])
    k[centre + (0, features - 1)] = 12.0
    b = np.zeros(features, np.float32)
    b[-1] = -6.0
    return {"Conv_0": {"kernel": jnp.asarray(k), "bias": jnp.asarray(b)}}


def _engine(model, task, spacing_zyx=(2.5, 0.7, 0.7)):
    """What the evaluators use of ``lungjax.train.Engine``: mesh, config, eval_step."""

    @jax.jit
    def core(params, batch):
        x = batch["image"][..., None]
        out = model.apply({"params": params}, x)
        w = batch["weight"]
        losses = task.per_sample_loss(out, batch)
        metrics = {"loss": jnp.sum(w * losses), "weight": jnp.sum(w)}
        for k, v in task.per_sample_metrics(out, batch).items():
            metrics[k] = jnp.sum(w * v)
        return metrics, {"loss": losses, "weight": w, **task.host_outputs(out, batch)}

    def eval_step(state, batch):
        return (state, *core(state, batch))

    config = ConfigDict({"data": {"spacing_zyx": spacing_zyx}})
    return types.SimpleNamespace(mesh=shd.make_mesh(), config=config, eval_step=eval_step,
                                 model=model, task=task)


class FakeData:
    """Held-out samples in batches of 8; the last batch padded with weight-0 rows."""

    def __init__(self, **arrays):
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.n = len(next(iter(self.arrays.values())))

    def eval_batches(self):
        for start in range(0, self.n, BATCH):
            ids = np.arange(start, min(start + BATCH, self.n))
            pad = BATCH - ids.size
            idx = np.concatenate([ids, np.zeros(pad, ids.dtype)])
            batch = {k: v[idx] for k, v in self.arrays.items()}
            batch["weight"] = np.r_[np.ones(ids.size), np.zeros(pad)].astype(np.float32)
            yield batch


def _seg_case(shape, n, seed):
    rng = np.random.default_rng(seed)
    from scipy import ndimage

    img = ndimage.gaussian_filter(rng.random((n, *shape)), 1.0, axes=range(1, len(shape) + 1))
    img = (img - img.min()) / (img.max() - img.min())
    mask = (img + rng.normal(0, 0.05, img.shape) > 0.55).astype(np.uint8)
    mask[0] = 0                                       # an empty target
    return img.astype(np.float32), mask


def _expected_seg(model, params, task, img, mask, spacings):
    prob = np.asarray(task.probabilities(model.apply({"params": params}, img[..., None])))
    pool = SegmentationPool(0.5)
    for i in range(len(img)):
        pool.add(prob[i], mask[i].astype(bool), spacings[i])
    return pool.mean(), pool.pooled()


def _check_seg(out, mean, pooled, n):
    assert list(out)[0] == "loss" and list(out)[-1] == "count" and out["count"] == n
    for k in ("dice", "iou", "precision", "recall", "pixel_auc", "hd_mm", "hd95_mm"):
        assert out[k] == pytest.approx(mean[k], rel=1e-6, abs=1e-9), k
        assert out[f"pooled_{k}"] == pytest.approx(pooled[k], rel=1e-6, abs=1e-9), k
    assert out["hd_undefined"] == pooled["n_hd_undefined"]


def test_segmentation_evaluator_2d_spacing_from_config():
    img, mask = _seg_case((12, 12), 13, 0)
    model, task = TinyConv(1), SegmentationTask(num_classes=1, loss="bce_dice")
    params = _centre_kernel(model.init(jax.random.key(0), img[:1, ..., None])["params"], 1)
    engine = _engine(model, task)
    ev = EVALUATORS.get("segmentation")(name="seg", every_steps=5)
    assert isinstance(ev, SegmentationEvaluator)
    out = ev(engine, params, FakeData(image=img, mask=mask))
    mean, pooled = _expected_seg(model, params, task, img, mask, [(0.7, 0.7)] * 13)
    _check_seg(out, mean, pooled, 13)
    assert 0.3 < out["dice"] < 1.0 and out["hd_undefined"] >= 1   # sample 0: empty target
    losses = task.per_sample_loss(model.apply({"params": params}, img[..., None]),
                                  {"mask": mask})
    assert out["loss"] == pytest.approx(float(np.mean(losses)), rel=1e-5)
    # An explicit spacing overrides the config's.
    out2 = SegmentationEvaluator(spacing=(1.4, 1.4))(engine, params,
                                                     FakeData(image=img, mask=mask))
    assert out2["hd_mm"] == pytest.approx(2 * out["hd_mm"], rel=1e-6)


def test_segmentation_evaluator_3d_softmax_spacing_in_batch():
    img, mask = _seg_case((4, 8, 8), 9, 1)
    model, task = TinyConv(2), SegmentationTask(num_classes=2, loss="bce_then_dice",
                                                switch_step=3)
    params = _centre_kernel(model.init(jax.random.key(1), img[:1, ..., None])["params"], 2)
    spacing = np.tile(np.float32([[2.5, 0.7, 0.7]]), (9, 1))
    spacing[4:] = [1.25, 0.5, 0.5]
    step = np.zeros(9, np.int32)                      # the schedule's step, per row here
    data = FakeData(image=img, mask=mask, spacing=spacing, step=step)
    out = SegmentationEvaluator()(_engine(model, task, (9.0, 9.0, 9.0)), params, data)
    mean, pooled = _expected_seg(model, params, task, img, mask, spacing)
    _check_seg(out, mean, pooled, 9)


def test_segmentation_evaluator_needs_maps():
    model, task = TinyDense(2), ClassificationTask()
    img = np.zeros((8, 4, 4), np.float32)
    params = model.init(jax.random.key(0), img)["params"]
    with pytest.raises(ValueError, match="'probability' and 'mask'"):
        SegmentationEvaluator(name="s")(_engine(model, task), params,
                                        FakeData(image=img, label=np.zeros(8, np.int32)))


@pytest.mark.parametrize("num_classes", [2, 3])
def test_classification_evaluator(num_classes):
    rng = np.random.default_rng(num_classes)
    n = 37
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    img = (rng.normal(size=(n, 4, 4)) + labels[:, None, None]).astype(np.float32)
    model, task = TinyDense(num_classes), ClassificationTask(num_classes=num_classes)
    params = model.init(jax.random.key(2), img[:1])["params"]
    ev = EVALUATORS.get("classification")(name="cls", n_bootstrap=40, seed=3)
    assert isinstance(ev, ClassificationEvaluator)
    out = ev(_engine(model, task), params, FakeData(image=img, label=labels))
    prob = np.asarray(jax.nn.softmax(model.apply({"params": params}, img[..., None]), -1))
    scores = prob[:, 1] if num_classes == 2 else prob
    rec = classification_record(labels, scores, seed=3, n_bootstrap=40)
    assert list(out)[0] == "loss" and out["count"] == n
    for k in FIGURES:
        assert out[k] == pytest.approx(rec[k], rel=1e-5), k
        assert out[f"{k}_lo"] == pytest.approx(rec["ci"][k][0], rel=1e-5), k
        assert out[f"{k}_hi"] == pytest.approx(rec["ci"][k][1], rel=1e-5), k
        assert out[f"{k}_lo"] <= out[k] <= out[f"{k}_hi"]
    again = ev(_engine(model, task), params, FakeData(image=img, label=labels))
    assert again == out                                # seeded: the same intervals


def test_segmentation_task_screening_through_the_classification_evaluator():
    # The segmentation task's host "score" (largest foreground probability) and "label"
    # (target not empty) give a slice screening figure (Shrey et al.: max pixel > 0.35).
    img, mask = _seg_case((12, 12), 10, 2)
    model, task = TinyConv(1), SegmentationTask(loss="bce")
    params = _centre_kernel(model.init(jax.random.key(0), img[:1, ..., None])["params"], 1)
    out = ClassificationEvaluator(n_bootstrap=10, threshold=0.35)(
        _engine(model, task), params, FakeData(image=img, mask=mask))
    prob = np.asarray(task.probabilities(model.apply({"params": params}, img[..., None])))
    rec = classification_record(mask.reshape(10, -1).any(1).astype(int),
                                prob.reshape(10, -1).max(1), seed=0, n_bootstrap=10,
                                threshold=0.35)
    assert out["accuracy"] == pytest.approx(rec["accuracy"])


def test_evaluators_built_from_config():
    from lungjax.train import build_evaluators

    config = ConfigDict({"evals": {
        "seg": dict(type="segmentation", every_steps=4, threshold=0.4, spacing=(1.0, 1.0)),
        "cls": dict(type="classification", every_steps=0, n_bootstrap=100, seed=1),
        "size": dict(type="size_rule", n_bootstrap=20)}})
    evs = {ev.name: ev for ev in build_evaluators(config)}
    seg, cls = evs["seg"], evs["cls"]
    assert (seg.name, seg.every_steps, seg.threshold, seg.spacing) == ("seg", 4, 0.4,
                                                                       (1.0, 1.0))
    assert (cls.name, cls.n_bootstrap, cls.seed) == ("cls", 100, 1)
    assert isinstance(evs["size"], SizeRuleEvaluator) and evs["size"].n_bootstrap == 20


def _roi_rows(diameter, label, weight=1.0):
    from lungjax.data.sampler import SAMPLE_DTYPE

    rows = np.zeros(len(diameter), SAMPLE_DTYPE)
    rows["diameter_mm"], rows["label"], rows["weight"] = diameter, label, weight
    return rows


def test_size_rule_fits_on_training_rois_and_scores_held_out_ones():
    """The diameter-alone yardstick: threshold from the training pool only (a held-out set
    that would move it does not), figures of the held-out ROIs, padding rows ignored."""
    train = _roi_rows([4.0, 5.0, 6.0, 7.0, 12.0, 14.0, 20.0, 25.0], [0, 0, 0, 0, 1, 1, 1, 1])
    held = np.concatenate([_roi_rows([5.0, 11.0, 30.0, 9.0, 13.0], [0, 0, 1, 1, 1]),
                           _roi_rows([40.0], [0], weight=0.0)])  # padding
    data = types.SimpleNamespace(sampler=types.SimpleNamespace(pool=train),
                                 eval_index=types.SimpleNamespace(samples=held))
    out = SizeRuleEvaluator(n_bootstrap=50, seed=3)(None, None, data)
    assert out["threshold_mm"] == 9.5 and out["count"] == 5
    # >= 9.5 mm malignant: 11 (benign) wrong, 9 (malignant) wrong: 3 of 5 right.
    rec = classification_record([0, 0, 1, 1, 1], [5.0, 11.0, 30.0, 9.0, 13.0], seed=3,
                                n_bootstrap=50, threshold=9.5)
    for k in FIGURES:
        assert out[k] == pytest.approx(rec[k])
        assert out[f"{k}_lo"] <= out[k] <= out[f"{k}_hi"]
    assert out["accuracy"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="nodule_roi"):
        SizeRuleEvaluator()(None, None, types.SimpleNamespace(eval_index=None))
