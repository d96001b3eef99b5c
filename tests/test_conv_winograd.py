"""Winograd convolutions (``winograd``, split choices ``w``/``v``/``u``/``s``): each
pass (the input-gradient in both its forms) equals XLA's native convolution to float32
rounding on random shapes, and the layer uses it only where it applies (stride 1, no
dilation)."""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from lungjax.models.conv import select as conv_select
from lungjax.models.conv import split as conv_split
from lungjax.models.conv import tune as conv_tune
from lungjax.models.conv import winograd as conv_winograd
from lungjax.models.layers import Conv


@pytest.mark.parametrize("m,r", [(1, 3), (2, 3), (4, 3), (6, 3), (4, 4), (4, 5), (3, 2)])
def test_transforms_compute_a_correlation(m, r):
    at, g, bt = conv_winograd.matrices(m, r)
    rng = np.random.default_rng(m * 10 + r)
    d, k = rng.standard_normal(m + r - 1), rng.standard_normal(r)
    want = [d[o:o + r] @ k for o in range(m)]
    np.testing.assert_allclose(at @ ((g @ k) * (bt @ d)), want, rtol=1e-10, atol=1e-10)


def test_input_transform_has_exact_zeros_and_ones():
    # The transforms skip zero terms and multiplications by +-1 only on exact values; the
    # classical F(6, 3) input transform has 44 nonzero entries, 16 of them +-1.
    bt = conv_winograd.matrices(6, 3)[2]
    assert np.count_nonzero(bt) == 44 and np.count_nonzero(np.abs(bt) == 1) == 16
    assert np.count_nonzero(conv_winograd.matrices(4, 3)[2]) == 22
    assert np.array_equal(bt[0], [-1, 0, 5.25, 0, -5.25, 0, 1, 0])


def _native(x, w, pads):
    rank = w.ndim - 2
    dn = ("NDHWC", "DHWIO", "NDHWC") if rank == 3 else ("NHWC", "HWIO", "NHWC")
    return lax.conv_general_dilated(x, w, (1,) * rank, pads, dimension_numbers=dn,
                                    precision="highest")


def _rel_err(a, b):
    return float(jnp.abs(a - b).max() / jnp.abs(b).max())


# (spatial, kernel, pads): 2-D and 3-D, the project's (3,5,5) and (4,5,5) kernels, kernels
# with unit axes, asymmetric and negative pads, outputs shorter than a tile and not a
# multiple of it.
CASES = [
    ((11, 13), (3, 3), ((1, 1), (1, 1))),
    ((9, 7), (3, 2), ((0, 2), (1, 0))),
    ((7, 12, 10), (3, 3, 3), ((1, 1), (1, 1), (1, 1))),
    ((8, 13, 13), (3, 5, 5), ((0, 0), (0, 0), (0, 0))),
    ((6, 9, 9), (4, 5, 5), ((0, 0), (2, 1), (0, 0))),
    ((6, 7, 8), (3, 1, 1), ((1, 1), (0, 0), (0, 0))),
    ((6, 9, 10), (3, 3, 3), ((-1, 2), (1, 1), (0, 0))),
]


def _assert_passes_match_native(spatial, kernel, pads, batch, seed, **winograd):
    """The three ``winograd`` passes (keyword arguments ``tile`` / ``slabs``) against
    XLA's convolution and its VJP on random (batch, *spatial, 5) -> 6 data."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, *spatial, 5)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((*kernel, 5, 6)) * 0.2, jnp.float32)
    y_ref, vjp = jax.vjp(lambda x, w: _native(x, w, pads), x, w)
    dy = jnp.asarray(rng.standard_normal(y_ref.shape), jnp.float32)
    dx_ref, dw_ref = vjp(dy)
    y, dx, dw = jax.jit(lambda x, w, dy: (
        conv_winograd.forward(x, w, pads, **winograd),
        conv_winograd.input_grad(dy, w, x.shape[1:-1], pads, **winograd),
        conv_winograd.weight_grad(x, dy, w.shape, w.dtype, pads, **winograd)))(x, w, dy)
    assert y.shape == y_ref.shape and dx.shape == x.shape and dw.shape == w.shape
    # F(4, r) and F(6, r) mix values of different scales: ~1e-5 of the magnitude in
    # float32.
    assert _rel_err(y, y_ref) < 1e-4
    assert _rel_err(dx, dx_ref) < 1e-4
    assert _rel_err(dw, dw_ref) < 1e-4


@pytest.mark.parametrize("spatial,kernel,pads,tile",
                         [c + (4,) for c in CASES]
                         + [c + (6,) for c in CASES if max(c[1]) <= 3]  # choice v
                         + [c + (0,) for c in CASES])  # choice u: tiles fitted per axis
def test_passes_match_native(spatial, kernel, pads, tile):
    _assert_passes_match_native(spatial, kernel, pads, 2, len(spatial) + sum(kernel),
                                tile=tile)


@pytest.mark.parametrize("slab_bytes", [1, conv_winograd.SLAB_BYTES])
@pytest.mark.parametrize("spatial,kernel,pads", CASES)
def test_slab_passes_match_native(spatial, kernel, pads, slab_bytes, monkeypatch):
    # slab_bytes=1: one slab per loop step (many steps); the default: all slabs in one step
    # at these sizes. Batch 3: the slab count (3 x depth tiles) is not a power of two.
    monkeypatch.setattr(conv_winograd, "SLAB_BYTES", slab_bytes)
    _assert_passes_match_native(spatial, kernel, pads, 3, len(spatial) + sum(kernel) + 1,
                                slabs=True)


def _dy_and_dx_ref(spatial, kernel, pads, batch, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, *spatial, 5)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((*kernel, 5, 6)) * 0.2, jnp.float32)
    y, vjp = jax.vjp(lambda x: _native(x, w, pads), x)
    dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    return w, dy, vjp(dy)[0]


@pytest.mark.parametrize("tile", [4, 0, "slabs"])
@pytest.mark.parametrize("spatial,kernel,pads", CASES)
def test_transposed_input_grad_matches_native(spatial, kernel, pads, tile, monkeypatch):
    # The transpose of the forward, on every case ("auto" takes it only where it transforms
    # fewer samples than the correlation): slabs one per loop step.
    monkeypatch.setattr(conv_winograd, "SLAB_BYTES", 1)
    w, dy, dx_ref = _dy_and_dx_ref(spatial, kernel, pads, 3, sum(spatial))
    slabs, tile = tile == "slabs", 0 if tile == "slabs" else tile
    dx = jax.jit(lambda dy, w: conv_winograd.input_grad(dy, w, spatial, pads, tile, slabs,
                                                        form="transpose"))(dy, w)
    assert dx.shape == dx_ref.shape
    assert _rel_err(dx, dx_ref) < 1e-4


def test_overlap_add_is_the_transpose_of_tiling():
    # 4 tiles of 7 samples every 3 (F(3, 5)) along axis 1 of a (2, 4, 5) array of tiles.
    rng = np.random.default_rng(0)
    parts = rng.standard_normal((7, 2, 4, 5)).astype(np.float32)
    got = conv_winograd._overlap_add(lambda i: jnp.asarray(parts[i]), 4, 3, 7, 1)
    want = np.zeros((2, 3 * 3 + 7, 5), np.float32)
    for t in range(4):
        for i in range(7):
            want[:, t * 3 + i] += parts[i][:, t]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spatial,pads,transposed", [
    ((8, 13, 13), ((0, 0),) * 3, True),  # the FCN's layer: 3528 against 12288 samples
    ((8, 13, 13), ((1, 1), (2, 2), (2, 2)), False),  # "SAME": the same tiles, a tie
])
@pytest.mark.parametrize("slabs", [False, True])
def test_input_grad_takes_the_form_with_fewer_samples(spatial, pads, transposed, slabs,
                                                      monkeypatch):
    calls = []
    for name in ("_transposed_input_grad", "_transposed_input_grad_slabs", "forward"):
        real = getattr(conv_winograd, name)
        monkeypatch.setattr(conv_winograd, name,
                            lambda *a, real=real, name=name, **k: calls.append(name)
                            or real(*a, **k))
    w, dy, dx_ref = _dy_and_dx_ref(spatial, (3, 5, 5), pads, 2, 1)
    dx = conv_winograd.input_grad(dy, w, spatial, pads, 0, slabs)
    assert _rel_err(dx, dx_ref) < 1e-4
    want = ("_transposed_input_grad_slabs" if slabs else "_transposed_input_grad") \
        if transposed else "forward"
    assert calls[0] == want
    with pytest.raises(ValueError, match="form 'transposed'"):
        conv_winograd.input_grad(dy, w, spatial, pads, 0, slabs, form="transposed")
    assert conv_winograd._tile_samples((6, 9, 9), (3, 5, 5), 0) == 3528
    assert conv_winograd._tile_samples((8, 13, 13), (3, 5, 5), 0) == 12288


def test_slab_steps_follow_the_byte_budget(monkeypatch):
    # 16x24x60x60x32 -> 32, 3x3x3: depth tiles of 6 (4 per sample), one slab's transformed
    # buffer 8*8*8 x 10*10 tiles x 32 channels x 4 bytes = 6.5 MB.
    out = (24, 60, 60)
    one = 8 * 8 * 8 * 100 * 32 * 4
    assert conv_winograd._slab_plan((16, 24, 60, 60, 32), out, (3, 3, 3), 32, 32, 4) == \
        (6, 4, 1)
    monkeypatch.setattr(conv_winograd, "SLAB_BYTES", 5 * one)
    # at most 5 of the 64 slabs per step, and a divisor of 64
    assert conv_winograd._slab_plan((16, 24, 60, 60, 32), out, (3, 3, 3), 32, 32, 4)[2] == 4
    # the slab choice's buffer estimate is the slabs (8 of every 6 depth samples)
    assert conv_split.buffer_bytes("fwd", "s", 16, (24, 60, 60), out, (3, 3, 3), 32, 32) == \
        16 * 4 * 8 * 60 * 60 * 32 * 4


def test_fitted_tiles_make_the_fewest_transformed_samples():
    # Per axis: the m minimising ceil(o/m) * (m + k - 1), at most 8 samples per tile.
    for o in range(1, 40):
        for k in range(2, 8):
            (m,) = conv_winograd.tiles((o,), (k,), 0)
            assert 1 <= m <= o and m + k - 1 <= conv_winograd.MAX_ALPHA
            cost = -(-o // m) * (m + k - 1)
            assert all(cost <= -(-o // n) * (n + k - 1)
                       for n in range(1, min(o, conv_winograd.MAX_ALPHA - k + 1) + 1))
    # the FCN's 64-channel (3, 5, 5) layer: 6x9x9 outputs -> F(6, 3) x F(3, 5) x F(3, 5)
    assert conv_winograd.tiles((6, 9, 9), (3, 5, 5), 0) == (6, 3, 3)
    assert conv_winograd.tiles((6, 9, 9), (1, 5, 5), 0) == (1, 3, 3)  # unit axis: 1


@pytest.mark.parametrize("impl", ["split_wvu", "split_sus"])
def test_layer_with_winograd_plan_matches_flax(impl):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 6, 10, 9, 3)), jnp.float32)
    ref = nn.Conv(4, (3, 3, 3), padding="SAME")
    ours = Conv(4, (3, 3, 3), padding="SAME", impl=impl)
    params = ref.init(jax.random.key(0), x)

    def loss(m):
        return lambda p, xx: jnp.sum(jnp.sin(m.apply(p, xx)))
    (l_ref, g_ref), (l, g) = [jax.value_and_grad(loss(m), argnums=(0, 1))(params, x)
                              for m in (ref, ours)]
    np.testing.assert_allclose(l, l_ref, rtol=1e-4)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        assert _rel_err(a, b) < 1e-4


def test_winograd_only_for_stride_one_undilated():
    assert "w" in conv_split.choices(3, (3, 3, 3), (1, 1, 1), (1, 1, 1))["wgrad"]
    assert "w" not in conv_split.choices(3, (3, 3, 3), (1, 2, 2), (1, 1, 1))["fwd"]
    assert "w" not in conv_split.choices(2, (3, 3), (1, 1), (2, 1))["igrad"]
    assert "w" not in conv_split.choices(3, (1, 1, 1), (1, 1, 1), (1, 1, 1))["fwd"]
    assert "w" not in conv_split.choices(3)["fwd"]  # strides unknown: not offered
    assert "v" in conv_split.choices(3, (3, 3, 3), (1, 1, 1), (1, 1, 1))["igrad"]
    assert "v" not in conv_split.choices(3, (3, 5, 5), (1, 1, 1), (1, 1, 1))["fwd"]
    assert "w" in conv_split.choices(3, (3, 5, 5), (1, 1, 1), (1, 1, 1))["fwd"]
    x = jnp.ones((1, 8, 8, 2))
    with pytest.raises(ValueError, match=r"Winograd \(w\) needs a stride-1"):
        Conv(3, (3, 3), strides=2, impl="split_wxx").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"Winograd \(v\) .* at most 3 taps"):
        Conv(3, (5, 5), impl="split_xvx").init(jax.random.key(0), x)
    assert "u" in conv_split.choices(3, (3, 5, 5), (1, 1, 1), (1, 1, 1))["igrad"]
    assert "u" in conv_split.choices(2, (7, 2), (1, 1), (1, 1))["wgrad"]
    assert "u" not in conv_split.choices(2, (8, 3), (1, 1), (1, 1))["fwd"]
    with pytest.raises(ValueError, match=r"Winograd \(u\) .* at most 7 taps"):
        Conv(3, (8, 3), impl="split_uxx").init(jax.random.key(0), jnp.ones((1, 12, 8, 2)))
    assert "s" in conv_split.choices(3, (3, 5, 5), (1, 1, 1), (1, 1, 1))["wgrad"]
    assert "s" not in conv_split.choices(3, (3, 3, 3), (2, 2, 2), (1, 1, 1))["fwd"]
    with pytest.raises(ValueError, match=r"Winograd \(s\) .* at most 7 taps"):
        Conv(3, (8, 3), impl="split_xxs").init(jax.random.key(0), jnp.ones((1, 12, 8, 2)))


def test_tuner_times_the_winograd_choice():
    key = conv_select.ConvKey("conv", 1, (6, 8), 8, 8, (3, 3), (1, 1), (1, 1),
                              ((1, 1),) * 2, "float32")
    passes = conv_tune.time_passes(key, reps=1)
    assert all(ms.get(c, 0) > 0 for ms in passes.values() for c in "wvus")
    # buffer estimate: 2x2 tiles of 4 outputs, 6x6 transformed samples each, 8 channels
    assert conv_split.buffer_bytes("fwd", "w", 1, (6, 8), (6, 8), (3, 3), 8, 8) == \
        2 * 2 * 36 * 8 * 4


def test_tuner_does_not_time_the_warm_up():
    calls = []

    def program(*args):  # first call slow (heap growth), later ones fast
        calls.append(1)
        time.sleep(0.3 if len(calls) == 1 else 0.01)
        return jnp.zeros(())
    ms = conv_tune._median_ms(program, (), reps=2, warmup=1, give_up_ms=100.0)
    assert ms < 100.0 and len(calls) == 3


def test_tuner_chunks_a_plan_whose_full_step_is_over_the_memory_limit():
    key = conv_select.ConvKey("conv", 4, (6, 8, 8), 8, 8, (3, 3, 3), (1, 1, 1), (1, 1, 1),
                              ((1, 1),) * 3, "float32")
    x, w, g = conv_tune._inputs(key)

    def need(plan):
        step = jax.jit(jax.grad(conv_tune._loss_fn(key, plan), argnums=(0, 1)))
        return conv_tune.temp_bytes(step.lower(x, w, g).compile())
    whole = need("split_www")
    assert conv_tune.fit_plan(key, "split_www", whole) == "split_www"
    plan = conv_tune.fit_plan(key, "split_www", whole // 2)
    assert conv_split.batch_chunks(plan) > 1 and need(plan) <= whole // 2
    assert conv_tune.fit_plan(key, "split_www", 1) == "split_www"  # nothing fits: unchanged
