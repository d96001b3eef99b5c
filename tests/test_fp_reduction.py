"""Stage-2 networks of dou2017 (lungjax.models.fp_reduction): layout, parameter counts, ablations,
forward + gradient at the full 24x60x60 patch, and initialisation from the stage-1 FCN."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lungjax.models import fp_reduction as fpr
from lungjax.models.fcn import Dou2017FCN
from lungjax.registry import MODELS

PATCH = (24, 60, 60)
# Small widths for the tests that run the network (the layout is the same).
SMALL = dict(trunk_features=(4, 4, 6), stage_features=(8, 8), reg_features=4, fc_features=8)


def _key(seed=0):
    # "rbg": XLA:CPU compiles threefry initialisers slowly.
    return jax.random.key(seed, impl="rbg")


def _count(tree):
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


def _conv(k, cin, cout):
    return math.prod(k) * cin * cout + cout


def _bn(c):
    return 2 * c  # scale + bias


def _dense(i, o):
    return i * o + o


def _hand_count(regression: bool) -> int:
    """Parameters of the default layout, layer by layer (module docstring's table)."""
    n = (_conv((3, 5, 5), 1, 64)          # conv1 -> (22, 56, 56), pool -> (22, 28, 28)
         + _conv((3, 5, 5), 64, 64)       # conv2 -> (20, 24, 24)
         + _conv((3, 5, 5), 64, 150)      # conv3 -> (18, 20, 20)
         + _conv((3, 3, 3), 150, 64)      # conv4 -> (16, 18, 18)
         + 2 * (_bn(64) + _conv((3, 3, 3), 64, 64))    # res1: 2 x (BN + conv)
         + _bn(64)                        # bn1 (shared)
         + _conv((3, 3, 3), 64, 128)      # conv5 stride 2 -> (7, 8, 8)
         + 2 * (_bn(128) + _conv((3, 3, 3), 128, 128))  # res2
         + _bn(128)                       # bn2, pool (2,2,2) -> (3, 4, 4)
         + _dense(3 * 4 * 4 * 128, 128)   # cls_fc1
         + _dense(128, 2))                # cls_fc2
    if regression:
        n += (_conv((3, 3, 3), 64, 32)    # reg_conv stride 2 -> (7, 8, 8)
              + _dense(7 * 8 * 8 * 32, 128)  # reg_fc1
              + _dense(128, 4))           # reg_fc2
    return n


@pytest.mark.parametrize("variant,regression", [("deepnet", False), ("resnet", False),
                                                ("resnet_hl", True)])
def test_parameter_count_and_output_shapes(variant, regression):
    model = fpr.build_fpr_model(variant)
    x = jax.ShapeDtypeStruct((2, *PATCH, 1), jnp.float32)
    variables = jax.eval_shape(model.init, _key(), x)
    n = _count(variables["params"])
    print(f"dou2017_fpr_{variant}: {n:,} parameters "
          f"(+{_count(variables['batch_stats']):,} batch-norm statistics)")
    assert n == _hand_count(regression)
    assert n == (5_298_108 if regression else 3_407_128)
    # Running mean + variance of the 6 batch norms (64, 64, 64, 128, 128, 128 channels).
    assert _count(variables["batch_stats"]) == 2 * (3 * 64 + 3 * 128)
    out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
    if regression:
        assert out["logits"].shape == (2, 2) and out["regression"].shape == (2, 4)
        assert out["logits"].dtype == out["regression"].dtype == jnp.float32
    else:
        assert out.shape == (2, 2) and out.dtype == jnp.float32


def test_shared_layers_match_fcn_kernels():
    """conv1..conv3 of stage 2 have the FCN's exact parameter shapes (default widths)."""
    x2 = jax.ShapeDtypeStruct((1, *PATCH, 1), jnp.float32)
    x1 = jax.ShapeDtypeStruct((1, 10, 30, 30, 1), jnp.float32)
    p2 = jax.eval_shape(fpr.build_fpr_model("resnet_hl").init, _key(), x2)["params"]
    p1 = jax.eval_shape(Dou2017FCN().init, _key(), x1)["params"]
    for name in fpr.FCN_SHARED_LAYERS:
        assert jax.tree_util.tree_map(lambda a: a.shape, p2[name]) == \
            jax.tree_util.tree_map(lambda a: a.shape, p1[name])


def _random_variables(model, shape, seed=0):
    """Variables with the model's tree, filled from numpy (no initialiser to compile).

    Kernels ~ N(0, sqrt(2 / fan_in)) (He), biases and BN offsets 0, BN scales and running
    variances 1, running means 0.
    """
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(model.init, _key(), jax.ShapeDtypeStruct(shape, jnp.float32))

    def fill(path, a):
        name = getattr(path[-1], "key", "")
        if name == "kernel":
            fan_in = math.prod(a.shape[:-1])
            return jnp.asarray(rng.normal(0, math.sqrt(2 / fan_in), a.shape), a.dtype)
        if name in ("scale", "var"):
            return jnp.ones(a.shape, a.dtype)
        return jnp.zeros(a.shape, a.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def _forward_grad(model, variables, x):
    def loss(params):
        out, new_state = model.apply({"params": params,
                                      "batch_stats": variables["batch_stats"]},
                                     x, train=True, mutable=["batch_stats"])
        logits = out["logits"] if isinstance(out, dict) else out
        val = jnp.sum(jax.nn.log_softmax(logits)[:, 1])
        if isinstance(out, dict):
            val = val + jnp.sum(out["regression"] ** 2)
        return val, (out, new_state)

    return fast_jit(jax.value_and_grad(loss, has_aux=True), variables["params"])(
        variables["params"])


# Cheaper XLA:CPU code generation: these tests check values, not speed, and the compile of
# a forward + backward pass dominates their time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def fast_jit(fn, *args):
    """``jax.jit(fn)`` compiled for ``args`` with ``FAST_COMPILE``."""
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)


@pytest.mark.parametrize("variant", fpr.VARIANTS)
def test_forward_and_grad_full_patch(variant):
    """Batch 2 at 24x60x60: finite outputs, a gradient for every kernel, BN stats update."""
    model = fpr.build_fpr_model(variant, conv_impl="xla", **SMALL)
    x = jax.random.uniform(jax.random.key(1), (2, *PATCH, 1), jnp.float32)
    if variant == "resnet_hl":
        # The real initialisers once: FCN-shared layers N(0, 0.01), deeper ones He.
        variables = fast_jit(model.init, _key(), x[:1])(_key(), x[:1])
        assert abs(float(jnp.std(variables["params"]["conv1"]["kernel"])) - 0.01) < 0.003
        k4 = variables["params"]["conv4"]["kernel"]
        he = math.sqrt(2 / math.prod(k4.shape[:-1]))
        assert 0.6 * he < float(jnp.std(k4)) < 1.2 * he
    else:
        variables = _random_variables(model, (2, *PATCH, 1))
    (val, (out, new_state)), grads = _forward_grad(model, variables, x)
    assert np.isfinite(float(val))
    logits = out["logits"] if isinstance(out, dict) else out
    assert logits.shape == (2, 2)
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    for path, g in leaves:
        assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
        if getattr(path[-1], "key", "") == "kernel":  # nothing disconnected
            assert float(jnp.max(jnp.abs(g))) > 0, jax.tree_util.keystr(path)
    has_reg = any("reg_fc2" in jax.tree_util.keystr(p) for p, _ in leaves)
    assert has_reg == (variant == "resnet_hl")
    if has_reg:
        assert out["regression"].shape == (2, 4)
    # Training mode moved the running means away from their initial 0.
    assert float(jnp.max(jnp.abs(new_state["batch_stats"]["bn1"]["mean"]))) > 0


def test_residual_unit_identity_vs_plain():
    """With zero convolutions a residual unit is the identity and the plain one gives 0."""
    x = jax.random.normal(jax.random.key(2), (1, 4, 5, 6, 3))
    for residual, expect in ((True, x), (False, jnp.zeros_like(x))):
        unit = fpr.ResidualUnit3D(3, residual=residual, conv_impl="xla")
        v = _random_variables(unit, x.shape)
        v = {"params": jax.tree_util.tree_map_with_path(
            lambda p, a: jnp.zeros_like(a) if "conv" in jax.tree_util.keystr(p) else a,
            v["params"]), "batch_stats": v["batch_stats"]}
        np.testing.assert_allclose(jax.jit(unit.apply)(v, x), expect, atol=1e-6)
    with pytest.raises(ValueError, match="input channels"):
        jax.eval_shape(fpr.ResidualUnit3D(4).init, _key(), x)


def test_deepnet_and_resnet_share_parameters_but_differ():
    x = jax.random.uniform(jax.random.key(3), (1, *PATCH, 1))
    deep = fpr.build_fpr_model("deepnet", conv_impl="xla", **SMALL)
    res = fpr.build_fpr_model("resnet", conv_impl="xla", **SMALL)
    v = _random_variables(res, x.shape)
    assert jax.tree_util.tree_structure(jax.eval_shape(deep.init, _key(), x)) == \
        jax.tree_util.tree_structure(v)
    a, b = fast_jit(lambda v, x: (deep.apply(v, x), res.apply(v, x)), v, x)(v, x)
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
    assert not np.allclose(a, b)


def test_registry_and_factory():
    for v in fpr.VARIANTS:
        assert f"dou2017_fpr_{v}" in MODELS.names()
    m = MODELS.build({"name": "dou2017_fpr_resnet_hl", "fc_features": 16})
    assert isinstance(m, fpr.Dou2017FPR) and m.regression and m.residual and m.fc_features == 16
    m = MODELS.build({"name": "dou2017_fpr_deepnet"})
    assert not m.residual and not m.regression
    assert fpr.build_fpr_model("dou2017_fpr_resnet").residual
    with pytest.raises(ValueError, match="unknown stage-2 network"):
        fpr.build_fpr_model("vgg")
    with pytest.raises(ValueError, match="fixes"):
        fpr.build_fpr_model("resnet", residual=False)
    with pytest.raises(ValueError, match=r"\(B, D, H, W, C\)"):
        fpr.build_fpr_model("resnet").init(_key(), jnp.zeros(PATCH))


def _fcn_and_fpr(fcn_features, fpr_trunk):
    fcn = Dou2017FCN(features=fcn_features)
    p1 = _random_variables(fcn, (1, 10, 30, 30, 1), seed=5)["params"]
    model = fpr.build_fpr_model("resnet_hl", **{**SMALL, "trunk_features": fpr_trunk})
    p2 = _random_variables(model, (1, *PATCH, 1), seed=6)["params"]
    return p1, p2


def test_init_from_fcn_copies_shared_layers_only():
    p1, p2 = _fcn_and_fpr((4, 4, 6, 8), (4, 4, 6))
    out = fpr.init_from_fcn(p2, p1)
    for name in fpr.FCN_SHARED_LAYERS:
        for leaf in ("kernel", "bias"):
            np.testing.assert_array_equal(out[name][leaf], p1[name][leaf])
            if leaf == "kernel":  # different random inits, so a copy is visible
                assert not np.array_equal(out[name][leaf], p2[name][leaf])
    for name in p2:
        if name not in fpr.FCN_SHARED_LAYERS:
            for a, b in zip(jax.tree_util.tree_leaves(out[name]),
                            jax.tree_util.tree_leaves(p2[name])):
                assert a is b  # untouched, not even copied
    assert set(out) == set(p2)
    # The input tree is not modified.
    assert not np.array_equal(p2["conv1"]["kernel"], p1["conv1"]["kernel"])
    # Same as the engine's generic transfer with FCN_TRANSFER_PATHS.
    from lungjax.state import transfer_params
    pairs = [tuple(p.split(":")) for p in fpr.FCN_TRANSFER_PATHS]
    via_engine = transfer_params(p2, p1, pairs)
    for name in fpr.FCN_SHARED_LAYERS:
        np.testing.assert_array_equal(via_engine[name]["kernel"], out[name]["kernel"])


def test_init_from_fcn_shape_mismatch_names_layer():
    p1, p2 = _fcn_and_fpr((4, 4, 8, 8), (4, 4, 6))
    with pytest.raises(ValueError, match="'conv3'"):
        fpr.init_from_fcn(p2, p1)
    with pytest.raises(KeyError, match="'conv9'"):
        fpr.init_from_fcn(p2, p1, layers=("conv9",))
