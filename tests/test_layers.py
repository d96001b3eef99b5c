"""Conv / ConvTranspose: every formulation equals flax.linen's native layer (forward, input-
and kernel-gradients), parameters are interchangeable, and the impl choice is controllable."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lungjax.models.conv import machine as conv_machine
from lungjax.models.conv import malloc as conv_malloc
from lungjax.models.conv import ops as conv_ops
from lungjax.models.conv import select as conv_select
from lungjax.models.conv import split as conv_split
from lungjax.models.conv import tune as conv_tune
from lungjax.models.layers import (BatchNorm, Conv, ConvTranspose, conv_impl,
                                  get_conv_impl_override, max_pool, set_conv_impl)

# (kernel, strides, padding, dilation, spatial): 2D and 3D, odd sizes, strides, explicit and
# asymmetric pads, dilation. Few cases: compile time dominates.
CONV_CASES = [
    ((3, 3, 3), 1, "SAME", 1, (5, 6, 7)),
    ((2, 3, 3), (1, 2, 2), "VALID", 1, (4, 9, 8)),
    ((1, 1), 2, "VALID", 1, (5, 6)),
    ((3, 3), 2, "SAME", (1, 2), (9, 10)),
    ((4, 3), (2, 3), ((1, 2), (0, 3)), 1, (9, 10)),
    # depth stride, dilation and uneven pads: the depth-folded (f) passes handle depth alone
    ((3, 2, 3), (2, 1, 2), ((2, 1), (0, 1), (1, 1)), (2, 1, 1), (9, 6, 7)),
]
TRANSPOSE_CASES = [
    ((2, 2), 2, "SAME", 1, (4, 5)),
    ((2, 2, 2), 2, "VALID", 1, (3, 4, 5)),
    ((3, 4), (2, 3), "VALID", (1, 2), (4, 5)),
    ((3, 3), 2, ((1, 2), (2, 0)), 1, (4, 5)),
]


def _perturbed_params(ref, x):
    """flax params with a non-zero bias so the bias path is exercised too."""
    p = ref.init(jax.random.key(0), x)
    return jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(1), a.shape), p)


def _value_and_grads(module, params, x):
    def loss(p, xx):
        return jnp.sum(jnp.sin(module.apply(p, xx)))
    y = module.apply(params, x)
    gp, gx = jax.grad(loss, argnums=(0, 1))(params, x)
    return y, gp, gx


def _all_value_and_grads(modules, params, x):
    """One jitted computation for all modules (one compile per test case, not per op)."""
    return jax.jit(lambda p, xx: [_value_and_grads(m, p, xx) for m in modules])(params, x)


def _assert_equivalent(ref, ours_by_impl, x, atol=5e-5):
    params = _perturbed_params(ref, x)
    impls = list(ours_by_impl)
    (y_ref, gp_ref, gx_ref), *results = _all_value_and_grads(
        [ref] + [ours_by_impl[i] for i in impls], params, x)
    for impl, (y, gp, gx) in zip(impls, results):
        ours = ours_by_impl[impl]
        # Same parameter tree (names, shapes, dtypes) as flax: checkpoints interchange.
        shapes = jax.eval_shape(ours.init, jax.random.key(0), x)
        assert (jax.tree.map(lambda a: (a.shape, a.dtype), shapes)
                == jax.tree.map(lambda a: (a.shape, a.dtype), params)), impl
        assert y.shape == y_ref.shape and y.dtype == y_ref.dtype, impl
        np.testing.assert_allclose(y, y_ref, atol=atol, rtol=1e-5, err_msg=f"forward {impl}")
        np.testing.assert_allclose(gx, gx_ref, atol=atol, rtol=1e-4, err_msg=f"d/dx {impl}")
        for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gp_ref)):
            np.testing.assert_allclose(a, b, atol=atol * 10, rtol=1e-4, err_msg=f"d/dparams {impl}")


def _split_plans(rank):
    """A few "split_FIW" plans that together use every choice of every pass once."""
    ch = conv_split.choices(rank)
    f, i, w = ch["fwd"], ch["igrad"], ch["wgrad"]
    return [f"split_{f[j % len(f)]}{i[j]}{w[(j + 1) % len(w)]}" for j in range(len(i))]


@pytest.mark.parametrize("ks,strides,padding,dil,spatial", CONV_CASES)
def test_conv_matches_flax(ks, strides, padding, dil, spatial):
    rng = np.random.default_rng(len(spatial))
    x = jnp.asarray(rng.standard_normal((2, *spatial, 3)), jnp.float32)
    kw = dict(strides=strides, padding=padding, kernel_dilation=dil)
    ref = nn.Conv(4, ks, **kw)
    plans = _split_plans(len(ks))
    if strides != 1:  # keep compile time down: the plans with col2im / im2col input-grads
        plans = plans[1::2]
    impls = list(conv_ops.CONV_IMPLS) + plans
    _assert_equivalent(ref, {i: Conv(4, ks, impl=i, **kw) for i in impls}, x)


def test_split_plan_names():
    assert conv_split.parse("split_2c1", 3) == ("2", "c", "1")
    assert set(conv_split.choices(2)["igrad"]) == {"x", "c", "0", "1", "2"}
    # Depth folding runs a 3-D convolution as a 2-D one: 3-D kernels only.
    assert set(conv_split.choices(3)["igrad"]) == {"x", "c", "f", "0", "1", "2", "3"}
    assert "f" not in conv_split.choices(3, (3, 1, 1))["fwd"]
    assert conv_split.parse("split_ffx", 3) == ("f", "f", "x")
    with pytest.raises(ValueError, match="needs a 3-D convolution"):
        conv_split.parse("split_fxx", 2)
    # A 1x1x1 kernel: im2col over any axes is one matmul, offered once.
    assert conv_split.choices(3, (1, 1, 1))["fwd"] == ("x", "3")
    with pytest.raises(ValueError, match="over 3 axes"):
        conv_split.parse("split_xx3", 2)
    for bad in ("split_c00", "split_2c", "split_2c14"):
        with pytest.raises(ValueError, match="split_FIW"):
            conv_split.parse(bad, 3)
    with pytest.raises(ValueError, match="split_FIW"):
        set_conv_impl("split_9xx")
    x = jnp.ones((1, 6, 6, 2))
    with pytest.raises(ValueError, match="has 2 spatial axes"):
        Conv(3, (3, 3), impl="split_3xx").init(jax.random.key(0), x)
    with conv_impl("split_1c0"):  # a transposed convolution has no split form: matmul
        assert "conv_general_dilated" not in _ops_of(ConvTranspose(3, (2, 2), strides=2), x)
        assert "conv_general_dilated" not in _ops_of(Conv(3, (3, 3)), x)
    with conv_impl("split_xxx"):
        assert "conv_general_dilated" in _ops_of(Conv(3, (3, 3)), x)


def test_pass_timing_builds_a_valid_plan():
    key = conv_select.ConvKey("conv", 1, (6, 7), 8, 8, (3, 3), (1, 1), (1, 1), ((1, 1),) * 2,
                              "float32")
    passes = conv_tune.time_passes(key, reps=1)
    assert {p: set(ms) for p, ms in passes.items()} == {
        p: set(c) for p, c in conv_split.choices(2, key.kernel, key.strides,
                                                  key.dilation).items()}
    assert all(v > 0 for ms in passes.values() for v in ms.values())
    small = conv_tune.time_passes(key, reps=1, max_buffer_bytes=0)  # only native fits
    assert {p: set(ms) for p, ms in small.items()} == {p: {"x"} for p in passes}
    assert conv_tune.best_plan(small) == "split_xxx"
    assert conv_split.buffer_bytes("fwd", "2", 1, (6, 7), (6, 7), (3, 3), 2, 3) == 42 * 9 * 2 * 4
    # 1-channel input: shifted-slice / 1-axis im2col would contract 1 or 3 numbers.
    thin = dataclasses.replace(key, cin=1)
    assert set(conv_tune.time_passes(thin, reps=1)["fwd"]) == {"x", "2"}
    plan = conv_tune.best_plan(passes)
    assert conv_split.parse(plan, 2) == tuple(min(passes[p], key=passes[p].get)
                                              for p in ("fwd", "igrad", "wgrad"))


def test_keep_freed_memory_is_accepted_by_glibc():
    if not conv_malloc.sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    assert conv_malloc.keep_freed_memory() and conv_malloc.keep_freed_memory()  # idempotent
    y = jax.jit(lambda a: a * 2)(jnp.ones((1 << 20,)))  # allocations still work
    assert float(y.sum()) == 2.0 * (1 << 20)


def test_malloc_env_process_also_switches_trimming_off(monkeypatch):
    # The environment form cannot stop glibc trimming the heap top, so a process already
    # started with MALLOC_ENV must still call keep_freed_memory, and must not restart again.
    calls = []
    monkeypatch.setattr(conv_malloc, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(conv_malloc.os, "execv", lambda *a: pytest.fail("restarted again"))
    for k, v in conv_malloc.MALLOC_ENV.items():
        monkeypatch.setenv(k, v)
    conv_malloc.reexec_with_malloc_env(["script.py"])
    assert calls == [1]


def test_huge_pages_restart_only_the_named_main_module_once(monkeypatch):
    """The restart with glibc's huge-page tunable replaces the process only when the named
    module is the program (never pytest or a library caller), only once (the restarted
    process already carries the tunable) and keeps tunables the user set."""
    execs = []
    monkeypatch.setattr(conv_malloc.os, "execv", lambda *a: execs.append(a))
    monkeypatch.setattr(conv_malloc, "huge_pages_available", lambda: True)
    monkeypatch.setattr("platform.libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    conv_malloc.reexec_with_huge_pages("lungjax.main")  # pytest is the program here
    assert execs == [] and not conv_malloc.huge_pages_on()

    class Main:  # a process started as ``python -m lungjax.main``
        __spec__ = type("Spec", (), {"name": "lungjax.main"})()

    monkeypatch.setitem(conv_malloc.sys.modules, "__main__", Main)
    monkeypatch.setattr(conv_malloc.sys, "platform", "linux")
    monkeypatch.setattr(conv_malloc.sys, "orig_argv", ["python", "-m", "lungjax.main", "--x"])
    conv_malloc.reexec_with_huge_pages("lungjax.main")
    assert execs == [(conv_malloc.sys.executable, ["python", "-m", "lungjax.main", "--x"])]
    assert conv_malloc.os.environ["GLIBC_TUNABLES"] == \
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert conv_malloc.huge_pages_on()
    conv_malloc.reexec_with_huge_pages("lungjax.main")  # the restarted process: no loop
    assert len(execs) == 1
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")  # the user's choice
    conv_malloc.reexec_with_huge_pages("lungjax.main")
    assert len(execs) == 1 and not conv_malloc.huge_pages_on()


@pytest.mark.parametrize("ks,strides,padding,dil,spatial", TRANSPOSE_CASES)
def test_conv_transpose_matches_flax(ks, strides, padding, dil, spatial):
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, *spatial, 3)), jnp.float32)
    kw = dict(strides=strides, padding=padding, kernel_dilation=dil)
    ref = nn.ConvTranspose(4, ks, **kw)
    ours = {i: ConvTranspose(4, ks, impl=i, **kw) for i in conv_ops.CONV_TRANSPOSE_IMPLS}
    _assert_equivalent(ref, ours, x)


@pytest.mark.parametrize("layer", ["conv", "transpose"])
def test_bfloat16_compute_with_float32_params(layer):
    """bfloat16 compute, float32 parameters: matches flax's own bfloat16 layer to bfloat16
    rounding, and the float32 layer to bfloat16 precision (forward)."""
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 6, 6, 8)), jnp.float32)
    if layer == "conv":
        refs = [nn.Conv(16, (3, 3)), nn.Conv(16, (3, 3), dtype=jnp.bfloat16)]
        impls = conv_ops.CONV_IMPLS + ("split_1c0",)
        ours = [Conv(16, (3, 3), impl=i, dtype=jnp.bfloat16) for i in impls]
    else:
        kw = dict(strides=2, dtype=jnp.bfloat16)
        refs = [nn.ConvTranspose(16, (2, 2), strides=2), nn.ConvTranspose(16, (2, 2), **kw)]
        impls = conv_ops.CONV_TRANSPOSE_IMPLS
        ours = [ConvTranspose(16, (2, 2), impl=i, **kw) for i in impls]
    params = _perturbed_params(refs[0], x)
    (y32, _, _), (y16, gp16, _), *results = _all_value_and_grads(refs + ours, params, x)
    scale = float(jnp.max(jnp.abs(y32)))
    for impl, (y, gp, _) in zip(impls, results):
        assert y.dtype == jnp.bfloat16, impl
        assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(gp)), impl
        np.testing.assert_allclose(np.float32(y), y32, atol=2e-2 * scale, err_msg=impl)
        np.testing.assert_allclose(np.float32(y), np.float32(y16), atol=2e-2 * scale, err_msg=impl)
        for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gp16)):
            np.testing.assert_allclose(a, b, atol=3e-2 * float(jnp.max(jnp.abs(b))), err_msg=impl)


def test_batch_axes_and_bias_free():
    m = Conv(5, (3, 3), use_bias=False, impl="matmul")
    x = jnp.ones((2, 3, 7, 7, 2))
    params = m.init(jax.random.key(0), x)
    assert set(params["params"]) == {"kernel"}
    y = m.apply(params, x)
    assert y.shape == (2, 3, 7, 7, 5)
    np.testing.assert_allclose(m.apply(params, x[0, 0]), y[0, 0], rtol=1e-6)  # unbatched input
    np.testing.assert_allclose(y, Conv(5, (3, 3), use_bias=False, impl="xla").apply(params, x),
                               atol=1e-5)


def _ops_of(module, x):
    params = module.init(jax.random.key(0), x)
    return str(jax.make_jaxpr(lambda p: module.apply(p, x))(params))


def test_global_override_and_env(monkeypatch):
    x = jnp.ones((1, 6, 6, 2))
    m = Conv(3, (3, 3), impl="xla")
    assert "conv_general_dilated" in _ops_of(m, x)
    with conv_impl("im2col"):
        assert get_conv_impl_override() == "im2col"
        assert "conv_general_dilated" not in _ops_of(m, x)  # override beats the attribute
    assert get_conv_impl_override() is None
    monkeypatch.setenv(conv_select.ENV_IMPL, "matmul")
    assert "conv_general_dilated" not in _ops_of(m, x)
    set_conv_impl("xla")  # the function beats the environment
    try:
        assert "conv_general_dilated" in _ops_of(Conv(3, (3, 3), impl="matmul"), x)
    finally:
        set_conv_impl(None)
    monkeypatch.setenv(conv_select.ENV_IMPL, "fastest")
    with pytest.raises(ValueError, match=conv_select.ENV_IMPL):
        _ops_of(m, x)
    with pytest.raises(ValueError, match="set_conv_impl"):
        set_conv_impl("cudnn")


def test_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match="spatial axes"):
        Conv(3, (3, 3, 3)).init(jax.random.key(0), jnp.ones((4, 4, 2)))
    with pytest.raises(ValueError, match="padding"):
        Conv(3, (3, 3), padding="CIRCULAR").init(jax.random.key(0), jnp.ones((1, 4, 4, 2)))
    with pytest.raises(ValueError, match="strides"):
        Conv(3, (3, 3), strides=(1, 2, 2)).init(jax.random.key(0), jnp.ones((1, 4, 4, 2)))
    with pytest.raises(TypeError, match="kernel_size"):
        Conv(3, 3).init(jax.random.key(0), jnp.ones((1, 4, 4, 2)))
    with pytest.raises(ValueError, match="window"):
        Conv(3, (5, 5), padding="VALID").init(jax.random.key(0), jnp.ones((1, 4, 4, 2)))


def test_committed_table_is_valid_and_drives_auto():
    table = json.loads(conv_select.TABLE_PATH.read_text(encoding="utf-8"))
    assert table["entries"], "table.json has no measurements"
    for e in table["entries"]:
        key = conv_select.ConvKey.from_json(e["key"])
        impls = conv_ops.CONV_IMPLS if key.kind == "conv" else conv_ops.CONV_TRANSPOSE_IMPLS
        assert e["best"] == conv_tune.pick_best(e["ms"])
        if conv_split.is_split(e["best"]):
            assert key.kind == "conv" and conv_split.parse(e["best"], len(key.kernel))
        else:
            assert e["best"] in impls
        assert conv_select.lookup(key) == (e["best"], "exact")
    # A shape not in the table resolves to the nearest measured one of the same kind/rank.
    key = conv_select.ConvKey("conv", 3, (7, 9, 11), 5, 6, (3, 3, 3), (1, 1, 1), (1, 1, 1),
                              ((1, 1),) * 3, "float32")
    impl, how = conv_select.lookup(key)
    assert how == "nearest"
    assert impl in conv_ops.CONV_IMPLS or conv_split.parse(impl, 3)
    assert conv_select.resolve("auto", key) == impl  # tests run on CPU
    # Nearest only among plans that can run the layer: no Winograd plan (measured on
    # stride-1 layers, v only on kernels <= 3) for a (3, 5, 5), (4, 5, 5) or strided one.
    for kernel, strides in (((3, 5, 5), (1, 1, 1)), ((4, 5, 5), (1, 1, 1)),
                            ((3, 3, 3), (2, 2, 2)), ((3, 3, 3), (1, 1, 1))):
        key = conv_select.ConvKey("conv", 3, (9, 17, 17), 7, 9, kernel, strides, (1, 1, 1),
                                  ((1, 1),) * 3, "float32")
        impl, how = conv_select.lookup(key)
        assert how == "nearest"
        if conv_split.is_split(impl):
            assert conv_split.plan_applies(impl, kernel, strides, (1, 1, 1)), (kernel, impl)
    assert not conv_split.plan_applies("split_wvv", (3, 5, 5), (1, 1, 1), (1, 1, 1))
    assert conv_split.plan_applies("split_wvv", (3, 3, 3), (1, 1, 1), (1, 1, 1))
    assert not conv_split.plan_applies("split_fwx", (3, 3, 3), (1, 2, 2), (1, 1, 1))


def test_sharded_batch_matches_single_device():
    devices = jax.devices()
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    x = jnp.asarray(np.random.default_rng(3).standard_normal((len(devices), 4, 5, 6, 2)),
                    jnp.float32)
    m = Conv(3, (3, 3, 3), impl="matmul")
    params = m.init(jax.random.key(0), x)
    grad = jax.jit(jax.grad(lambda p, xx: jnp.sum(m.apply(p, xx) ** 2)))
    xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    g1, g8 = grad(params, x), grad(params, xs)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def _scan_key(batch=1):
    """dou2017's conv2 (64 -> 64, 3x5x5) applied to a whole 300^3 scan."""
    return conv_select.ConvKey("conv", batch, (296, 146, 146), 64, 64, (3, 5, 5), (1, 1, 1),
                               (1, 1, 1), ((0, 0),) * 3, "float32")


def test_forward_only_over_the_budget_runs_a_lean_plan_not_xla(monkeypatch):
    """A forward-only (inference) convolution whose plan would not fit runs Winograd in
    depth slabs; where that cannot run it or does not fit either, and for training keys and
    1x1x1 kernels, XLA's own; the slab plan gives XLA's result."""
    monkeypatch.delenv(conv_select.ENV_BUDGET, raising=False)
    monkeypatch.setattr(conv_select, "_state", conv_select._State())
    fwd = dataclasses.replace(_scan_key(), mode="forward", cin=1, cout=32)
    assert conv_select.buffer_bytes("im2col", fwd) > conv_select.BUFFER_BUDGET_BYTES
    assert conv_select._within_budget(fwd, conv_select.BUFFER_BUDGET_BYTES) == "split_sxx"
    strided = dataclasses.replace(fwd, strides=(2, 2, 2))  # no Winograd at stride 2
    assert conv_select._within_budget(strided, conv_select.BUFFER_BUDGET_BYTES) == "xla"
    assert conv_select._within_budget(dataclasses.replace(fwd, mode="train"),
                                      conv_select.BUFFER_BUDGET_BYTES) == "xla"
    one = dataclasses.replace(fwd, kernel=(1, 1, 1))
    assert conv_select._within_budget(one, conv_select.BUFFER_BUDGET_BYTES) == "xla"
    assert conv_select._within_budget(fwd, 1) == "xla"  # nothing fits: XLA's own
    # Traced for inference under a budget that rules out im2col but not the lean plans.
    x = jax.random.uniform(jax.random.key(0), (1, 10, 12, 12, 3))
    layer = Conv(4, (3, 3, 3), padding="VALID", impl="auto")
    variables = layer.init(jax.random.key(1), x)
    want = Conv(4, (3, 3, 3), padding="VALID", impl="xla").apply(variables, x)
    monkeypatch.setenv(conv_select.ENV_TUNE, "0")
    monkeypatch.setenv(conv_select.ENV_BUDGET, str(conv_select.buffer_bytes(
        "split_sxx", conv_select.ConvKey("conv", 1, (10, 12, 12), 3, 4, (3, 3, 3), (1, 1, 1),
                                         (1, 1, 1), ((0, 0),) * 3, "float32", "forward"))))
    with conv_select.forward_only():
        assert "conv_general_dilated" not in _ops_of(layer, x)
        got = layer.apply(variables, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_auto_falls_back_to_xla_over_the_buffer_budget(tmp_path, monkeypatch):
    monkeypatch.delenv(conv_select.ENV_BUDGET, raising=False)
    key = _scan_key()
    # A measurement saying im2col is fastest at this shape (an on-disk cache entry).
    monkeypatch.setenv(conv_machine.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.setenv(conv_select.ENV_TUNE, "1")  # this machine's cache is read
    monkeypatch.setattr(conv_select, "_state", conv_select._State())
    small = conv_select.ConvKey("conv", 1, (6, 6), 2, 3, (3, 3), (1, 1), (1, 1),
                                ((1, 1),) * 2, "float32")
    conv_machine.cache_file().write_text(json.dumps({
        "fingerprint": conv_machine.fingerprint(), "entries": [
            {"key": k.to_json(), "best": "im2col", "ms": {"im2col": 1.0, "xla": 2.0}}
            for k in (key, small)]}), encoding="utf-8")
    patches = 1 * 294 * 142 * 142 * 75 * 64 * 4  # batch * out voxels * K * C_in * 4 bytes
    assert conv_select.buffer_bytes("im2col", key) == patches > conv_select.BUFFER_BUDGET_BYTES
    assert conv_select.buffer_bytes("matmul", key) == patches
    assert conv_select.buffer_bytes("xla", key) == 0
    # A split plan: its largest pass; "x" passes build nothing.
    assert conv_select.buffer_bytes("split_xxx", key) == 0
    assert 0 < conv_select.buffer_bytes("split_1xx", key) < patches
    # A batch-chunked plan builds one chunk's buffers at a time.
    batch4 = dataclasses.replace(key, batch=4)
    assert conv_select.buffer_bytes("split_1xxb4", batch4) == \
        conv_select.buffer_bytes("split_1xx", batch4) // 4
    assert conv_select.buffer_bytes("split_1xxb3", batch4) == \
        conv_select.buffer_bytes("split_1xx", batch4)  # 3 does not divide 4: unchunked
    assert conv_select.lookup(key) == ("im2col", "tuned")
    assert conv_select.resolve("auto", key) == "xla"
    assert conv_select.resolve("im2col", key) == "im2col"  # a forced choice is kept
    monkeypatch.setenv(conv_select.ENV_BUDGET, "0")  # disabled
    assert conv_select.resolve("auto", key) == "im2col"
    # A tiny layer under a tiny budget runs XLA's native convolution.
    x = jnp.ones((1, 6, 6, 2))
    monkeypatch.setenv(conv_select.ENV_BUDGET, "64")
    assert "conv_general_dilated" in _ops_of(Conv(3, (3, 3), impl="auto"), x)
    monkeypatch.setenv(conv_select.ENV_BUDGET, str(2 ** 40))
    assert "conv_general_dilated" not in _ops_of(Conv(3, (3, 3), impl="auto"), x)
    monkeypatch.setenv(conv_select.ENV_BUDGET, "1GiB")
    with pytest.raises(ValueError, match=conv_select.ENV_BUDGET):
        conv_select.resolve("auto", key)
    # Transposed: a 2x2x2 stride-2 up-convolution's matmul form builds only its output.
    up = conv_select.ConvKey("conv_transpose", 1, (75, 75, 75), 64, 64, (2, 2, 2), (2, 2, 2),
                             (1, 1, 1), ((1, 1),) * 3, "float32")
    assert conv_select.buffer_bytes("matmul", up) == 0


def test_export_with_auto_convolutions_and_symbolic_batch(tmp_path):
    from lungjax.export import export_predictor, load_predictor
    from lungjax.models.fcn import Dou2017FCN
    from lungjax.steps import make_predict_fn
    from lungjax.tasks.classification import ClassificationTask

    model = Dou2017FCN(features=(4, 4, 8, 8), conv_impl="auto")
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 10, 30, 30, 1)))
    rng = np.random.default_rng(5)
    variables = jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(s.dtype),
                             shapes)
    predict = make_predict_fn(model, ClassificationTask())
    # A symbolic batch: the layers are looked up per example (batch 1).
    b = jax.export.symbolic_shape("b")[0]
    key = conv_select.ConvKey("conv", b, (10, 30, 30), 1, 4, (3, 5, 5), (1, 1, 1), (1, 1, 1),
                              ((0, 0),) * 3, "float32")
    assert conv_select.concrete_key(key).batch == 1
    assert conv_select.resolve("auto", key) == conv_select.resolve(
        "auto", dataclasses.replace(key, batch=1))
    sidecar = export_predictor(str(tmp_path), predict, variables, (10, 30, 30), {})
    assert sidecar["input"]["shape"] == ["b", 10, 30, 30, 1]
    loaded, _ = load_predictor(str(tmp_path))
    x = rng.random((3, 10, 30, 30, 1), dtype=np.float32)
    # The exported program looks its layers up at batch 1, the jitted one at batch 3: they
    # may run different formulations (Winograd rounds to ~2e-5 of the magnitude).
    np.testing.assert_allclose(loaded(x), np.asarray(jax.jit(predict)(variables, x)),
                               rtol=1e-4, atol=1e-6)
    # Symbolic spatial sizes too: no bound on the buffers, so XLA's convolution.
    d = jax.export.symbolic_shape("d")[0]
    assert conv_select.concrete_key(dataclasses.replace(key, spatial=(d, 30, 30))) is None
    assert conv_select.resolve("auto", dataclasses.replace(key, spatial=(d, 30, 30))) == "xla"


@pytest.mark.parametrize("shape,window", [((3, 6, 11, 13, 4), (1, 2, 2)),
                                          ((2, 5, 7, 9, 3), (2, 2, 2)),
                                          ((2, 10, 9, 5), (2, 2))])
def test_max_pool_matches_flax_values_and_gradients(shape, window):
    rng = np.random.default_rng(sum(shape))
    # ReLU outputs: many windows tie at 0, where the gradient must go to the first maximum.
    x = jnp.maximum(jnp.asarray(rng.standard_normal(shape) - 1.0, jnp.float32), 0.0)
    ref = lambda x: nn.max_pool(x, window, strides=window, padding="VALID")  # noqa: E731
    dx = jax.grad(lambda x: jnp.sum(jnp.sin(max_pool(x, window))))(x)
    dx_ref = jax.grad(lambda x: jnp.sum(jnp.sin(ref(x))))(x)
    np.testing.assert_array_equal(max_pool(x, window), ref(x))
    np.testing.assert_array_equal(dx, dx_ref)
    assert float(jnp.mean(ref(x) == 0)) > 0.01  # all-zero windows: ties were exercised
    with pytest.raises(ValueError, match="max_pool: window"):
        max_pool(x, window[1:])


def _tree_sig(tree):
    return jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype).name), tree)


@pytest.mark.parametrize("shape", [(3, 5, 6, 7), (2, 4, 5, 6, 3)])
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_batch_norm_matches_flax(shape, dtype):
    # Same variables, outputs, running averages and gradients as flax.linen.BatchNorm, in
    # training and evaluation, float32 and bfloat16 compute; flax's variables load as they
    # are (checkpoints move between the two).
    rng = np.random.default_rng(len(shape))
    x = jnp.asarray(rng.standard_normal(shape) * 3 + 1, jnp.float32)
    g = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    kw = {"momentum": 0.9, "epsilon": 1e-5, "dtype": dtype}
    ref = nn.BatchNorm(use_running_average=False, **kw)
    ours = BatchNorm(use_running_average=False, **kw)
    variables = ref.init(jax.random.key(0), x)
    assert _tree_sig(ours.init(jax.random.key(0), x)) == _tree_sig(variables)
    # non-trivial scale, bias and running averages
    variables = jax.tree.map(lambda a: a + jnp.linspace(0.2, 0.7, a.shape[-1]), variables)

    def loss(module, params, x):
        y, stats = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return jnp.vdot(nn.relu(y).astype(jnp.float32), g), (y, stats)

    tol = 1e-5 if dtype is None else 1e-2
    (_, (y_ref, s_ref)), d_ref = jax.value_and_grad(
        lambda p, x: loss(ref, p, x), argnums=(0, 1), has_aux=True)(variables["params"], x)
    (_, (y, s)), d = jax.value_and_grad(
        lambda p, x: loss(ours, p, x), argnums=(0, 1), has_aux=True)(variables["params"], x)
    assert y.dtype == y_ref.dtype
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32),
                               rtol=tol, atol=tol)
    for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(s_ref)):  # running averages
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(d), jax.tree.leaves(d_ref)):  # d/dparams, d/dx
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=tol, atol=tol * float(jnp.abs(b).max()))
    evaluated = BatchNorm(use_running_average=True, **kw).apply(variables, x)
    want = nn.BatchNorm(use_running_average=True, **kw).apply(variables, x)
    np.testing.assert_allclose(np.asarray(evaluated, np.float32), np.asarray(want, np.float32),
                               rtol=tol, atol=tol)
    # initializing leaves the running averages at 0 and 1
    fresh = ours.init(jax.random.key(0), x)["batch_stats"]
    assert float(jnp.abs(fresh["mean"]).max()) == 0
    assert float(jnp.abs(fresh["var"] - 1).max()) == 0
