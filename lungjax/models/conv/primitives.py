"""Building blocks shared by the convolution formulations (``ops``, ``split``,
``winograd``): output shapes, shifted-slice im2col (``patches``), matmuls that accumulate
low-precision inputs in float32, XLA's native convolution and the input-gradient as a
correlation. Arrays are channels-last: (N, *spatial, C) inputs, (*kernel, C_in, C_out)
kernels; padding is explicit, one (low, high) pair per spatial axis.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

Pads = tuple[tuple[int, int], ...]


def conv_out_shape(in_spatial: Sequence[int], kernel_size: Sequence[int], strides: Sequence[int],
                   pads: Pads, dilation: Sequence[int]) -> tuple[int, ...]:
    """Output spatial shape of a convolution (floor mode, as XLA)."""
    out = []
    for n, k, s, (lo, hi), d in zip(in_spatial, kernel_size, strides, pads, dilation):
        span = n + lo + hi - ((k - 1) * d + 1)
        if span < 0:
            raise ValueError(f"convolution window ({k} dilated by {d}) larger than the padded "
                             f"input ({n} + {lo} + {hi}) on a spatial axis")
        out.append(span // s + 1)
    return tuple(out)


def acc_dtype(dtype):
    """``preferred_element_type`` of a matmul on ``dtype`` inputs: float32 for inputs
    narrower than 32 bits (bfloat16 products summed in bfloat16 lose precision), else None
    (the inputs' own type)."""
    return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else None


def dot_last(a, b, out_dtype):
    """(..., K) @ (K, M) -> (..., M), accumulating in float32 for low-precision inputs."""
    acc = acc_dtype(a.dtype)
    y = lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())), preferred_element_type=acc)
    return y.astype(out_dtype)


def patches(x, kernel_size: Sequence[int], strides: Sequence[int], pads: Pads,
            dilation: Sequence[int], lhs_dilation: Sequence[int] | None = None):
    """Shifted-slice im2col.

    Args:
      x: (N, *spatial, C).
      kernel_size, strides, dilation: per spatial axis; pads: (low, high) per axis (may be
        negative, meaning a crop); lhs_dilation: zeros inserted between input samples
        (``s - 1`` per axis), as in a transposed convolution.

    Returns:
      (N, *out, K*C) with K = prod(kernel_size); taps in row-major kernel order, channels
      fastest, matching ``kernel.reshape(K*C_in, C_out)``.
    """
    rank = len(kernel_size)
    lhs_dilation = lhs_dilation or (1,) * rank
    cfg = [(0, 0, 0)] + [(lo, hi, ld - 1) for (lo, hi), ld in zip(pads, lhs_dilation)] + [(0, 0, 0)]
    if any(c != (0, 0, 0) for c in cfg):
        x = lax.pad(x, jnp.zeros((), x.dtype), cfg)
    out = conv_out_shape(x.shape[1:-1], kernel_size, strides, ((0, 0),) * rank, dilation)
    if all(k == 1 for k in kernel_size):
        limit = [x.shape[0]] + [(o - 1) * s + 1 for o, s in zip(out, strides)] + [x.shape[-1]]
        return lax.slice(x, [0] * x.ndim, limit, (1, *strides, 1))
    # One axis at a time (last spatial axis first, so the first axis ends up outermost in
    # the channel order): sum(k) slices instead of prod(k), which keeps XLA's compile time
    # and the autodiff graph small; the intermediate results are at most the final size.
    for ax in reversed(range(rank)):
        k, s, d, o = kernel_size[ax], strides[ax], dilation[ax], out[ax]
        if k == 1 and s == 1:
            continue
        cols = []
        for t in range(k):
            start = [0] * x.ndim
            start[1 + ax] = t * d
            limit = list(x.shape)
            limit[1 + ax] = t * d + (o - 1) * s + 1
            step = [1] * x.ndim
            step[1 + ax] = s
            cols.append(lax.slice(x, start, limit, step))
        # stack + reshape, not concatenate: XLA:CPU fuses the slices into one loop that
        # writes the columns once; a concatenate runs as a copy of separately
        # materialised slices (3x slower on a 2x26^3x64 input).
        x = cols[0] if k == 1 else jnp.stack(cols, axis=-2).reshape(*cols[0].shape[:-1], -1)
    return x


def conv_xla(x, w, strides, pads, dilation):
    """``lax.conv_general_dilated`` channels-last; low-precision inputs accumulate in f32."""
    rank = w.ndim - 2
    spec = "N" + "DHW"[3 - rank:] + "C" if rank <= 3 else None
    if spec is None:
        raise ValueError(f"only 1D/2D/3D convolutions are supported, got kernel rank {w.ndim}")
    dn = lax.conv_dimension_numbers(x.shape, w.shape, (spec, spec[1:-1] + "IO", spec))
    return lax.conv_general_dilated(x, w, tuple(strides), tuple(pads), rhs_dilation=tuple(dilation),
                                    dimension_numbers=dn)


def transposed_correlation(w, in_spatial, out_spatial, strides, pads, dilation):
    """The input-gradient of a convolution as a stride-1 correlation: (flipped kernel with
    C_in and C_out swapped (*kernel, C_out, C_in), pads) to apply to dy (N, *out_spatial,
    C_out) spread out by ``s - 1`` zeros between samples (``lhs_dilation=strides``):
    pads' = ((k-1)d - lo, n + lo - len(dy_dilated)) per axis."""
    rank = len(w.shape) - 2
    new_pads = tuple(((k - 1) * d - lo, n + lo - ((o - 1) * s + 1)) for n, k, s, (lo, _), d, o
                     in zip(in_spatial, w.shape[:rank], strides, pads, dilation, out_spatial))
    return jnp.flip(w, axis=tuple(range(rank))).swapaxes(-1, -2), new_pads


def input_grad_col2im(x, dy, w, strides, pads, dilation):
    """dx as (dy @ W^T) scattered back through the transpose of ``patches`` (pad + add)."""
    cols_grad = dot_last(dy, w.reshape(-1, w.shape[-1]).T, dy.dtype)
    _, vjp = jax.vjp(lambda xx: patches(xx, w.shape[:-2], strides, pads, dilation), x)
    return vjp(cols_grad)[0]
