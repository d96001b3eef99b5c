"""Segmentation task (losses, schedule, metrics, host outputs) and the classification
task's class weights and multi-class outputs, on small hand-computed cases."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lungjax.evaluation.segmentation import dice, iou
from lungjax.registry import TASKS
from lungjax.tasks.classification import ClassificationTask, softmax_cross_entropy
from lungjax.tasks.segmentation import SegmentationTask


def _hard_logits(pred: np.ndarray, channels: int = 1) -> jnp.ndarray:
    """A 0/1 mask -> logits whose foreground probability is ~1 where ``pred`` is set."""
    z = np.where(pred, 8.0, -8.0).astype(np.float32)
    if channels == 1:
        return jnp.asarray(z[..., None])
    return jnp.asarray(np.stack([np.zeros_like(z), z], axis=-1))


@pytest.mark.parametrize("channels", [1, 2])
def test_hard_dice_and_iou_of_hand_made_masks(channels):
    t = np.zeros((2, 3, 4), np.uint8)
    p = np.zeros((2, 3, 4), bool)
    t[0, 0, :] = t[0, 1, :2] = 1                      # 6 voxels
    p[0, 0, 1:] = p[0, 2, 0] = True                   # 4 voxels, 3 shared
    # Sample 1: both empty -> 1 (a perfect answer).
    task = SegmentationTask(num_classes=channels)
    m = task.per_sample_metrics(_hard_logits(p, channels), {"mask": t})
    np.testing.assert_allclose(m["dice"], [0.6, 1.0], rtol=1e-6)
    np.testing.assert_allclose(m["iou"], [3 / 7, 1.0], rtol=1e-6)
    assert m["dice"][0] == pytest.approx(dice(p[0], t[0]))
    assert m["iou"][0] == pytest.approx(iou(p[0], t[0]))


def test_soft_dice_loss_by_hand_3d():
    task = SegmentationTask(loss="dice", dice_smooth=1.0)
    z = jnp.asarray([0.0, 0.0, 0.0, 0.0], jnp.float32).reshape(1, 1, 2, 2, 1)   # p = 0.5
    mask = jnp.asarray([1, 1, 0, 0], jnp.uint8).reshape(1, 1, 2, 2)
    # 1 - (2 * 1.0 + 1) / (2.0 + 2 + 1)
    np.testing.assert_allclose(task.per_sample_loss(z, {"mask": mask}), [1 - 3 / 5], rtol=1e-6)


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_soft_dice_gradient_finite_at_empty_masks(channels):
    task = SegmentationTask(num_classes=channels, loss="dice")
    mask = jnp.zeros((2, 4, 4), jnp.uint8)

    def loss(z):
        return jnp.sum(task.per_sample_loss(z, {"mask": mask}))

    for fill in (-30.0, 0.0, 30.0):
        z = jnp.full((2, 4, 4, channels), fill, jnp.float32)
        if channels > 1:
            z = z.at[..., 0].set(0.0)
        g = jax.grad(loss)(z)
        assert bool(jnp.all(jnp.isfinite(g))) and bool(jnp.isfinite(loss(z)))
    # A confident empty prediction of an empty mask costs (almost) nothing.
    z = jnp.full((2, 4, 4, channels), -30.0, jnp.float32)
    if channels > 1:
        z = z.at[..., 0].set(30.0)
    assert float(loss(z)) == pytest.approx(0.0, abs=1e-6)


def test_bce_then_dice_switches_at_the_step():
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(3, 5, 6, 1)), jnp.float32)
    mask = jnp.asarray(rng.random((3, 5, 6)) < 0.3, jnp.uint8)
    bce = SegmentationTask(loss="bce").per_sample_loss(z, {"mask": mask})
    dl = SegmentationTask(loss="dice").per_sample_loss(z, {"mask": mask})
    task = SegmentationTask(loss="bce_then_dice", switch_step=4)

    @jax.jit
    def loss_at(step):
        return task.per_sample_loss(z, {"mask": mask, "step": step})

    assert np.all(np.abs(np.asarray(bce) - np.asarray(dl)) > 0.05)
    for step, want in ((0, bce), (3, bce), (4, dl), (100, dl)):
        np.testing.assert_allclose(loss_at(jnp.int32(step)), want, rtol=1e-6)
    assert loss_at._cache_size() == 1              # one compilation for every step
    both = SegmentationTask(loss="bce_dice").per_sample_loss(z, {"mask": mask})
    np.testing.assert_allclose(both, bce + dl, rtol=1e-6)
    # BCE by hand: the voxel mean of -y log p - (1 - y) log(1 - p).
    p = jax.nn.sigmoid(z[..., 0])
    y = mask.astype(jnp.float32)
    want = -jnp.mean(y * jnp.log(p) + (1 - y) * jnp.log(1 - p), axis=(1, 2))
    np.testing.assert_allclose(bce, want, rtol=1e-5)
    with pytest.raises(KeyError, match="batch\\['step'\\]"):
        task.per_sample_loss(z, {"mask": mask})
    with pytest.raises(ValueError, match="switch_step"):
        SegmentationTask(loss="bce_then_dice")


@pytest.mark.parametrize("loss", ["bce", "dice", "bce_dice"])
def test_sigmoid_and_two_class_softmax_agree(loss):
    rng = np.random.default_rng(1)
    z = rng.normal(scale=3.0, size=(2, 3, 4, 5)).astype(np.float32)       # (B, D, H, W)
    mask = jnp.asarray(rng.random(z.shape) < 0.4, jnp.uint8)
    one = jnp.asarray(z[..., None])
    two = jnp.asarray(np.stack([np.zeros_like(z), z], -1))
    s1 = SegmentationTask(num_classes=1, loss=loss)
    s2 = SegmentationTask(num_classes=2, loss=loss)
    np.testing.assert_allclose(s1.per_sample_loss(one, {"mask": mask}),
                               s2.per_sample_loss(two, {"mask": mask}), rtol=1e-5)
    np.testing.assert_allclose(s1.probabilities(one), s2.probabilities(two), rtol=1e-6)
    np.testing.assert_allclose(s1.probabilities(one), jax.nn.sigmoid(z), rtol=1e-6)
    for k in ("dice", "iou"):
        np.testing.assert_array_equal(s1.per_sample_metrics(one, {"mask": mask})[k],
                                      s2.per_sample_metrics(two, {"mask": mask})[k])


def test_three_class_softmax():
    z = jnp.asarray([[[[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]]]])  # (1, 1, 3, 3)
    mask = jnp.asarray([[[0, 1, 1]]], jnp.uint8)
    task = SegmentationTask(num_classes=3, loss="bce")
    want = optax.softmax_cross_entropy_with_integer_labels(z, mask.astype(jnp.int32)).mean()
    np.testing.assert_allclose(task.per_sample_loss(z, {"mask": mask}), [want], rtol=1e-6)
    soft = jax.nn.softmax(z, -1)
    np.testing.assert_allclose(task.probabilities(z), 1 - soft[..., 0], rtol=1e-6)
    # Foreground = any class > 0: voxels 1 and 2 predicted and true.
    assert float(task.per_sample_metrics(z, {"mask": mask})["dice"][0]) == 1.0
    d = SegmentationTask(num_classes=3, loss="dice", dice_smooth=1.0)
    p, y = soft[0, 0], jax.nn.one_hot(mask[0, 0], 3)
    per_class = [1 - (2 * jnp.sum(p[:, c] * y[:, c]) + 1) / (jnp.sum(p[:, c]) + jnp.sum(y[:, c])
                                                             + 1) for c in (1, 2)]
    np.testing.assert_allclose(d.per_sample_loss(z, {"mask": mask}), [np.mean(per_class)],
                               rtol=1e-6)


def test_host_outputs_shapes_and_checks():
    task = TASKS.build({"name": "segmentation", "num_classes": 1, "loss": "bce"})
    assert isinstance(task, SegmentationTask)
    pred = np.zeros((2, 4, 6, 6), bool)
    pred[0, 1:3, 1:4, 1:4] = True
    mask = np.zeros((2, 4, 6, 6, 1), np.float32)     # a trailing channel of 1 is accepted
    mask[0, 1:3, 1:3, 1:4, 0] = 1
    spacing = jnp.asarray([[2.5, 0.7, 0.7]] * 2, jnp.float32)
    h = task.host_outputs(_hard_logits(pred), {"mask": jnp.asarray(mask), "spacing": spacing})
    assert h["probability"].shape == (2, 4, 6, 6) and h["probability"].dtype == jnp.float32
    assert h["mask"].shape == (2, 4, 6, 6) and h["mask"].dtype == jnp.uint8
    assert (int(h["tp"][0]), int(h["fp"][0]), int(h["fn"][0])) == (12, 6, 0)
    np.testing.assert_array_equal(h["label"], [1, 0])
    np.testing.assert_allclose(h["dice"], [24 / 30, 1.0], rtol=1e-6)
    assert float(h["score"][0]) > 0.99 and float(h["score"][1]) < 0.01
    np.testing.assert_array_equal(h["spacing"], spacing)
    with pytest.raises(ValueError, match="batch\\['mask'\\] has shape"):
        task.per_sample_loss(_hard_logits(pred), {"mask": jnp.zeros((2, 4, 6, 5))})
    with pytest.raises(ValueError, match="model gives 2 channels"):
        task.per_sample_loss(_hard_logits(pred, 2), {"mask": jnp.asarray(mask)})
    with pytest.raises(ValueError, match="task.loss"):
        SegmentationTask(loss="focal")


# ----------------------------------------------------------------------------------
# Classification task: class weights, multi-class
# ----------------------------------------------------------------------------------


def test_class_weights_change_the_loss_as_by_hand():
    logits = jnp.asarray([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = jnp.asarray([0, 1, 1], jnp.int32)
    ce = np.array([np.log1p(np.exp(-2.0)), np.log1p(np.exp(-1.0)), np.log(2.0)])
    plain = ClassificationTask().per_sample_loss(logits, {"label": labels})
    np.testing.assert_allclose(plain, ce, rtol=1e-6)
    # The unweighted loss is exactly the registered loss (binary runs unchanged).
    np.testing.assert_array_equal(plain, softmax_cross_entropy(logits, labels))
    weighted = ClassificationTask(class_weights=(0.5, 3.0)).per_sample_loss(
        logits, {"label": labels})
    np.testing.assert_allclose(weighted, ce * [0.5, 3.0, 3.0], rtol=1e-6)
    with pytest.raises(ValueError, match="class_weights"):
        ClassificationTask(class_weights=(1.0,))


def test_multiclass_classification_task():
    logits = jnp.asarray([[3.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    labels = jnp.asarray([0, 1], jnp.int32)
    task = ClassificationTask(num_classes=3, class_weights=(1.0, 2.0, 1.0))
    lse = np.log(np.exp(3.0) + 2), np.log(2 + np.exp(2.0))
    np.testing.assert_allclose(task.per_sample_loss(logits, {"label": labels}),
                               [lse[0] - 3.0, 2 * lse[1]], rtol=1e-6)
    h = task.host_outputs(logits, {"label": labels})
    np.testing.assert_allclose(h["probabilities"], jax.nn.softmax(logits, -1), rtol=1e-6)
    np.testing.assert_array_equal(task.per_sample_metrics(logits, {"label": labels})["accuracy"],
                                  [1.0, 0.0])
    # Binary host outputs keep their two keys.
    assert set(ClassificationTask().host_outputs(logits[:, :2], {"label": labels})) == {
        "score", "label"}
