"""xie2018 ResNet + FPN detector and RReLU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lungjax.models.resnet_fpn import XieFPN
from lungjax.models.rrelu import RReLU
from lungjax.registry import MODELS
from lungjax.tasks.anchors import AnchorDetectionTask

# A narrow network (same layout as the default: 3 stages, heads at strides 2 and 4) so
# one init + forward + loss + gradient compiles in seconds on a CPU.
TINY = dict(stem_features=4, stage_features=(8, 8, 8), stage_blocks=(1, 1, 1), fpn_features=8,
            head_features=8, conv_impl="xla")


# ---------------------------------------------------------------- RReLU
def test_rrelu_inference_uses_the_mean_slope():
    x = jnp.array([-4.0, -1.0, 0.0, 2.5])
    y = RReLU(0.1, 0.3).apply({}, x, deterministic=True)
    np.testing.assert_allclose(np.asarray(y), [-0.8, -0.2, 0.0, 2.5], rtol=1e-6)


def test_rrelu_training_draws_one_slope_per_element_from_its_stream():
    x = -jnp.ones((4096,))
    act = RReLU(0.125, 1 / 3)
    y1 = np.asarray(act.apply({}, x, deterministic=False, rngs={"rrelu": jax.random.key(0)}))
    y2 = np.asarray(act.apply({}, x, deterministic=False, rngs={"rrelu": jax.random.key(0)}))
    y3 = np.asarray(act.apply({}, x, deterministic=False, rngs={"rrelu": jax.random.key(1)}))
    slopes = -y1
    assert np.all((slopes >= 0.125) & (slopes <= 1 / 3))
    assert len(np.unique(slopes)) > 4000  # per element, not one per call
    assert abs(slopes.mean() - (0.125 + 1 / 3) / 2) < 0.01  # U(l, u) mean
    np.testing.assert_array_equal(y1, y2)  # a function of the key
    assert not np.array_equal(y1, y3)
    pos = jnp.arange(1.0, 5.0)
    np.testing.assert_array_equal(
        np.asarray(act.apply({}, pos, deterministic=False, rngs={"rrelu": jax.random.key(2)})),
        np.asarray(pos))
    with pytest.raises(ValueError, match="rng stream 'rrelu'"):
        act.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    with pytest.raises(ValueError, match="lower <= upper"):
        RReLU(0.5, 0.1).apply({}, x, deterministic=True)


# ---------------------------------------------------------------- the network
def _tiny_param_count() -> int:
    """Hand count of TINY: convs k^3 * Cin * Cout (no bias before a norm), batch norm
    2 * C (scale, bias), the 1^3 top / lateral convs and the up-convolutions with bias."""
    bn = lambda c: 2 * c  # noqa: E731
    stem = 27 * 1 * 4 + bn(4)
    # First block of a stage: conv1 (stride 2) + conv2 + projection 1^3 + three norms.
    stage0 = 27 * 4 * 8 + bn(8) + 27 * 8 * 8 + bn(8) + 4 * 8 + bn(8)
    stage1 = 27 * 8 * 8 + bn(8) + 27 * 8 * 8 + bn(8) + 8 * 8 + bn(8)
    stage2 = stage1
    top = 8 * 8 + 8
    up = 8 * 8 * 8 + 8  # 2^3 kernel, 8 -> 8, bias
    lateral = 8 * 8 + 8
    td_block = 27 * 8 * 8 + bn(8) + 27 * 8 * 8 + bn(8)  # identity shortcut
    head4 = 27 * 8 * 8 + bn(8) + 8 * (5 * 5) + 5 * 5  # 5 anchors x 5 outputs
    head2 = 27 * 8 * 8 + bn(8) + 8 * (4 * 5) + 4 * 5  # 4 anchors x 5 outputs
    total = (stem + stage0 + stage1 + stage2 + top + (up + lateral + td_block + head4)
             + (up + lateral + td_block + head2))
    assert total == 22049
    return total


def test_parameter_counts_and_output_shapes():
    x = jax.ShapeDtypeStruct((2, 32, 32, 48, 1), jnp.float32)
    tiny = XieFPN(**TINY)
    shapes = jax.eval_shape(tiny.init, jax.random.key(0), x)
    n = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(shapes["params"]))
    assert n == _tiny_param_count()
    # Batch-norm statistics are their own collection (mean, var per norm).
    assert set(shapes) == {"params", "batch_stats"}
    out = jax.eval_shape(lambda v, x: tiny.apply(v, x), shapes, x)
    assert [o.shape for o in out] == [(2, 16, 16, 24, 4, 5), (2, 8, 8, 12, 5, 5)]
    assert all(o.dtype == jnp.float32 for o in out)
    # The default network: four stages, all nine paper anchors split over two heads.
    default = XieFPN()
    assert default.heads() == ((2, (3.0, 5.0, 7.0, 10.0)), (4, (13.0, 17.0, 22.0, 30.0, 40.0)))
    xd = jax.ShapeDtypeStruct((1, 96, 96, 96, 1), jnp.float32)
    out = jax.eval_shape(lambda k, x: default.init_with_output(k, x)[0], jax.random.key(0), xd)
    assert [o.shape for o in out] == [(1, 48, 48, 48, 4, 5), (1, 24, 24, 24, 5, 5)]
    # Group norm and no norm change only the norm / bias parameters.
    gshapes = jax.eval_shape(XieFPN(**{**TINY, "norm": "group"}).init, jax.random.key(0), x)
    assert set(gshapes) == {"params"}
    assert sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(gshapes["params"])) == n


def test_bad_configurations_fail_clearly():
    x = jax.ShapeDtypeStruct((1, 32, 32, 32, 1), jnp.float32)
    init = lambda m, x: jax.eval_shape(m.init, jax.random.key(0), x)  # noqa: E731
    with pytest.raises(ValueError, match="head_strides: 8"):
        init(XieFPN(**{**TINY, "head_strides": (4, 8)}), x)
    with pytest.raises(ValueError, match="one anchor tuple per head"):
        init(XieFPN(**{**TINY, "anchors_mm": ((3.0,),)}), x)
    with pytest.raises(ValueError, match="multiple of the coarsest stride 8"):
        init(XieFPN(**TINY), jax.ShapeDtypeStruct((1, 32, 32, 36, 1), jnp.float32))
    with pytest.raises(ValueError, match="norm"):
        init(XieFPN(**{**TINY, "norm": "layer"}), x)


def test_registered_and_forward_loss_grad_at_32_cubed():
    assert MODELS.get("xie2018_fpn") is XieFPN
    model = XieFPN(**TINY)
    task = AnchorDetectionTask(heads=model.heads())
    x = jnp.asarray(np.random.default_rng(0).random((2, 32, 32, 32, 1)), jnp.float32)
    # A 6 mm nodule (stride-2 head anchors) and a 15 mm one (stride-4 head anchors).
    batch = {"image": x, "offset_zyx": jnp.array([[1.0, -2.0, 0.0], [0.0, 3.0, 0.0]]),
             "diameter_mm": jnp.array([6.0, 15.0])}

    @jax.jit
    def run(key, x):
        # One program (init + training forward + loss + gradient): one compilation.
        init_key, rrelu_key = jax.random.split(key)
        variables = model.init(init_key, x)

        def loss_fn(params):
            out, new_state = model.apply({"params": params,
                                          "batch_stats": variables["batch_stats"]},
                                         x, train=True, rngs={"rrelu": rrelu_key},
                                         mutable=["batch_stats"])
            return task.per_sample_loss(out, batch).mean(), (out, new_state)

        (loss, (out, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            variables["params"])
        return variables, loss, grads, new_state, out, task.per_sample_metrics(out, batch)

    # "rbg" keys: XLA:CPU compiles threefry initialisers slowly (as the engine does).
    variables, loss, grads, new_state, out, metrics = run(jax.random.key(0, impl="rbg"), x)
    assert np.isfinite(float(loss)) and float(loss) > 0
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert all(np.all(np.isfinite(np.asarray(g))) for _, g in leaves)
    # Every parameter (both heads included) is on the path of the loss.
    zero = [jax.tree_util.keystr(p) for p, g in leaves if not np.any(np.asarray(g))]
    assert not zero, zero
    # Training updated the batch statistics.
    assert not np.allclose(np.asarray(new_state["batch_stats"]["stem_norm"]["bn"]["mean"]),
                           np.asarray(variables["batch_stats"]["stem_norm"]["bn"]["mean"]))
    assert float(metrics["num_pos"][0]) >= 1 and float(metrics["num_pos"][1]) >= 1
    # Untrained noduleness is the prior 0.01 (logit bias init).
    for o in out:
        assert np.allclose(1 / (1 + np.exp(-np.asarray(o[..., 0]))), 0.01, atol=0.01)
