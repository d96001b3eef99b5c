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
form (``forward``, ``input_grad``, ``weight_grad``). The input-gradient has two: the
correlation of dy with the flipped kernel, tiled over the input, and the transpose of the
forward (dy by ``AT^T``, the matmul transposed, ``BT^T`` and the overlapping input tiles
added back), tiled over the output; for a layer that shrinks its input ("VALID") the
transpose transforms far fewer samples (the FCN's 64x8x13x13x64 (3, 5, 5) layer: 3528
against 12288 per sample and channel), and ``input_grad`` takes whichever is fewer.
Tilings: the ``"w"`` (F(4, k)), ``"v"`` (F(6, k): fewer multiplications and a (8/6)^rank
instead of (6/4)^rank larger transformed buffer, twice the rounding error) and ``"u"``
(``tile=0``: per axis the tile that wastes least on that axis's output length, at most
``MAX_ALPHA`` transformed samples) choices of ``split``'s split plans. On the FCN's
64-channel (3, 5, 5) layer (6x9x9 outputs) ``u`` takes F(6, 3) x F(3, 5) x F(3, 5):
8*7*7 transformed positions times 3*3 tiles per sample, against F(4, k)'s 6*8*8 times
2*3*3, half the transformed buffer and matmul work.

``slabs=True`` (conv_split's ``s``) runs the ``u`` tiling one depth tile at a time: the
input is cut into overlapping slabs along the first spatial axis (one tile deep, ``a``
samples every ``m``) and a ``lax.map`` / ``lax.scan`` runs the whole pass (transforms,
matmul, output transform) on a few slabs per step, so that its buffers stay in the CPU's
cache instead of streaming ~4 GB per pass through memory. The transforms are memory-bound:
on the residual FP net's 16x24x60x60x32 -> 32 3x3x3 layer the forward took 249 ms in 64
single-slab steps against 394 ms over the whole batch, the input-gradient 246 vs 396, the
weight-gradient 365 vs 515 (``python bench/winograd_slabs.py --slab-mb 8,32,128``).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from jax import lax

from lungjax.models.conv import primitives

# Interpolation points of the Toom-Cook construction (plus the point at infinity), in the
# order that keeps the transforms' entries smallest (best float32 accuracy).
_POINTS = (0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 3.0, -3.0, 1 / 3, -1 / 3)
TILE = 4  # default outputs per tile and axis (conv_split's choice w; v uses 6, u 0)
# Largest transformed tile per axis (F(6, 3), F(4, 5)): one more interpolation point and
# the transforms' entries grow enough to cost float32 accuracy.
MAX_ALPHA = 8
_DYADIC = 2.0 ** 12  # BT entries are snapped to multiples of 1 / _DYADIC (see matrices)
# Transformed-buffer bytes per loop step of the slab path. The 16x24x60x60x32 -> 32 layer's
# forward with one 6.5 MB slab per step (8 MiB budget): 249 ms; four slabs (32 MiB): 329;
# 16 slabs (128 MiB): 478; the whole batch: 394 (bench/winograd_slabs.py). Steps stay near
# this size, what this machine's caches hold.
SLAB_BYTES = 8 << 20


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
    # lstsq leaves ~1e-17 where the exact entry is 0 and 0.99999.. where it is 1; the
    # transforms skip 0 and +-1 multiplications only on exact values (F(6, 3): 44 instead
    # of 64 terms), so entries within rounding of a dyadic value take that value.
    snapped = np.round(bt * _DYADIC) / _DYADIC
    bt = np.where(np.abs(bt - snapped) < 1e-9, snapped, bt)
    return at, g, bt


def _fitted_tile(o: int, k: int) -> int:
    """Outputs per tile ``m`` for ``o`` outputs of a ``k``-tap axis that make the fewest
    transformed samples ``ceil(o / m) * (m + k - 1)`` with ``m + k - 1 <= MAX_ALPHA`` (ties:
    the smaller transform). E.g. 9 outputs of a 5-tap axis: F(3, 5), 3 tiles x 7 = 21
    samples, where F(4, 5) needs 3 tiles x 8 = 24 (a third of its last tile is padding)."""
    options = [m for m in range(1, max(1, MAX_ALPHA - k + 1) + 1) if m <= max(o, 1)]
    return min(options, key=lambda m: (-(-o // m) * (m + k - 1), m))


def tiles(out_spatial: Sequence[int], kernel: Sequence[int], tile: int = TILE
          ) -> tuple[int, ...]:
    """Outputs per tile on each axis: ``tile``, fewer on short axes, 1 where the kernel is;
    ``tile=0``: per axis the size that fits the output best (``_fitted_tile``)."""
    return tuple(1 if k == 1 else _fitted_tile(o, k) if tile == 0 else max(1, min(tile, o))
                 for o, k in zip(out_spatial, kernel))


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


def _tiling(out_spatial, ks, tile):
    """Outputs per tile ``m``, tiles ``T`` and transformed samples ``a = m + k - 1`` per
    axis, for an output of ``out_spatial``."""
    ms = tiles(out_spatial, ks, tile)
    nt = [-(-o // m) for o, m in zip(out_spatial, ms)]
    alphas = [m + k - 1 for m, k in zip(ms, ks)]
    return ms, nt, alphas


def _tile_samples(spatial, ks, tile) -> int:
    """Transformed samples per sample and channel of a tiling of ``spatial`` outputs."""
    _, nt, alphas = _tiling(spatial, ks, tile)
    return int(np.prod(nt) * np.prod(alphas))


def buffer_bytes(batch: int, in_spatial, out_spatial, kernel, cin: int, cout: int,
                 itemsize: int = 4, tile: int = TILE, slabs: bool = False) -> int:
    """Size of the larger of the transformed input and transformed output buffers; with
    ``slabs``, of the slabs the input is cut into (the transforms run a few at a time)."""
    if slabs:
        _, nt, alphas = _tiling(out_spatial, kernel, 0)
        return (batch * nt[0] * alphas[0] * int(np.prod(in_spatial[1:])) * max(cin, cout)
                * itemsize)
    return batch * _tile_samples(out_spatial, kernel, tile) * max(cin, cout) * itemsize


def _geometry(in_spatial, pads, ks, tile):
    """Outputs per axis, then ``_tiling`` of them."""
    out = [s + lo + hi - k + 1 for s, (lo, hi), k in zip(in_spatial, pads, ks)]
    return (out, *_tiling(out, ks, tile))


def _tiles_last(rank: int) -> list[int]:
    """Axis order taking (m_1.., N, T_1.., C) to (N, T_1, m_1, T_2, m_2, .., C)."""
    return [rank] + [v for a in range(rank) for v in (rank + 1 + a, a)] + [2 * rank + 1]


def _whole_tile_pads(spatial, pads, ks, ms, nt):
    """``lax.pad`` config per spatial axis that makes every tile whole: the low pad as
    given, the high one to ``tiles * m + k - 1`` samples (negative: crop)."""
    return [(lo, t * m + k - 1 - s - lo, 0)
            for t, m, k, s, (lo, _) in zip(nt, ms, ks, spatial, pads)]


def _transform_tiles(x, pads, ks, tile):
    """Input transform: x (N, *spatial, C) -> U (prod(a), N*prod(tiles), C).

    Each axis in turn is cut into overlapping tiles (``a`` samples every ``m``) and
    multiplied by ``BT``; the transformed index becomes a leading axis."""
    rank = len(ks)
    n, c = x.shape[0], x.shape[-1]
    _, ms, nt, alphas = _geometry(x.shape[1:-1], pads, ks, tile)
    u = lax.pad(x, jnp.zeros((), x.dtype),
                [(0, 0, 0)] + _whole_tile_pads(x.shape[1:-1], pads, ks, ms, nt) + [(0, 0, 0)])
    for a in range(rank):  # a leading alpha axes, then N, then the spatial axes
        ax = a + 1 + a
        bt = matrices(ms[a], ks[a])[2]

        def tap(i, u=u, ax=ax, a=a):
            return lax.slice_in_dim(u, i, i + (nt[a] - 1) * ms[a] + 1, ms[a], axis=ax)

        u = jnp.stack([_weighted(tap, bt[j], x.dtype) for j in range(alphas[a])], axis=a)
    return u.reshape(int(np.prod(alphas)), n * int(np.prod(nt)), c)


def _overlap_add(part, nt: int, m: int, a: int, axis: int):
    """Adds tiles back onto the axis they were cut from: the transpose of taking ``nt``
    overlapping tiles of ``a`` samples every ``m`` along ``axis``.

    Args:
      part: ``part(i)`` is sample ``i`` (0 <= i < a) of every tile, an array with the
        ``nt`` tiles on ``axis``.

    Returns:
      The array with ``(nt - 1) * m + a`` samples on ``axis``: sample ``t * m + i`` is the
      sum of ``part(i)[t]`` over the tiles that hold it.
    """
    blocks = -(-a // m)  # a tile spans this many m-sample blocks
    total = None
    for q in range(blocks):  # samples q*m .. q*m + m - 1 of every tile: one shifted block
        rows = [part(q * m + r) if q * m + r < a else None for r in range(m)]
        zero = jnp.zeros_like(next(p for p in rows if p is not None))
        block = jnp.stack([zero if p is None else p for p in rows], axis=axis + 1)
        block = block.reshape(*block.shape[:axis], nt * m, *block.shape[axis + 2:])
        pad = [(0, 0, 0)] * block.ndim
        pad[axis] = (q * m, (blocks - 1 - q) * m, 0)
        block = lax.pad(block, jnp.zeros((), block.dtype), pad)
        total = block if total is None else total + block
    return lax.slice_in_dim(total, 0, (nt - 1) * m + a, axis=axis)


def _weighted_column(taps, bt, i):
    """Sample ``i`` of every tile: ``sum_j BT[j, i] * taps[j]`` (``BT^T``'s row ``i``)."""
    return _weighted(taps.__getitem__, bt[:, i], taps[0].dtype)


def _transform_tiles_transpose(u, x_shape, pads, ks, tile):
    """Transpose of ``_transform_tiles``: U (prod(a), N*prod(tiles), C) -> (N, *spatial, C)
    (``x_shape``): ``BT^T`` along each axis, last axis first, each axis's overlapping tiles
    added back onto it (``_overlap_add``), then the padding dropped. Written out because
    ``jax.linear_transpose`` of the strided tap slices pads each of the ``a`` tile samples
    to a zero-interleaved, input-sized array and adds them all; ``_overlap_add`` adds
    ``ceil(a / m)`` shifted blocks instead (F(3, 5): 3 input-sized adds instead of 7, no
    interleaving)."""
    rank = len(ks)
    n, c = x_shape[0], x_shape[-1]
    _, ms, nt, alphas = _geometry(x_shape[1:-1], pads, ks, tile)
    u = u.reshape(*alphas, n, *nt, c)
    for a in reversed(range(rank)):  # (a_0..a_a, N, T_0..T_a, P_a+1.., C) -> (.., P_a, ..)
        bt = matrices(ms[a], ks[a])[2]
        taps = [lax.index_in_dim(u, j, a, False) for j in range(alphas[a])]
        u = _overlap_add(functools.partial(_weighted_column, taps, bt), nt[a], ms[a],
                         alphas[a], 2 * a + 1)
    crop = [(-lo, -hi, 0) for lo, hi, _ in _whole_tile_pads(x_shape[1:-1], pads, ks, ms, nt)]
    return lax.pad(u, jnp.zeros((), u.dtype), [(0, 0, 0)] + crop + [(0, 0, 0)])


def _untransform_tiles(mm, n, out, ks, tile):
    """Output transform: M (prod(a), N*prod(tiles), C) -> y (N, *out, C) by ``AT`` along
    each axis, tiles interleaved back and cropped to ``out``."""
    rank = len(ks)
    ms, nt, alphas = _tiling(out, ks, tile)
    mm = mm.reshape(*alphas, n, *nt, mm.shape[-1])
    for a in range(rank):  # AT along alpha axis a, replaced by the m outputs of a tile
        at = matrices(ms[a], ks[a])[0]
        mm = jnp.stack([_weighted(lambda j, mm=mm, a=a: lax.index_in_dim(mm, j, a, False),
                                  at[o], mm.dtype) for o in range(ms[a])], axis=a)
    # (m_1.., N, T_1.., C) -> (N, T_1, m_1, T_2, m_2, .., C) -> crop to the output size.
    y = mm.transpose(_tiles_last(rank)).reshape(n, *[t * m for t, m in zip(nt, ms)],
                                                mm.shape[-1])
    return y[(slice(None),) + tuple(slice(0, o) for o in out)]


def _transform_output_grad(dy, ks, tile):
    """Transpose of ``_untransform_tiles``: dy (N, *out, C) -> (prod(a), N*prod(tiles), C),
    by ``AT^T`` along each axis. Written out rather than left to ``jax.linear_transpose``,
    which zero-pads each tile position to the full alpha axis and adds: the weight-gradient
    of a 16x24x60x60x32 -> 32 3x3x3 layer took 1.1-1.3 s that way, 0.6-0.7 s this way."""
    rank = len(ks)
    n, c = dy.shape[0], dy.shape[-1]
    out = dy.shape[1:-1]
    ms, nt, alphas = _tiling(out, ks, tile)
    v = lax.pad(dy, jnp.zeros((), dy.dtype), [(0, 0, 0)]
                + [(0, t * m - o, 0) for t, m, o in zip(nt, ms, out)] + [(0, 0, 0)])
    # (N, T_1, m_1, T_2, m_2, .., C) -> (m_1.., N, T_1.., C)
    v = v.reshape(n, *[d for t, m in zip(nt, ms) for d in (t, m)], c)
    v = v.transpose(np.argsort(_tiles_last(rank)).tolist())  # the inverse order
    for a in range(rank):  # axis a: m tile outputs -> a transformed positions
        at = matrices(ms[a], ks[a])[0]
        v = jnp.stack([_weighted(lambda o, v=v, a=a: lax.index_in_dim(v, o, a, False),
                                 at[:, j], dy.dtype) for j in range(alphas[a])], axis=a)
    return v.reshape(int(np.prod(alphas)), n * int(np.prod(nt)), c)


def _kernel_mats(ms, ks, dtype):
    return [jnp.asarray(matrices(m, k)[1], jnp.promote_types(dtype, jnp.float32))
            for m, k in zip(ms, ks)]


def _slabs(x, pad, k: int, m: int, t: int):
    """Overlapping slabs along axis 1: x (N, S, ..., C) padded by ``pad`` (low, negative
    allowed) and to ``t * m + k - 1`` samples -> (N*t, m + k - 1, ..., C), slab ``i`` of
    sample ``n`` at ``n * t + i`` starting at padded sample ``i * m``."""
    n, s = x.shape[0], x.shape[1]
    high = t * m + k - 1 - s - pad[0]
    xp = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (pad[0], high, 0)]
                 + [(0, 0, 0)] * (x.ndim - 2))
    win = jnp.stack([lax.slice_in_dim(xp, i * m, i * m + m + k - 1, axis=1) for i in range(t)],
                    axis=1)
    return win.reshape(n * t, m + k - 1, *x.shape[2:])


def _slabs_transpose(s, x_shape, pad, k: int, m: int, t: int):
    """Transpose of ``_slabs``: slabs (N*t, m + k - 1, ..., C) added back onto the axis
    they overlap on, and the padding dropped -> ``x_shape`` (N, S, ..., C)."""
    n, length = x_shape[0], x_shape[1]
    s = s.reshape(n, t, *s.shape[1:])
    full = _overlap_add(lambda i: s[:, :, i], t, m, m + k - 1, 1)
    high = t * m + k - 1 - length - pad[0]
    return lax.pad(full, jnp.zeros((), full.dtype), [(0, 0, 0), (-pad[0], -high, 0)]
                   + [(0, 0, 0)] * (full.ndim - 2))


def _output_slabs(dy, m: int, t: int):
    """dy (N, O, ..., C) zero-padded to ``t * m`` samples on axis 1 and cut into the ``t``
    non-overlapping slabs of each sample: (N*t, m, ..., C), in ``_slabs``' order."""
    dyp = lax.pad(dy, jnp.zeros((), dy.dtype), [(0, 0, 0), (0, t * m - dy.shape[1], 0)]
                  + [(0, 0, 0)] * (dy.ndim - 2))
    return dyp.reshape(dy.shape[0] * t, m, *dy.shape[2:])


def _slab_plan(x_shape, out, ks, cin: int, cout: int, itemsize: int):
    """Depth tile ``m``, depth tiles ``t`` and slabs per loop step for the slab path."""
    m = tiles(out[:1], ks[:1], 0)[0]
    t = -(-out[0] // m)
    count = x_shape[0] * t
    one = buffer_bytes(1, (m + ks[0] - 1, *x_shape[2:-1]), (m, *out[1:]), ks, cin, cout,
                       itemsize, tile=0)
    per = max(1, SLAB_BYTES // max(one, 1))
    return m, t, max(d for d in range(1, count + 1) if count % d == 0 and d <= per)


def _in_steps(a, per: int):
    """(count, ...) -> (count / per, per, ...) for lax.map / lax.scan."""
    return a.reshape(a.shape[0] // per, per, *a.shape[1:])


def _forward_slabs(x, w, pads):
    """``forward`` with fitted tiles, one depth tile's slab at a time (module docstring).

    x (N, *spatial, C_in) -> slabs (N*t, m + k_0 - 1, *spatial[1:], C_in), ``per`` per step
    -> (N*t, m, *out[1:], C_out) -> (N, *out, C_out)."""
    rank = w.ndim - 2
    ks = w.shape[:rank]
    out = _geometry(x.shape[1:-1], pads, ks, 0)[0]
    m, t, per = _slab_plan(x.shape, out, ks, w.shape[-2], w.shape[-1], x.dtype.itemsize)
    inner = [(0, 0)] + list(pads[1:])  # each slab holds its depth padding already
    slabs = _in_steps(_slabs(x, pads[0], ks[0], m, t), per)
    ys = lax.map(lambda xs: forward(xs, w, inner, 0), slabs)
    y = ys.reshape(x.shape[0], t * m, *ys.shape[3:])
    return y[:, :out[0]]


def forward(x, w, pads, tile: int = TILE, slabs: bool = False):
    """Stride-1, undilated convolution, equal (to float32 rounding) to
    ``lax.conv_general_dilated(x, w, 1, pads)``.

    Args:
      x: (N, *spatial, C_in) channels-last; w: (*kernel, C_in, C_out);
      pads: (low, high) per spatial axis (negative allowed, as XLA's).
      tile: outputs per tile and axis, F(tile, k).
      slabs: fitted tiles (``tile`` unused), run one depth slab at a time.

    Returns:
      (N, *out, C_out) in x's dtype.
    """
    if slabs:
        return _forward_slabs(x, w, pads)
    rank = w.ndim - 2
    ks = w.shape[:rank]
    out, ms, _, alphas = _geometry(x.shape[1:-1], pads, ks, tile)
    u = _transform_tiles(x, pads, ks, tile)
    wt = _transformed_kernel(w, ms, alphas, x.dtype)
    acc = primitives.acc_dtype(x.dtype)
    mm = lax.dot_general(u, wt, (((2,), (1,)), ((0,), (0,))), preferred_element_type=acc)
    return _untransform_tiles(mm, x.shape[0], out, ks, tile).astype(x.dtype)


def _transformed_kernel(w, ms, alphas, dtype):
    """G w G^T per axis: (*kernel, C_in, C_out) -> (prod(a), C_in, C_out) in ``dtype``."""
    wt = w
    for a, g in enumerate(_kernel_mats(ms, w.shape[:w.ndim - 2], w.dtype)):
        wt = jnp.moveaxis(jnp.tensordot(g, wt, axes=([1], [a])), 0, a)
    return wt.reshape(int(np.prod(alphas)), *w.shape[-2:]).astype(dtype)


def _transposed_input_grad(dy, w, in_spatial, pads, tile):
    """dx (N, *in_spatial, C_in) as the transpose of ``forward``'s three linear steps: dy
    by ``AT^T`` (``_transform_output_grad``), the batched matmul with the transformed
    kernel transposed (contracting C_out), then the transpose of the input transform
    (``BT^T`` and the overlapping tiles added back onto the input)."""
    rank = w.ndim - 2
    ks = w.shape[:rank]
    _, ms, _, alphas = _geometry(in_spatial, pads, ks, tile)
    v = _transform_output_grad(dy, ks, tile)
    wt = _transformed_kernel(w, ms, alphas, dy.dtype)
    acc = primitives.acc_dtype(dy.dtype)
    du = lax.dot_general(v, wt, (((2,), (2,)), ((0,), (0,))), preferred_element_type=acc)
    return _transform_tiles_transpose(du.astype(dy.dtype), (dy.shape[0], *in_spatial,
                                                            w.shape[-2]), pads, ks, tile)


def _transposed_input_grad_slabs(dy, w, in_spatial, pads):
    """``_transposed_input_grad`` with fitted tiles, one depth slab at a time: dy's
    non-overlapping slabs of one depth tile, ``per`` a ``lax.map`` step, each give the
    gradient of its overlapping input slab; those are added back (the transpose of
    ``_slabs``)."""
    rank = w.ndim - 2
    ks = w.shape[:rank]
    n = dy.shape[0]
    out = dy.shape[1:-1]
    x_shape = (n, *in_spatial, w.shape[-2])
    m, t, per = _slab_plan(x_shape, out, ks, w.shape[-2], w.shape[-1], dy.dtype.itemsize)
    dys = _in_steps(_output_slabs(dy, m, t), per)
    slab_in = (m + ks[0] - 1, *in_spatial[1:])
    inner = [(0, 0)] + list(pads[1:])
    dxs = lax.map(lambda d: _transposed_input_grad(d, w, slab_in, inner, 0), dys)
    # (N*t, m + k - 1, *in_spatial[1:], C_in): each input slab's gradient
    dxs = dxs.reshape(n * t, *dxs.shape[2:])
    return _slabs_transpose(dxs, x_shape, pads[0], ks[0], m, t)


INPUT_GRAD_FORMS = ("auto", "correlation", "transpose")


def input_grad(dy, w, in_spatial, pads, tile: int = TILE, slabs: bool = False,
               form: str = "auto"):
    """dx (N, *in_spatial, C_in) of ``forward`` for dy (N, *out, C_out).

    Two Winograd forms: ``"correlation"``, the correlation of dy with the flipped,
    transposed kernel (itself a stride-1 convolution, tiled over the input), and
    ``"transpose"``, the transpose of the forward (tiled over the output, the overlapping
    input tiles added back). ``"auto"`` takes whichever transforms fewer samples. They tie
    where the convolution keeps its size ("SAME"); where it shrinks its input the
    transpose does less: the FCN's 64x8x13x13x64 -> 6x9x9 (3, 5, 5) layer tiles 3528
    transformed samples per sample and channel that way, 12288 (F(4, 3) x F(4, 5) x
    F(4, 5) over 8x13x13) the other.
    """
    if form not in INPUT_GRAD_FORMS:
        raise ValueError(f"input-gradient form {form!r}: expected one of {INPUT_GRAD_FORMS}")
    rank = w.ndim - 2
    ks = w.shape[:rank]
    out = dy.shape[1:-1]
    if form == "auto":
        t = 0 if slabs else tile
        form = ("transpose" if _tile_samples(out, ks, t) < _tile_samples(in_spatial, ks, t)
                else "correlation")
    if form == "transpose":
        if slabs:
            return _transposed_input_grad_slabs(dy, w, in_spatial, pads)
        return _transposed_input_grad(dy, w, in_spatial, pads, tile)
    ones = (1,) * rank
    return forward(dy, *primitives.transposed_correlation(w, in_spatial, out, ones,
                                                          pads, ones), tile, slabs)


def _weight_grad_slabs(x, dy, w_shape, w_dtype, pads):
    """``weight_grad`` with fitted tiles, summed over depth slabs of x and dy in a
    ``lax.scan`` (a few slabs per step, accumulated in at least float32)."""
    rank = len(w_shape) - 2
    ks = tuple(w_shape[:rank])
    out = dy.shape[1:-1]
    m, t, per = _slab_plan(x.shape, out, ks, w_shape[-2], w_shape[-1], x.dtype.itemsize)
    xs = _slabs(x, pads[0], ks[0], m, t)
    # dy's slabs do not overlap: zeros past the output end meet padding of x only.
    dys = _output_slabs(dy, m, t)
    inner = [(0, 0)] + list(pads[1:])
    # Summed in the transformed space; the kernel transform runs once, after the loop.
    _, ms, _, alphas = _geometry(xs.shape[1:-1], inner, ks, 0)

    def step(acc, chunk):
        return acc + _transformed_weight_grad(*chunk, ks, inner, 0), None

    acc = jnp.zeros((int(np.prod(alphas)), *w_shape[-2:]),
                    jnp.promote_types(x.dtype, jnp.float32))
    dwt = lax.scan(step, acc, (_in_steps(xs, per), _in_steps(dys, per)))[0]
    return _kernel_grad(dwt, ms, ks, alphas, w_shape, w_dtype)


def weight_grad(x, dy, w_shape, w_dtype, pads, tile: int = TILE, slabs: bool = False):
    """dW (*kernel, C_in, C_out) of ``forward``: the transformed input and the transformed
    output gradient meet in one batched matmul per transformed position (contracting the
    long tile axis), then ``G^T . G`` back to kernel taps.

    Args:
      x: (N, *spatial, C_in); dy: (N, *out, C_out); pads as in ``forward``;
      slabs: as in ``forward``.
    """
    if slabs:
        return _weight_grad_slabs(x, dy, w_shape, w_dtype, pads)
    rank = len(w_shape) - 2
    ks = tuple(w_shape[:rank])
    _, ms, _, alphas = _geometry(x.shape[1:-1], pads, ks, tile)
    return _kernel_grad(_transformed_weight_grad(x, dy, ks, pads, tile), ms, ks, alphas,
                        w_shape, w_dtype)


def _transformed_weight_grad(x, dy, ks, pads, tile):
    """(prod(a), C_in, C_out) in at least float32: transformed input against transformed
    output gradient, contracting the tiles."""
    u = _transform_tiles(x, pads, ks, tile)
    v = _transform_output_grad(dy.astype(x.dtype), ks, tile)
    acc = jnp.promote_types(x.dtype, jnp.float32)
    return lax.dot_general(u, v, (((1,), (1,)), ((0,), (0,))), preferred_element_type=acc)


def _kernel_grad(dwt, ms, ks, alphas, w_shape, w_dtype):
    """(prod(a), C_in, C_out) -> dW (*kernel, C_in, C_out): the transpose of G w G^T."""
    dwt = dwt.reshape(*alphas, *w_shape[-2:])
    for a, g in enumerate(_kernel_mats(ms, ks, w_dtype)):
        dwt = jnp.moveaxis(jnp.tensordot(g, dwt, axes=([0], [a])), 0, a)
    return dwt.astype(w_dtype)
