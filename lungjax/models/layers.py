"""Shared layers. Every lungjax model builds its convolutions through ``Conv`` /
``ConvTranspose`` here, so the implementation (XLA's native convolution or a CPU-fast
formulation built from matmuls) is chosen in one place.

Parameters are created directly in these modules with ``flax.linen.Conv`` /
``flax.linen.ConvTranspose``'s names, shapes and initialisers ("kernel": (*kernel_size,
C_in, C_out), "bias": (C_out,)), so a checkpoint trained with one formulation loads in any
other, and in plain ``flax.linen`` models.

Choosing the formulation (see ``lungjax.models.conv.select``):

* ``impl="auto"`` (default): XLA's native convolution on GPU/TPU; on CPU the formulation
  this machine measured fastest for the layer shape and pass (training or forward-only),
  measured on first use within a few seconds and cached per machine fingerprint, else the
  one measured for the nearest shape in the shipped ``lungjax/models/conv/table.json``
  (regenerate with ``python bench/conv_autotune.py``; ``LUNGJAX_CONV_TUNE=0`` uses it
  alone); a choice whose temporary buffers (im2col patches)
  would exceed ``conv_select.BUFFER_BUDGET_BYTES`` (1 GiB, env ``LUNGJAX_CONV_BUFFER_BYTES``)
  runs "xla" instead, so "auto" is safe on whole scans. A symbolic batch size
  (``jax.export``) is budgeted per example; symbolic spatial sizes run "xla".
* ``impl="xla" | "im2col" | "matmul" | "hybrid"`` forces one for that layer;
  ``impl="split_FIW"`` picks a formulation per pass (forward, input-gradient,
  weight-gradient; see ``lungjax.models.conv.split``), which is what the table mostly holds:
  for 3-D layers often ``f``, the depth-folded form that runs a 3-D convolution as one
  2-D convolution (which XLA:CPU hands to YNNPACK), or ``w``/``v``, Winograd's minimal
  filtering with 4 or 6 outputs per tile and axis (stride-1 layers).
* ``set_conv_impl(name)`` (from a config) or ``LUNGJAX_CONV_IMPL=name`` forces one for all
  layers traced afterwards, overriding the layer attribute.

``max_pool`` is the non-overlapping max-pooling the models use (``flax.linen.max_pool``'s
values and gradients, faster on CPU); ``BatchNorm`` is ``flax.linen.BatchNorm`` (same
variables, statistics and running averages) in a form whose gradient is cheaper.

On CPU, large convolution buffers are cheaper when freed memory stays in the process
(``lungjax.models.conv.malloc.keep_freed_memory()``, called early by a training or inference
program).
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from lungjax.models.conv import ops as conv_ops
from lungjax.models.conv.select import (ConvKey, conv_impl, get_conv_impl_override, resolve,
                                        set_conv_impl)

__all__ = ["BatchNorm", "Conv", "ConvTranspose", "max_pool", "set_conv_impl",
           "get_conv_impl_override", "conv_impl"]


def _window_views(x, window):
    """The prod(window) strided views x[:, o_1::w_1, o_2::w_2, ..., :] (offsets in row-major
    order), each cropped to the whole windows: (N, *spatial // window, C)."""
    n_out = [s // w for s, w in zip(x.shape[1:-1], window)]
    for offs in itertools.product(*[range(w) for w in window]):
        yield x[(slice(None),) + tuple(slice(o, o + (m - 1) * w + 1, w) for o, m, w in
                                       zip(offs, n_out, window)) + (slice(None),)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool(x, window):
    n_out = [s // w for s, w in zip(x.shape[1:-1], window)]
    crop = x[(slice(None),) + tuple(slice(0, m * w) for m, w in zip(n_out, window))]
    shape = [x.shape[0]] + [v for m, w in zip(n_out, window) for v in (m, w)] + [x.shape[-1]]
    return crop.reshape(shape).max(axis=tuple(2 + 2 * a for a in range(len(window))))


def _max_pool_fwd(x, window):
    y = _max_pool(x, window)
    return y, (x, y)


def _max_pool_bwd(window, res, g):
    # The whole gradient to the first maximum of each window in row-major order, as XLA's
    # select-and-scatter (flax.linen.max_pool's gradient) gives it; windows of ReLU
    # outputs often tie at 0.
    x, y = res
    taken = jnp.zeros(y.shape, bool)
    parts = []
    for view in _window_views(x, window):
        first = (view == y) & ~taken
        taken = taken | first
        parts.append(jnp.where(first, g, jnp.zeros((), g.dtype)))
    # (prod(window), N, *out, C) -> (N, out_1, w_1, out_2, w_2, .., C), padded to x's size.
    rank = len(window)
    dx = jnp.stack(parts).reshape(*window, *y.shape)
    dx = dx.transpose([rank] + [v for a in range(rank) for v in (rank + 1 + a, a)]
                      + [2 * rank + 1])
    dx = dx.reshape(x.shape[0], *[m * w for m, w in zip(y.shape[1:-1], window)], x.shape[-1])
    pad = [(0, 0)] + [(0, s - m * w) for s, m, w in zip(x.shape[1:-1], y.shape[1:-1], window)]
    return (jnp.pad(dx, pad + [(0, 0)]),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x, window: Sequence[int]):
    """Max-pooling over non-overlapping windows (stride = window, "VALID": trailing samples
    that do not fill a window are dropped), equal in values and gradient to
    ``flax.linen.max_pool(x, window, strides=window, padding="VALID")``.

    Written as a reshape + max (forward) and strided views (gradient) instead of XLA's
    reduce-window / select-and-scatter, which XLA:CPU runs slowly: forward + backward of a
    (1, 2, 2) pool on 64x8x26x26x64 (ReLU outputs) took 215 ms that way, 122 ms this way
    (``python bench/pool_bench.py``).

    Args:
      x: (N, *spatial, C); window: one size per spatial axis.

    Returns:
      (N, *(spatial // window), C) in x's dtype.
    """
    window = tuple(int(w) for w in window)
    if len(window) != x.ndim - 2:
        raise ValueError(f"max_pool: window {window} for an input of shape {x.shape} "
                         f"(expected {x.ndim - 2} sizes: (N, *spatial, C))")
    return _max_pool(x, window)


class BatchNorm(nn.Module):
    """Batch normalization over every axis but the last (channels): ``flax.linen.BatchNorm``
    with its defaults (fast variance E[x^2] - E[x]^2 clipped at 0, statistics in at least
    float32, no cross-device axis name: under ``jax.sharding`` the batch statistics are
    global already), the same variables ("params": "scale", "bias"; "batch_stats": "mean",
    "var", all (C,)), the same running-average update and output dtype, so checkpoints
    move between the two.

    The normalization is written ``x * a + b`` with per-channel ``a = scale / sqrt(var +
    eps)`` and ``b = bias - mean * a``, where flax writes ``(x - mean) * a + bias``: the same
    values, but its gradient needs ``x`` only, not the centred copy, one full-size pass
    fewer. BatchNorm + ReLU forward and backward on 2x48x48x48x24: 8.07 ms as
    ``flax.linen.BatchNorm``, 5.41 ms this way; 16x24x60x60x32: 73.4 and 50.5 ms
    (``python bench/norm_bench.py``).

    Attributes:
      use_running_average: normalize by the running averages (evaluation) instead of the
        batch statistics (training, which updates the averages unless initializing).
      momentum: running average = momentum * average + (1 - momentum) * batch statistic.
      epsilon: added to the variance.
      dtype: output dtype (None: x's promoted with the parameters', as flax).
      param_dtype: of scale and bias.
    """

    use_running_average: bool | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None):
        """(..., C) -> (..., C), statistics over all leading axes."""
        use_ra = nn.merge_param("use_running_average", self.use_running_average,
                                use_running_average)
        c = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32),
                                (c,))
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32),
                               (c,))
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        stat_dtype = jnp.promote_types(self.dtype or x.dtype, jnp.float32)
        xs = x.astype(stat_dtype)
        if use_ra:
            mean, var = ra_mean.value, ra_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            mean = xs.mean(axes)
            var = jnp.maximum(0.0, jnp.square(xs).mean(axes) - jnp.square(mean))
            if not self.is_initializing():
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        a = lax.rsqrt(var + self.epsilon) * scale
        b = bias - mean * a
        out_dtype = nn.dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
        return (xs * a + b).astype(out_dtype)


def _flatten_batch(x, rank: int, name: str):
    """(*batch, *spatial, C) -> (B, *spatial, C) and the batch shape to restore."""
    nb = x.ndim - (rank + 1)
    if nb < 0:
        raise ValueError(f"{name}: input of shape {x.shape} has fewer than {rank} spatial axes + "
                         "channels; expected channels-last (*batch, *spatial, C)")
    if nb == 1:
        return x, None
    batch_shape = x.shape[:nb]
    return x.reshape((-1,) + x.shape[nb:]), batch_shape


def _restore_batch(y, batch_shape):
    if batch_shape is None:
        return y
    return y.reshape(batch_shape + y.shape[1:])


class Conv(nn.Module):
    """N-d convolution on channels-last inputs (2D: (B, H, W, C); 3D: (B, D, H, W, C)).

    Same semantics as ``flax.linen.Conv`` (no groups, no input dilation): any number of
    leading batch axes (none means a single example); output (B, *out, features) where out
    follows the padding ("SAME": ceil(n / stride); "VALID": floor((n - dilated_k) / s) + 1;
    ints or (low, high) pairs per axis as in ``lax.conv_general_dilated``).

    Attributes:
      features: C_out.
      kernel_size: one int per spatial axis (the rank of the convolution).
      strides, kernel_dilation: int or one per spatial axis.
      padding: "SAME", "VALID", an int, or one int / (low, high) pair per spatial axis.
      use_bias: add a learned (C_out,) bias.
      impl: "auto", "xla", "im2col", "matmul", "hybrid" or "split_FIW" (module docstring).
      dtype: computation dtype (inputs and parameters are promoted to it, e.g. bfloat16);
        None -> promoted dtype of input and parameters.
      param_dtype: parameter dtype (default float32).
      kernel_init, bias_init: initialisers (flax's defaults).
    """

    features: int
    kernel_size: Sequence[int]
    strides: int | Sequence[int] = 1
    padding: Any = "SAME"
    kernel_dilation: int | Sequence[int] = 1
    use_bias: bool = True
    impl: str = "auto"
    dtype: Any = None
    param_dtype: Any = None
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        if isinstance(self.kernel_size, int):
            raise TypeError("Conv.kernel_size must be a sequence (one int per spatial axis), "
                            f"got {self.kernel_size!r}")
        ks = tuple(int(k) for k in self.kernel_size)
        rank = len(ks)
        x, batch_shape = _flatten_batch(x, rank, "Conv")
        strides = conv_ops.as_tuple(self.strides, rank, "Conv.strides")
        dilation = conv_ops.as_tuple(self.kernel_dilation, rank, "Conv.kernel_dilation")
        pads = conv_ops.canonical_padding(self.padding, ks, strides, dilation, x.shape[1:-1])
        param_dtype = self.param_dtype or jnp.float32
        kernel = self.param("kernel", self.kernel_init, ks + (x.shape[-1], self.features),
                            param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), param_dtype)
                if self.use_bias else None)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        key = ConvKey("conv", x.shape[0], tuple(x.shape[1:-1]), x.shape[-1], self.features, ks,
                      strides, dilation, pads, jnp.dtype(x.dtype).name)
        impl = resolve(self.impl, key)
        y = conv_ops.conv(x, kernel, strides=strides, pads=pads, dilation=dilation, impl=impl)
        if bias is not None:
            y = y + bias
        return _restore_batch(y, batch_shape)


class ConvTranspose(nn.Module):
    """N-d transposed convolution (decoder up-sampling), channels-last.

    Same semantics and parameters as ``flax.linen.ConvTranspose`` with
    ``transpose_kernel=False`` ("kernel": (*kernel_size, C_in, C_out)): with "SAME" padding
    the output is input * stride per axis; with "VALID" (n - 1) * s + dilated_k. The
    kernel == stride case (2x2(x2) stride 2 up-convolutions) runs on CPU as one per-pixel
    matmul + depth-to-space; other kernels as a matmul + overlap-add of the taps.

    Attributes:
      features: C_out.
      kernel_size: one int per spatial axis.
      strides: int or one per spatial axis (None -> 1).
      padding: "SAME", "VALID", an int, or one int / (low, high) pair per axis (explicit
        pads of the lhs-dilated convolution, as in ``lax.conv_transpose``).
      kernel_dilation: int or one per spatial axis.
      use_bias, impl ("auto", "xla", "matmul", "im2col"), dtype, param_dtype, kernel_init,
      bias_init: as in ``Conv``.
    """

    features: int
    kernel_size: Sequence[int]
    strides: int | Sequence[int] | None = None
    padding: Any = "SAME"
    kernel_dilation: int | Sequence[int] = 1
    use_bias: bool = True
    impl: str = "auto"
    dtype: Any = None
    param_dtype: Any = None
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        if isinstance(self.kernel_size, int):
            raise TypeError("ConvTranspose.kernel_size must be a sequence (one int per spatial "
                            f"axis), got {self.kernel_size!r}")
        ks = tuple(int(k) for k in self.kernel_size)
        rank = len(ks)
        x, batch_shape = _flatten_batch(x, rank, "ConvTranspose")
        strides = conv_ops.as_tuple(self.strides, rank, "ConvTranspose.strides")
        dilation = conv_ops.as_tuple(self.kernel_dilation, rank, "ConvTranspose.kernel_dilation")
        pads = conv_ops.transpose_padding(self.padding, ks, strides, dilation)
        param_dtype = self.param_dtype or jnp.float32
        kernel = self.param("kernel", self.kernel_init, ks + (x.shape[-1], self.features),
                            param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), param_dtype)
                if self.use_bias else None)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        key = ConvKey("conv_transpose", x.shape[0], tuple(x.shape[1:-1]), x.shape[-1],
                      self.features, ks, strides, dilation, pads, jnp.dtype(x.dtype).name)
        impl = resolve(self.impl, key)
        y = conv_ops.conv_transpose(x, kernel, strides=strides, pads=pads, dilation=dilation,
                                    impl=impl)
        if bias is not None:
            y = y + bias
        return _restore_batch(y, batch_shape)
