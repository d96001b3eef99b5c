"""Stride-1 convolutions by Winograd's minimal filtering (Toom-Cook), per spatial axis.

A 1-D correlation of ``m`` outputs with an ``r``-tap kernel, F(m, r), needs ``a = m + r - 1``
multiplications instead of ``m * r``: ``y = AT [(G g) * (BT d)]`` for an input tile ``d`` of
``a`` samples. Nested over the spatial axes, an N-d convolution becomes

1. input transform: the input cut into overlapping tiles (``a`` samples every ``m``) and
   multiplied by ``BT`` along each axis: ``U`` (prod(a), N*tiles, C_in) (shifted strided
   slices times constants, which XLA fuses into elementwise loops);
2. kernel transform ``G w G^T``: (prod(a), C_in, C_out), small;
3. one batched matmul over the prod(a) transformed positions: (prod(a), N*tiles, C_out);
4. output transform by ``AT`` along each axis, tiles interleaved back and cropped.

For a 3x3x3 kernel with F(4, 3) on every axis that is 216 matmuls over 1/64 of the output
positions each: 8x fewer multiply-adds than the direct convolution (12.5x for (3, 5, 5)),
paid for with transforms (memory traffic over buffers (a/m)^rank times the input and output)
and a rounding error of ~2e-5 of the output's magnitude in float32 (against ~1e-6 for
a matmul formulation), since the transforms mix values of different scales. XLA:CPU's
matmuls contracting only C_in numbers are memory-bound, so this wins where the channel
counts are large enough (measured per layer shape by ``bench/conv_autotune.py``).

The three passes of a convolution are all stride-1 correlations, so each has a Winograd
form (``forward``, ``input_grad``, ``weight_grad``): the ``"w"`` choice of
``conv_split``'s split plans.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lungjax.models import conv_ops

# Interpolation points of the Toom-Cook construction (plus the point at infinity), in the
# order that keeps the transforms' entries smallest (best float32 accuracy).
_POINTS = (0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 3.0, -3.0, 1 / 3, -1 / 3)
TILE = 4  # outputs per tile and axis: F(4, r) measured fastest on this project's layers


@functools.lru_cache(maxsize=None)
def matrices(m: int, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AT (m, a), G (a, r), BT (a, a) of F(m, r), a = m + r - 1, float64.

    ``AT @ ((G @ g) * (BT @ d)) == [sum_k d[o + k] g[k] for o in range(m)]`` for any
    ``d`` (a,) and ``g`` (r,) (correlation, as ``lax.conv_general_dilated``).
    """
    a = m + r - 1
    if a - 1 > len(_POINTS):
        raise ValueError(f"Winograd F({m}, {r}) needs {a - 1} interpolation points; at most "
                         f"{len(_POINTS)} are defined")
    if a == 1:
        one = np.ones((1, 1))
        return one, one, one
    pts = np.asarray(_POINTS[:a - 1])
    at = np.zeros((m, a))
    g = np.zeros((a, r))
    for j, p in enumerate(pts):
        at[:, j] = p ** np.arange(m)
        g[j] = p ** np.arange(r) / np.prod([p - q for q in pts if q != p])
    at[m - 1, a - 1] = 1.0  # the point at infinity: leading coefficients
    g[a - 1, r - 1] = 1.0
    # BT follows from the identity above: sum_j AT[o, j] G[j, k] BT[j, i] = [i == o + k].
    e = np.einsum("oj,jk->okj", at, g).reshape(m * r, a)
    bt = np.zeros((a, a))
    for i in range(a):
        rhs = np.array([float(i == o + k) for o in range(m) for k in range(r)])
        bt[:, i] = np.linalg.lstsq(e, rhs, rcond=None)[0]
        if not np.allclose(e @ bt[:, i], rhs, atol=1e-9):
            raise AssertionError(f"Winograd F({m}, {r}): no exact input transform")
    return at, g, bt


def tiles(out_spatial: Sequence[int], kernel: Sequence[int]) -> tuple[int, ...]:
    """Outputs per tile on each axis: ``TILE``, fewer on short axes, 1 where the kernel is."""
    return tuple(1 if k == 1 else max(1, min(TILE, o)) for o, k in zip(out_spatial, kernel))


def _weighted(parts, coef, dtype):
    """sum_i coef[i] * parts(i), skipping zero coefficients (most are 0 or +-1)."""
    out = None
    for i, c in enumerate(coef):
        if c == 0:
            continue
        p = parts(i)
        term = p if c == 1 else -p if c == -1 else p * jnp.asarray(c, dtype)
        out = term if out is None else out + term
    return out


def buffer_bytes(batch: int, in_spatial, out_spatial, kernel, cin: int, cout: int,
                 itemsize: int = 4) -> int:
    """Size of the larger of the transformed input and transformed output buffers."""
    ms = tiles(out_spatial, kernel)
    n = batch * int(np.prod([-(-o // m) * (m + k - 1) for o, m, k in
                             zip(out_spatial, ms, kernel)]))
    return n * max(cin, cout) * itemsize


def forward(x, w, pads):
    """Stride-1, undilated convolution, equal (to float32 rounding) to
    ``lax.conv_general_dilated(x, w, 1, pads)``.

    Args:
      x: (N, *spatial, C_in) channels-last; w: (*kernel, C_in, C_out);
      pads: (low, high) per spatial axis (negative allowed, as XLA's).

    Returns:
      (N, *out, C_out) in x's dtype.
    """
    rank = w.ndim - 2
    ks = w.shape[:rank]
    n, cin, cout = x.shape[0], w.shape[-2], w.shape[-1]
    out = [s + lo + hi - k + 1 for s, (lo, hi), k in zip(x.shape[1:-1], pads, ks)]
    ms = tiles(out, ks)
    nt = [-(-o // m) for o, m in zip(out, ms)]
    alphas = [m + k - 1 for m, k in zip(ms, ks)]
    mats = [matrices(m, k) for m, k in zip(ms, ks)]
    # Pad so that every tile is whole: tiles * m + k - 1 samples per axis.
    high = [t * m + k - 1 - s - lo for t, m, k, s, (lo, _) in zip(nt, ms, ks, x.shape[1:-1], pads)]
    u = lax.pad(x, jnp.zeros((), x.dtype),
                [(0, 0, 0)] + [(lo, h, 0) for (lo, _), h in zip(pads, high)] + [(0, 0, 0)])
    for a in range(rank):  # BT along axis a; the transformed index becomes leading axis a
        ax = a + 1 + a  # a leading alpha axes, then N, then the spatial axes
        bt = mats[a][2]

        def tap(i, u=u, ax=ax, a=a):
            return lax.slice_in_dim(u, i, i + (nt[a] - 1) * ms[a] + 1, ms[a], axis=ax)

        u = jnp.stack([_weighted(tap, bt[j], x.dtype) for j in range(alphas[a])], axis=a)
    u = u.reshape(int(np.prod(alphas)), n * int(np.prod(nt)), cin)
    wt = w
    for a in range(rank):  # G w G^T (float32 at least: the kernel is small)
        g = jnp.asarray(mats[a][1], jnp.promote_types(w.dtype, jnp.float32))
        wt = jnp.moveaxis(jnp.tensordot(g, wt, axes=([1], [a])), 0, a)
    wt = wt.reshape(int(np.prod(alphas)), cin, cout).astype(x.dtype)
    acc = jnp.float32 if jnp.dtype(x.dtype).itemsize < 4 else None
    mm = lax.dot_general(u, wt, (((2,), (1,)), ((0,), (0,))), preferred_element_type=acc)
    mm = mm.reshape(*alphas, n, *nt, cout)
    for a in range(rank):  # AT along alpha axis a, replaced by the m outputs of a tile
        at = mats[a][0]
        mm = jnp.stack([_weighted(lambda j, mm=mm, a=a: lax.index_in_dim(mm, j, a, False),
                                  at[o], mm.dtype) for o in range(ms[a])], axis=a)
    # (m_1.., N, T_1.., C) -> (N, T_1, m_1, T_2, m_2, .., C) -> crop to the output size.
    perm = [rank] + [v for a in range(rank) for v in (rank + 1 + a, a)] + [2 * rank + 1]
    y = mm.transpose(perm).reshape(n, *[t * m for t, m in zip(nt, ms)], cout)
    return y[(slice(None),) + tuple(slice(0, o) for o in out)].astype(x.dtype)


def input_grad(dy, w, in_spatial, pads):
    """dx (N, *in_spatial, C_in) of ``forward``: the correlation of dy (N, *out, C_out) with
    the flipped, transposed kernel, itself a stride-1 convolution."""
    ones = (1,) * (w.ndim - 2)
    return forward(dy, *conv_ops.transposed_correlation(w, in_spatial, dy.shape[1:-1], ones,
                                                        pads, ones))


def weight_grad(x, dy, w_shape, w_dtype, pads):
    """dW (*kernel, C_in, C_out) of ``forward``: its transpose in w (``forward`` is linear
    in w): the transformed input and output gradient meet in one batched matmul per
    transformed position, then ``G^T . G`` back to kernel taps."""
    fn = jax.linear_transpose(lambda w: forward(x, w, pads),
                              jax.ShapeDtypeStruct(tuple(w_shape), w_dtype))
    return fn(dy.astype(x.dtype))[0]
