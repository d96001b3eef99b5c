"""Batch-chunked split formulations (``"split_FIWbK"``), memory-bounded tuning, and the
transposed convolution's "SAME"/"VALID" padding rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lungjax.models.conv import ops as conv_ops
from lungjax.models.conv import select as conv_select
from lungjax.models.conv import split as conv_split
from lungjax.models.conv import tune as conv_tune
from lungjax.models.layers import Conv


def _grads(impl, x, w, strides, pads):
    def f(x, w):
        y = conv_ops.conv(x, w, strides=strides, pads=pads, dilation=(1,) * (w.ndim - 2),
                          impl=impl)
        return jnp.sum(y * jnp.cos(y)), y
    (_, y), (dx, dw) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(x, w)
    return y, dx, dw


@pytest.mark.parametrize("impl,strides", [
    ("split_2c1b2", (1, 1, 1)),
    ("split_10x", (1, 1, 1)),    # no suffix: chunk count 1
    ("split_x22b4", (1, 2, 2)),  # native forward stays whole, gradients chunked
    ("split_0c3b4", (2, 1, 2)),
])
def test_chunked_split_equals_native_3d(impl, strides):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 5, 6, 7, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 2, 3, 5)) * 0.3, jnp.float32)
    pads = ((1, 1), (1, 0), (0, 1))
    ref = _grads("xla", x, w, strides, pads)
    got = jax.jit(lambda x, w: _grads(impl, x, w, strides, pads))(x, w)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl,strides,dilation", [
    ("split_fff", (1, 1, 1), (1, 1, 1)),
    ("split_fff", (2, 1, 2), (1, 2, 1)),   # depth stride, in-plane dilation
    ("split_fc2b2", (1, 2, 1), (2, 1, 1)),  # depth dilation; only the matmul pass chunked
    ("split_fff", (2, 2, 2), (1, 1, 1)),   # strided in-plane: phase-decomposed dx
    ("split_xfx", (1, 3, 2), (2, 1, 1)),
])
def test_depth_folded_split_equals_native(impl, strides, dilation):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 7, 6, 8, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 2, 3, 3, 4)) * 0.3, jnp.float32)
    pads = ((2, 1), (0, 1), (1, 1))

    def grads(impl):
        def f(x, w):
            y = conv_ops.conv(x, w, strides=strides, pads=pads, dilation=dilation, impl=impl)
            return jnp.sum(y * jnp.cos(y)), y
        (_, y), (dx, dw) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(x, w)
        return y, dx, dw

    for a, b in zip(jax.jit(lambda: grads(impl))(), grads("xla")):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # Folded passes never run in batch chunks (a convolution in a loop body is slow).
    assert conv_split._chunks_for(x, "f", 2) == 1 and conv_split._chunks_for(x, "2", 2) == 2


def test_chunked_split_2d_and_indivisible_batch_runs_whole():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 8, 9, 4)), jnp.float32)  # 3 % 2 != 0
    w = jnp.asarray(rng.standard_normal((3, 3, 4, 6)) * 0.3, jnp.float32)
    pads = ((1, 1), (1, 1))
    ref = _grads("xla", x, w, (1, 1), pads)
    for impl in ("split_2c1b2", "split_21xb3"):
        got = _grads(impl, x, w, (1, 1), pads)
        for a, b in zip(got, ref):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_parse_and_batch_chunks():
    assert conv_split.parse("split_2c1b8", 3) == ("2", "c", "1")
    assert conv_split.batch_chunks("split_2c1b8") == 8
    assert conv_split.batch_chunks("split_2c1") == 1
    assert conv_split.split_choice("1b4") == ("1", 4)
    assert conv_split.split_choice("x") == ("x", 1)
    for bad in ("split_2c1b0", "split_2c1b", "split_2c1x4"):
        with pytest.raises(ValueError):
            conv_split.parse(bad, 3)


def test_layer_accepts_chunked_plan():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 6, 6, 6, 2)), jnp.float32)
    ref = Conv(3, (3, 3, 3), impl="xla")
    params = ref.init(jax.random.key(0), x)
    got = Conv(3, (3, 3, 3), impl="split_3c2b2").apply(params, x)
    np.testing.assert_allclose(got, ref.apply(params, x), rtol=1e-4, atol=1e-4)
    key = conv_select.ConvKey("conv", 4, (6, 6, 6), 2, 3, (3, 3, 3), (1, 1, 1), (1, 1, 1),
                              ((1, 1),) * 3, "float32")
    assert conv_select.resolve("split_3c2b2", key) == "split_3c2b2"


def test_tuning_chunks_passes_that_exceed_the_memory_limit():
    # 2-D: the chunking rule does not depend on the rank, and 2-D choices compile fast.
    key = conv_select.ConvKey("conv", 8, (12, 12), 8, 8, (3, 3), (1, 1), (1, 1),
                              ((1, 1),) * 2, "float32")
    # Under the default budget every choice runs whole (timing them all again would only
    # double the test's compilations).
    for pass_name, options in conv_split.choices(2, key.kernel, key.strides,
                                                 key.dilation).items():
        for choice in options:
            need = conv_split.buffer_bytes(pass_name, choice, key.batch, key.spatial,
                                           key.spatial, key.kernel, key.cin, key.cout, 4)
            assert conv_tune._chunk_count(need, 2 << 30, key.batch) == 1, (pass_name, choice)
    # The full im2col forward builds 8*12*12*9*8*4 B = 332 KB of columns (more with the
    # slices XLA keeps): a 100 KB limit must split it into chunks of the batch.
    limit = 100_000
    small = conv_tune.time_passes(key, reps=1, max_buffer_bytes=limit)
    chunked = [c for ms in small.values() for c in ms if "b" in c]
    assert chunked, small
    for c in chunked:
        base, k = conv_split.split_choice(c)
        assert k > 1 and key.batch % k == 0 and base != "x"
    plan = conv_tune.best_plan(small)
    conv_split.parse(plan, 2)
    picks = [conv_split.split_choice(min(ms, key=ms.get)) for ms in small.values()]
    assert conv_split.batch_chunks(plan) == max(k for _, k in picks)


def test_chunk_count_never_exceeds_or_misdivides_the_batch():
    # Fits whole; needs 4 of 8; cannot fit even one sample at a time.
    assert conv_tune._chunk_count(100, 200, 8) == 1
    assert conv_tune._chunk_count(700, 200, 8) == 4
    assert conv_tune._chunk_count(10_000, 200, 8) is None
    # A retry that starts beyond the batch (or at a count that does not divide it) has no
    # valid answer, even when that count would fit: a batch of 2 cannot run in 4 chunks.
    assert conv_tune._chunk_count(700, 200, 2, start=4) is None
    assert conv_tune._chunk_count(100, 200, 6, start=4) is None
    assert conv_tune._chunk_count(700, 200, 8, start=2) == 4


@pytest.mark.parametrize("ks,strides,pads,in_hw", [
    ((3, 3), (2, 2), ((1, 1), (1, 1)), (9, 11)),
    ((3, 4), (2, 2), ((1, 2), (0, 1)), (9, 9)),
    ((5, 2), (3, 2), ((2, 2), (1, 0)), (7, 9)),
    ((1, 1), (2, 2), ((0, 0), (0, 0)), (8, 7)),  # kernel smaller than the stride
    ((2, 3), (1, 2), ((0, 0), (1, 1)), (6, 8)),  # one axis strided
])
def test_phase_decomposed_input_grad_equals_autodiff(ks, strides, pads, in_hw):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, *in_hw, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((*ks, 3, 4)), jnp.float32)
    y, vjp = jax.vjp(lambda x: conv_ops.conv_xla(x, w, strides, pads, (1, 1)), x)
    dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    got = conv_split.strided_input_grad_2d(dy, w, in_hw, strides, pads)
    assert got.shape == x.shape
    np.testing.assert_allclose(got, vjp(dy)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["SAME", "VALID"])
def test_transpose_padding_matches_lax_conv_transpose(mode):
    # Every (kernel, stride, dilation) on one axis, run as the lhs-dilated convolution
    # with our pads, against lax.conv_transpose's own output (shape and values).
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 3)), jnp.float32)
    for k in range(1, 7):
        for s in range(1, 5):
            for d in (1, 2):
                w = jnp.asarray(rng.normal(size=(k, 3, 2)), jnp.float32)
                want = jax.lax.conv_transpose(x, w, (s,), mode, rhs_dilation=(d,),
                                              dimension_numbers=("NWC", "WIO", "NWC"))
                pads = conv_ops.transpose_padding(mode, (k,), (s,), (d,))
                got = conv_ops.conv_transpose(x, w, strides=(s,), pads=pads, dilation=(d,),
                                              impl="xla")
                assert got.shape == want.shape, (k, s, d, pads)
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5,
                                           err_msg=str((k, s, d)))
    # 3-D, unequal per-axis strides and kernels, as the detector's up-convolutions use.
    x = jnp.asarray(rng.normal(size=(1, 3, 4, 5, 2)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(2, 3, 4, 2, 3)), jnp.float32)
    want = jax.lax.conv_transpose(x, w, (2, 1, 3), mode,
                                  dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    pads = conv_ops.transpose_padding(mode.lower(), (2, 3, 4), (2, 1, 3), (1, 1, 1))
    got = conv_ops.conv_transpose(x, w, strides=(2, 1, 3), pads=pads, dilation=(1, 1, 1),
                                  impl="matmul")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
