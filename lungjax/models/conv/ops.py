"""Functional N-d convolutions (channels-last) in interchangeable formulations.

Every function here computes exactly what ``jax.lax.conv_general_dilated`` computes for
``dimension_numbers`` (N, *spatial, C) x (*spatial, C_in, C_out) -> (N, *spatial, C_out); they
differ only in which XLA operations do the work, because XLA:CPU runs its native
convolutions (forward, input-gradient and above all weight-gradient) far below its own
matmul speed, while GPU/TPU backends run native convolutions best.

Formulations of ``conv`` (``CONV_IMPLS``):

* ``"xla"``: ``lax.conv_general_dilated``; gradients by XLA's transposed convolutions.
* ``"im2col"``: the input is padded once, the ``prod(kernel)`` shifted (strided, dilated)
  slices are concatenated on the channel axis ("patches", (N, *out, K*C_in)) and one matmul
  with the kernel reshaped to (K*C_in, C_out) gives the output. Gradients by autodiff:
  matmuls plus pad-and-add of the slices.
* ``"matmul"``: the same forward inside a ``jax.custom_vjp`` whose backward is matmuls too:
  the weight-gradient is patches(x)^T @ dy (patches recomputed, so only ``x`` is kept); the
  input-gradient is either (dy @ W^T) scattered back through the transposed slices or the
  im2col correlation of the (stride-dilated) output gradient with the flipped kernel,
  whichever has the smaller intermediate (it differs by C_out/C_in and in/out sizes).
* ``"hybrid"``: native forward and input-gradient, matmul weight-gradient (custom VJP); the
  lowest peak memory of the CPU formulations.
* ``"split_FIW"``: one formulation per pass (forward, input-gradient, weight-gradient),
  including partial im2col, shifted-slice accumulation, depth folding and Winograd's
  minimal filtering (``winograd``); ``"split_FIWbK"`` runs those
  passes over the batch in K sequential chunks to bound their memory; see ``split``.

Formulations of ``conv_transpose`` (``CONV_TRANSPOSE_IMPLS``): ``"xla"``
(``lax.conv_transpose``), ``"matmul"`` (a per-pixel matmul C_in -> K*C_out followed by
depth-to-space when the kernel equals the stride, or by an overlap-add of the K taps
otherwise) and ``"im2col"`` (the lhs-dilated convolution through ``"im2col"``).

Padding is always given here in explicit form: one (low, high) pair per spatial axis
(``canonical_padding`` converts "SAME"/"VALID"/ints the way ``flax.linen`` does).
"""

from __future__ import annotations

import itertools
from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lungjax.models.conv import split as conv_split
from lungjax.models.conv.primitives import (Pads, acc_dtype, conv_xla, dot_last, input_grad_col2im,
                                            patches, transposed_correlation)

CONV_IMPLS = ("xla", "im2col", "matmul", "hybrid")
CONV_TRANSPOSE_IMPLS = ("xla", "matmul", "im2col")


# ----------------------------------------------------------------------------------------
# Shapes and padding
# ----------------------------------------------------------------------------------------


def as_tuple(value: int | Sequence[int] | None, rank: int, name: str, default: int = 1):
    """Broadcasts an int (or None -> ``default``) to a ``rank``-tuple; checks a sequence."""
    if value is None:
        value = default
    if isinstance(value, (int, np.integer)):
        return (int(value),) * rank
    value = tuple(int(v) for v in value)
    if len(value) != rank:
        raise ValueError(f"{name}={value} must have {rank} entries (one per spatial axis)")
    return value


def canonical_padding(padding: Any, kernel_size: Sequence[int], strides: Sequence[int],
                      dilation: Sequence[int], in_spatial: Sequence[int]) -> Pads:
    """Explicit (low, high) pads per spatial axis, with ``flax.linen.Conv`` semantics.

    Args:
      padding: "SAME", "VALID", an int, or one int or (low, high) pair per spatial axis.
      kernel_size, strides, dilation: per spatial axis.
      in_spatial: input spatial shape (needed by "SAME", which depends on it with strides).
    """
    rank = len(kernel_size)
    if isinstance(padding, str):
        mode = padding.upper()
        if mode not in ("SAME", "VALID"):
            raise ValueError(f"padding={padding!r}: only 'SAME', 'VALID', ints or pairs "
                             "are supported")
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
        return tuple(lax.padtype_to_pads(tuple(in_spatial), dilated, tuple(strides), mode))
    if isinstance(padding, (int, np.integer)):
        return ((int(padding), int(padding)),) * rank
    if isinstance(padding, Sequence) and len(padding) == rank:
        out = []
        for p in padding:
            if isinstance(p, (int, np.integer)):
                out.append((int(p), int(p)))
            elif isinstance(p, Sequence) and len(p) == 2:
                out.append((int(p[0]), int(p[1])))
            else:
                break
        if len(out) == rank:
            return tuple(out)
    raise ValueError(f"padding={padding!r}: expected 'SAME', 'VALID', an int, or {rank} ints or "
                     "(low, high) pairs")


# ----------------------------------------------------------------------------------------
# Forward formulations
# ----------------------------------------------------------------------------------------


def conv_im2col(x, w, strides, pads, dilation):
    """Convolution as shifted-slice im2col + one matmul; autodiff gradients."""
    ks = w.shape[:-2]
    cols = patches(x, ks, strides, pads, dilation)
    return dot_last(cols, w.reshape(-1, w.shape[-1]), x.dtype)


def _weight_grad(x, dy, w_shape, w_dtype, strides, pads, dilation):
    """dW = patches(x)^T @ dy, reshaped to (*k, C_in, C_out)."""
    cols = patches(x, w_shape[:-2], strides, pads, dilation)
    cols = cols.reshape(-1, cols.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    acc = acc_dtype(cols.dtype)
    dw = lax.dot_general(cols, dy2, (((0,), (0,)), ((), ())), preferred_element_type=acc)
    return dw.reshape(w_shape).astype(w_dtype)


def _input_grad_matmul(dy, w, in_spatial, strides, pads, dilation):
    """dx of a convolution as an im2col correlation of dy with the flipped kernel
    (``transposed_correlation``)."""
    ks = w.shape[:-2]
    rank = len(ks)
    w_t, new_pads = transposed_correlation(w, in_spatial, dy.shape[1:-1], strides, pads,
                                           dilation)
    cols = patches(dy, ks, (1,) * rank, new_pads, dilation, lhs_dilation=strides)
    return dot_last(cols, w_t.reshape(-1, w_t.shape[-1]), dy.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_matmul(x, w, strides, pads, dilation):
    """im2col forward; matmul input- and weight-gradients (custom VJP, keeps only x, w)."""
    return conv_im2col(x, w, strides, pads, dilation)


def _conv_matmul_fwd(x, w, strides, pads, dilation):
    return conv_im2col(x, w, strides, pads, dilation), (x, w)


def _conv_matmul_bwd(strides, pads, dilation, res, dy):
    x, w = res
    # Both input-gradient forms are one matmul; pick the smaller intermediate:
    # (N, *out, K*C_in) columns to scatter back vs (N, *in, K*C_out) patches of dy.
    k = int(np.prod(w.shape[:-2]))
    out_cols = int(np.prod(dy.shape[:-1])) * k * w.shape[-2]
    in_cols = int(np.prod(x.shape[:-1])) * k * w.shape[-1]
    if out_cols <= in_cols:
        dx = input_grad_col2im(x, dy, w, strides, pads, dilation).astype(x.dtype)
    else:
        dx = _input_grad_matmul(dy, w, x.shape[1:-1], strides, pads, dilation).astype(x.dtype)
    dw = _weight_grad(x, dy, w.shape, w.dtype, strides, pads, dilation)
    return dx, dw


conv_matmul.defvjp(_conv_matmul_fwd, _conv_matmul_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_hybrid(x, w, strides, pads, dilation):
    """Native forward and input-gradient, matmul weight-gradient (custom VJP)."""
    return conv_xla(x, w, strides, pads, dilation)


def _conv_hybrid_fwd(x, w, strides, pads, dilation):
    return conv_xla(x, w, strides, pads, dilation), (x, w)


def _conv_hybrid_bwd(strides, pads, dilation, res, dy):
    x, w = res
    _, vjp_x = jax.vjp(lambda xx: conv_xla(xx, w, strides, pads, dilation), x)
    (dx,) = vjp_x(dy)
    dw = _weight_grad(x, dy, w.shape, w.dtype, strides, pads, dilation)
    return dx, dw


conv_hybrid.defvjp(_conv_hybrid_fwd, _conv_hybrid_bwd)

_CONV_FNS = {"xla": conv_xla, "im2col": conv_im2col, "matmul": conv_matmul, "hybrid": conv_hybrid}


def conv(x, w, *, strides: Sequence[int], pads: Pads, dilation: Sequence[int], impl: str):
    """N-d convolution, channels-last, in the formulation ``impl``.

    Args:
      x: (N, *spatial, C_in) any float dtype (same as ``w`` after promotion).
      w: (*kernel, C_in, C_out).
      strides, dilation: ints per spatial axis; pads: explicit (low, high) per axis.
      impl: one of ``CONV_IMPLS``, or ``"split_FIW[bK]"`` (a formulation per pass, K batch
        chunks; see ``lungjax.models.conv.split``).

    Returns:
      (N, *out, C_out) in ``x``'s dtype; identical (to rounding) across ``impl``.
    """
    if x.ndim != w.ndim or x.shape[-1] != w.shape[-2]:
        raise ValueError(f"conv: input {x.shape} does not match kernel {w.shape} "
                         "(expected (N, *spatial, C_in) and (*kernel, C_in, C_out))")
    args = (x, w, tuple(strides), tuple(tuple(p) for p in pads), tuple(dilation))
    if isinstance(impl, str) and impl.startswith("split_"):
        return conv_split.conv(*args, impl)
    if impl not in _CONV_FNS:
        raise ValueError(f"conv impl={impl!r}; expected one of {CONV_IMPLS} or 'split_FIW'")
    return _CONV_FNS[impl](*args)


# ----------------------------------------------------------------------------------------
# Transposed convolution
# ----------------------------------------------------------------------------------------


def _string_transpose_pads(extent: int, stride: int, mode: str) -> tuple[int, int]:
    """(low, high) pads, on one axis, of the stride-1 convolution over the input spread out
    by ``stride - 1`` zeros that ``lax.conv_transpose`` runs for a padding string.

    ``extent`` is the dilated kernel's length k. The spread input of n samples has
    (n - 1) * s + 1 of them, and a stride-1 convolution returns low + high - (k - 1) more
    than it gets. Low = k - 1 lets every tap of the first sample reach the output.
    SAME: output n * s, so low + high = k + s - 2; when s < k - 1 that total is split as
    evenly as it goes, low the larger half. VALID: output n * s + max(k - s, 0) (the
    forward VALID convolution's input size when the windows overlap), so
    high = s - 1 + max(k - s, 0).
    """
    if mode == "SAME":
        total = extent + stride - 2
        low = extent - 1 if stride > extent - 1 else -(-total // 2)
    else:
        total = extent + stride - 2 + max(extent - stride, 0)
        low = extent - 1
    return low, total - low


def transpose_padding(padding: Any, kernel_size: Sequence[int], strides: Sequence[int],
                      dilation: Sequence[int]) -> Pads:
    """Explicit pads of the lhs-dilated convolution that ``lax.conv_transpose`` runs.

    "SAME"/"VALID" follow ``lax.conv_transpose`` (SAME: output = input * stride); ints or
    pairs are used as given, as ``flax.linen.ConvTranspose`` does.
    """
    rank = len(kernel_size)
    if isinstance(padding, str):
        mode = padding.upper()
        if mode not in ("SAME", "VALID"):
            raise ValueError(f"padding={padding!r}: only 'SAME', 'VALID', ints or pairs "
                             "are supported")
        return tuple(_string_transpose_pads((k - 1) * d + 1, s, mode)
                     for k, s, d in zip(kernel_size, strides, dilation))
    return canonical_padding(padding, kernel_size, (1,) * rank, dilation, (0,) * rank)


def conv_transpose_xla(x, w, strides, pads, dilation):
    rank = w.ndim - 2
    spec = "N" + "DHW"[3 - rank:] + "C"
    dn = lax.conv_dimension_numbers(x.shape, w.shape, (spec, spec[1:-1] + "IO", spec))
    return lax.conv_general_dilated(x, w, (1,) * rank, tuple(pads), lhs_dilation=tuple(strides),
                                    rhs_dilation=tuple(dilation), dimension_numbers=dn)


def conv_transpose_im2col(x, w, strides, pads, dilation):
    ks = w.shape[:-2]
    cols = patches(x, ks, (1,) * len(ks), pads, dilation, lhs_dilation=strides)
    return dot_last(cols, w.reshape(-1, w.shape[-1]), x.dtype)


def conv_transpose_matmul(x, w, strides, pads, dilation):
    """Per-pixel matmul C_in -> K*C_out, then depth-to-space (kernel == stride) or overlap-add.

    With z_t = x @ w[t], lax.conv_transpose places tap t of input i at output
    i*s + (k-1-t)*d + lo - (k-1)*d, i.e. the kernel is applied flipped; the full scatter has
    length (n-1)*s + (k-1)*d + 1 and is then cropped/padded by (lo - (k-1)d, hi - (k-1)d).
    """
    ks = w.shape[:-2]
    rank = len(ks)
    n, spatial, cin, cout = x.shape[0], x.shape[1:-1], w.shape[-2], w.shape[-1]
    wf = jnp.flip(w, axis=tuple(range(rank)))  # tap order as placed in the output
    z = dot_last(x, jnp.moveaxis(wf, -2, 0).reshape(cin, -1), x.dtype)  # (N, *S, K*C_out)
    z = z.reshape(n, *spatial, *ks, cout)
    crop = [(lo - (k - 1) * d, hi - (k - 1) * d) for (lo, hi), k, d in zip(pads, ks, dilation)]
    if all(k == s for k, s in zip(ks, strides)) and all(d == 1 for d in dilation):
        # Non-overlapping taps: interleave (S_i, k_i) axes -> depth-to-space.
        perm = [0] + [a for i in range(rank) for a in (1 + i, 1 + rank + i)] + [1 + 2 * rank]
        full = z.transpose(perm).reshape(n, *[m * k for m, k in zip(spatial, ks)], cout)
    else:
        full = None
        for taps in itertools.product(*[range(k) for k in ks]):
            zt = z[(slice(None),) * (1 + rank) + taps]
            cfg = [(0, 0, 0)] + [(t * d, (k - 1 - t) * d, s - 1)
                                 for t, k, d, s in zip(taps, ks, dilation, strides)] + [(0, 0, 0)]
            part = lax.pad(zt, jnp.zeros((), zt.dtype), cfg)
            full = part if full is None else full + part
    cfg = [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in crop] + [(0, 0, 0)]
    if any(c != (0, 0, 0) for c in cfg):
        full = lax.pad(full, jnp.zeros((), full.dtype), cfg)
    return full


_CONV_T_FNS = {"xla": conv_transpose_xla, "matmul": conv_transpose_matmul,
               "im2col": conv_transpose_im2col}


def conv_transpose(x, w, *, strides: Sequence[int], pads: Pads, dilation: Sequence[int], impl: str):
    """Transposed convolution equal to ``lax.conv_transpose(x, w, strides, pads,
    rhs_dilation=dilation)`` (kernel not transposed, as ``flax.linen.ConvTranspose``).

    Args:
      x: (N, *spatial, C_in); w: (*kernel, C_in, C_out); pads from ``transpose_padding``.
      impl: one of ``CONV_TRANSPOSE_IMPLS``.

    Returns:
      (N, *out, C_out), out = (n-1)*s + 1 + lo + hi - (k-1)*d per axis.
    """
    if impl not in _CONV_T_FNS:
        raise ValueError(f"conv_transpose impl={impl!r}; expected one of {CONV_TRANSPOSE_IMPLS}")
    if x.ndim != w.ndim or x.shape[-1] != w.shape[-2]:
        raise ValueError(f"conv_transpose: input {x.shape} does not match kernel {w.shape}")
    return _CONV_T_FNS[impl](x, w, tuple(strides), tuple(tuple(p) for p in pads), tuple(dilation))
