"""Convolution with a separately chosen formulation for each of its three passes.

A convolution's forward, input-gradient and weight-gradient are three different
computations, and on XLA:CPU the fastest way to run each depends on the layer shape. The
``"split_FIW"`` formulations (a ``jax.custom_vjp``) pick one per pass:

* ``F`` (forward) and ``W`` (weight-gradient): ``"x"`` = XLA's native convolution (or its
  autodiff weight-gradient), or a digit ``m`` = *partial im2col*: the shifted slices of the
  last ``m`` spatial axes are concatenated on the channel axis (columns
  (N, D_pad.., *out_inner, K_inner*C_in)), and the taps of the remaining (outer) axes are
  accumulated as one matmul per outer tap on a shifted (strided) view of those columns.
  ``m = rank`` is full im2col (one matmul, the largest buffer); ``m = 0`` is shifted-slice
  accumulation (``prod(kernel)`` matmuls, no column buffer at all).
* ``I`` (input-gradient): ``"x"`` (native), ``"c"`` ((dy @ W^T) scattered back through the
  transposed slices: col2im), or a digit ``m``: the correlation of the (stride-dilated)
  output gradient with the flipped kernel, run as the partial-im2col forward above.
* ``f`` (any pass, 3-D only): *depth folding*: the depth taps are stacked on the channel
  axis ((N*D_out, H, W, k_d*C_in), a k_d-fold copy of the input) and the convolution runs
  as XLA's native **2-D** convolution over (H, W) with the kernel (k_h, k_w, k_d*C_in,
  C_out). XLA:CPU hands 2-D convolutions (forward and stride-1 input-gradient) to its
  YNNPACK library, at 100-350 GFLOP/s on this project's 2-core machine, while its 3-D
  convolutions run natively at 13-90 GFLOP/s. The weight-gradient of ``f`` is the 2-D
  convolution's own (XLA's), the input-gradient too at stride 1; a strided one runs as one
  stride-1 convolution per output phase (``strided_input_grad_2d``), both sent back
  through the stacked columns.
* ``w`` (any pass, stride-1 undilated convolutions with a kernel larger than 1): Winograd's
  minimal filtering, F(4, k) per axis: transforms plus one batched matmul with 8-12.5x
  fewer multiply-adds than the direct convolution (``winograd``). ``v``: the same
  with F(6, k), for kernels of at most 3 taps per axis (F(6, 5) needs interpolation points
  whose transforms lose float32 accuracy): 11.4x fewer for 3x3x3, smaller buffers. ``u``:
  per axis the tile size that fits the output length best (at most 8 transformed samples
  per axis, so kernels of at most 7 taps), e.g. F(6, 3) x F(3, 5) x F(3, 5) for 6x9x9
  outputs of a (3, 5, 5) kernel, where F(4, k) pads a third of the last H and W tiles.
  ``s``: ``u`` run one depth slab at a time (overlapping slabs of one tile along the first
  spatial axis, a few per ``lax.map`` step), so the memory-bound transforms work in cache.
  As input-gradient, each of these runs as the transpose of its forward where that
  transforms fewer samples than the correlation with the flipped kernel (layers that
  shrink their input: "VALID" padding; ``conv_winograd.input_grad``).

For example ``"split_2cx"``: partial im2col over (H, W) with accumulation over the D taps in
the forward, col2im input-gradient and XLA's weight-gradient. ``bench/conv_autotune.py``
times every choice of each pass separately per layer shape and writes the winner into
``table.json`` for ``impl="auto"``.

A suffix ``b<K>`` (``"split_2c1b4"``) runs every matmul-based pass over the batch in ``K``
chunks, one after another (``lax.map``): XLA:CPU keeps all shifted slices of a pass alive
at once (4.6 GB for the 27 slices of a 16x24x60x60x32 input), so large-volume layers fit in
memory only chunk by chunk. ``K`` must divide the batch; a batch it does not divide runs
unchunked.

Only ``x`` and ``w`` are kept for the backward pass (columns are rebuilt), so the peak
memory is at most that of the full im2col forward (of one chunk).
"""

from __future__ import annotations

import itertools
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lungjax.models.conv import primitives
from lungjax.models.conv import winograd as conv_winograd

PREFIX = "split_"
_PATTERN = re.compile(r"^split_([xfsuvw0-3])([xcfsuvw0-3])([xfsuvw0-3])(?:b([1-9][0-9]*))?$")
FWD_CHOICES = ("x", "f", "w", "v", "u", "s", "0", "1", "2", "3")
IGRAD_CHOICES = ("x", "c", "f", "w", "v", "u", "s", "0", "1", "2", "3")
# choice -> outputs per tile and axis (0: fitted per axis, conv_winograd.tiles)
WINOGRAD_TILES = {"w": conv_winograd.TILE, "v": 6, "u": 0, "s": 0}
# Winograd choices run one depth slab at a time (conv_winograd's slabs=True)
WINOGRAD_SLABS = ("s",)
# choice -> most kernel taps on any axis it takes (F(6, k) and the fitted tiles keep at most
# MAX_ALPHA transformed samples per axis)
WINOGRAD_MAX_TAPS = {"v": 3, **{c: conv_winograd.MAX_ALPHA - 1
                                for c, tile in WINOGRAD_TILES.items() if tile == 0}}
WGRAD_CHOICES = FWD_CHOICES


def is_split(impl: str) -> bool:
    return isinstance(impl, str) and impl.startswith(PREFIX)


def parse(impl: str, rank: int) -> tuple[str, str, str]:
    """``"split_FIW"`` -> (F, I, W); checks the digits against the convolution rank."""
    m = _PATTERN.match(impl)
    if m is None:
        raise ValueError(f"conv impl={impl!r}: a split formulation is 'split_FIW[bK]' with F, "
                         "W in x/f/w/v/u/s/0-3 and I in x/c/f/w/v/u/s/0-3 (x: native, c: "
                         "col2im, f: depth folded 2-D, w/v/u: Winograd F(4,k)/F(6,k)/fitted "
                         "tiles, s: fitted tiles by depth slabs, digit: im2col axes) and K "
                         "batch chunks")
    plan = m.groups()[:3]
    if "f" in plan and rank != 3:
        raise ValueError(f"conv impl={impl!r}: depth folding (f) needs a 3-D convolution, "
                         f"this one has {rank} spatial axes")
    for c in plan:
        if c.isdigit() and int(c) > rank:
            raise ValueError(f"conv impl={impl!r}: im2col over {c} axes, but the convolution "
                             f"has {rank} spatial axes")
    return plan


def batch_chunks(impl: str) -> int:
    """The ``K`` of a ``"split_FIWbK"`` formulation (1 without the suffix)."""
    m = _PATTERN.match(impl)
    if m is None:
        raise ValueError(f"conv impl={impl!r} is not a split formulation")
    return int(m.group(4) or 1)


def split_choice(choice: str) -> tuple[str, int]:
    """A per-pass choice with optional chunk count, ``"2b4"`` -> ("2", 4); ``"x"`` -> ("x", 1)."""
    base, _, k = choice.partition("b")
    return base, int(k or 1)


def _chunked(fn, chunks: int, *batched):
    """``fn(*batched)`` computed over ``chunks`` equal batch slices in sequence (``lax.map``).

    Args:
      fn: maps arrays with leading batch axis B/chunks to one array with the same leading
        axis.
      batched: arrays (B, ...), B divisible by ``chunks``.

    Returns:
      (B, ...) outputs concatenated in batch order.
    """
    if chunks == 1:
        return fn(*batched)
    split = [a.reshape(chunks, a.shape[0] // chunks, *a.shape[1:]) for a in batched]
    out = lax.map(lambda args: fn(*args), tuple(split))
    return out.reshape(out.shape[0] * out.shape[1], *out.shape[2:])


def _chunked_sum(fn, chunks: int, *batched):
    """Sum over ``chunks`` equal batch slices of ``fn(*slices)`` (weight-gradients),
    accumulated in at least float32 in a ``lax.scan`` carry (one chunk live at a time)."""
    if chunks == 1:
        return fn(*batched)
    split = [a.reshape(chunks, a.shape[0] // chunks, *a.shape[1:]) for a in batched]

    def body(acc, args):
        return acc + fn(*args).astype(acc.dtype), None

    first = jax.eval_shape(fn, *[a[0] for a in split])
    acc = jnp.zeros(first.shape, jnp.promote_types(first.dtype, jnp.float32))
    return lax.scan(body, acc, tuple(split))[0].astype(first.dtype)


def winograd_ok(kernel, strides, dilation, choice: str = "w") -> bool:
    """Whether a Winograd choice applies: stride 1, no dilation, a kernel > 1 (and for
    ``v`` at most 3, for ``u`` at most 7 taps on every axis: ``WINOGRAD_MAX_TAPS``)."""
    return (all(int(s) == 1 for s in strides) and all(int(d) == 1 for d in dilation)
            and any(int(k) > 1 for k in kernel)
            and max(int(k) for k in kernel) <= WINOGRAD_MAX_TAPS.get(choice, max(kernel)))


def plan_applies(impl: str, kernel, strides, dilation) -> bool:
    """Whether split plan ``impl`` can run a convolution with this kernel, strides and
    dilation (its Winograd choices need stride 1, no dilation, small enough kernels)."""
    plan = parse(impl, len(kernel))
    return all(winograd_ok(kernel, strides, dilation, c) for c in set(plan) & set(WINOGRAD_TILES))


def choices(rank: int, kernel=None, strides=None, dilation=None) -> dict[str, tuple[str, ...]]:
    """Valid choices per pass for a convolution of this rank (a 1x..x1 kernel: im2col over
    any number of axes is the same single matmul, so only ``rank`` is offered; depth
    folding only for 3-D kernels that have more than one tap in H and W; Winograd only when
    ``kernel``, ``strides`` and ``dilation`` are given and ``winograd_ok``)."""
    known = kernel is not None and strides is not None and dilation is not None
    single = kernel is not None and all(int(k) == 1 for k in kernel)
    fold = rank == 3 and (kernel is None or int(np.prod(kernel[1:])) > 1)
    wino = {c: known and winograd_ok(kernel, strides, dilation, c) for c in WINOGRAD_TILES}
    ok = lambda cs: tuple(c for c in cs if (c == "f" and fold) or wino.get(c)  # noqa: E731
                          or c in "xc"
                          or (c.isdigit() and (int(c) == rank if single else int(c) <= rank)))
    return {"fwd": ok(FWD_CHOICES), "igrad": ok(IGRAD_CHOICES), "wgrad": ok(WGRAD_CHOICES)}


def buffer_bytes(pass_name: str, choice: str, batch: int, in_spatial, out_spatial, kernel,
                 cin: int, cout: int, itemsize: int = 4) -> int:
    """Approximate size of the largest column buffer a pass builds with ``choice``.

    For skipping choices that cannot fit in memory (an im2col input-gradient of a layer with
    C_in = 1 and 64 outputs is ~11 GB at 64x10x30x30) before timing them. "x": 0.
    """
    if choice == "x":
        return 0
    if choice in WINOGRAD_TILES:  # igrad: the same transforms with C_in and C_out swapped
        return conv_winograd.buffer_bytes(batch, in_spatial, out_spatial, kernel, cin, cout,
                                          itemsize, WINOGRAD_TILES[choice],
                                          choice in WINOGRAD_SLABS)
    rank = len(kernel)
    if choice == "f":  # depth-folded columns (N, D_out, H, W, k_d*C_in), or of dy
        c = cout if pass_name == "igrad" else cin
        return (batch * out_spatial[0] * int(np.prod(in_spatial[1:])) * kernel[0] * c
                * itemsize)
    if choice == "c":  # (N, *out, K*C_in)
        return batch * int(np.prod(out_spatial)) * int(np.prod(kernel)) * cin * itemsize
    inner = int(choice)
    n_outer = rank - inner
    # Columns span the (padded) input on the outer axes and the output on the inner ones;
    # the input-gradient runs the same on dy (input-sized, C_out channels).
    span = list(in_spatial[:n_outer]) + list(out_spatial[n_outer:])
    if pass_name == "igrad":
        span, cin = list(in_spatial), cout
    return batch * int(np.prod(span)) * int(np.prod(kernel[n_outer:])) * cin * itemsize


def contraction_size(pass_name: str, choice: str, kernel, cin: int, cout: int) -> int:
    """Length of the contracted axis of the matmuls a digit choice runs (K_inner * C), or
    of the Winograd choice's batched matmul (C; its weight-gradient is counted the same)."""
    if choice in WINOGRAD_TILES:
        return cout if pass_name == "igrad" else cin
    inner = int(choice)
    k_inner = int(np.prod(kernel[len(kernel) - inner:])) if inner else 1
    return k_inner * (cout if pass_name == "igrad" else cin)


def _outer_views(x, ks, strides, pads, dilation, inner, lhs_dilation=None):
    """Yields (outer tap index, view (N, *out, K_inner*C)) of partial-im2col columns.

    The last ``inner`` spatial axes are gathered into the channel axis (``primitives.patches``
    with unit kernel on the outer axes, which leaves them padded at full length); each outer
    tap is then a strided slice of those columns.
    """
    rank = len(ks)
    n_outer = rank - inner
    ks_in = (1,) * n_outer + tuple(ks[n_outer:])
    st_in = (1,) * n_outer + tuple(strides[n_outer:])
    cols = primitives.patches(x, ks_in, st_in, pads, dilation, lhs_dilation)
    out = primitives.conv_out_shape(cols.shape[1:1 + n_outer], ks[:n_outer], strides[:n_outer],
                                    ((0, 0),) * n_outer, dilation[:n_outer])
    for taps in itertools.product(*[range(k) for k in ks[:n_outer]]):
        if n_outer == 0:
            yield taps, cols
            continue
        start = [0] * cols.ndim
        limit = list(cols.shape)
        step = [1] * cols.ndim
        for a, (t, s, d, o) in enumerate(zip(taps, strides, dilation, out)):
            start[1 + a], limit[1 + a], step[1 + a] = t * d, t * d + (o - 1) * s + 1, s
        yield taps, lax.slice(cols, start, limit, step)


def conv_forward(x, w, strides, pads, dilation, inner: int, lhs_dilation=None):
    """Convolution as partial im2col over the last ``inner`` axes + accumulated matmuls.

    Args:
      x: (N, *spatial, C_in); w: (*kernel, C_in, C_out); strides, dilation per axis;
        pads (low, high) per axis; lhs_dilation: input dilation (for gradients of strided
        convolutions); inner: 0..rank.

    Returns:
      (N, *out, C_out) in x's dtype, equal to ``lax.conv_general_dilated``.
    """
    ks = w.shape[:-2]
    acc = primitives.acc_dtype(x.dtype)
    y = None
    for taps, view in _outer_views(x, ks, strides, pads, dilation, inner, lhs_dilation):
        wt = w[taps].reshape(-1, w.shape[-1])
        part = lax.dot_general(view, wt, (((view.ndim - 1,), (0,)), ((), ())),
                               preferred_element_type=acc)
        y = part if y is None else y + part
    return y.astype(x.dtype)


def weight_grad(x, dy, w_shape, w_dtype, strides, pads, dilation, inner: int):
    """dW (*kernel, C_in, C_out) = sum over rows of columns^T @ dy, one matmul per outer tap."""
    ks = w_shape[:-2]
    n_outer = len(ks) - inner
    acc = primitives.acc_dtype(x.dtype)
    dy2 = dy.reshape(-1, dy.shape[-1])
    parts = []
    for _, view in _outer_views(x, ks, strides, pads, dilation, inner):
        v2 = view.reshape(-1, view.shape[-1])
        # (C_out, K_inner*C_in): contracting the long row axis with dy as the left operand
        # measured faster on XLA:CPU than the (K*C_in, C_out) orientation.
        parts.append(lax.dot_general(dy2, v2, (((0,), (0,)), ((), ())),
                                     preferred_element_type=acc))
    dw = jnp.stack(parts) if len(parts) > 1 else parts[0][None]
    dw = dw.reshape(int(np.prod(ks[:n_outer], dtype=int)), w_shape[-1], -1, w_shape[-2])
    return dw.transpose(0, 2, 3, 1).reshape(w_shape).astype(w_dtype)


def input_grad(dy, w, in_spatial, strides, pads, dilation, inner: int):
    """dx as the correlation of the stride-dilated dy with the flipped kernel (partial im2col)."""
    rank = w.ndim - 2
    w_t, new_pads = primitives.transposed_correlation(w, in_spatial, dy.shape[1:-1], strides,
                                                      pads, dilation)
    return conv_forward(dy, w_t, (1,) * rank, new_pads, dilation, inner, lhs_dilation=strides)


def _fold_columns(x, kd, stride, pad, dilation):
    """(N, D, H, W, C) -> depth-folded columns (N*D_out, H, W, k_d*C) (tap-major, channels
    fastest) and D_out, for a depth kernel of ``kd`` taps with this stride, (low, high) pad
    and dilation."""
    lo, hi = pad
    if lo or hi:
        x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (lo, hi, 0)] + [(0, 0, 0)] * 3)
    do = primitives.conv_out_shape(x.shape[1:2], (kd,), (stride,), ((0, 0),), (dilation,))[0]
    taps = [lax.slice_in_dim(x, t * dilation, t * dilation + (do - 1) * stride + 1, stride,
                             axis=1) for t in range(kd)]
    # stack + reshape (tap-major, channels fastest) fuses into one loop on XLA:CPU.
    cols = taps[0] if kd == 1 else jnp.stack(taps, axis=-2).reshape(*taps[0].shape[:-1], -1)
    return cols.reshape(x.shape[0] * do, *cols.shape[2:]), do


def _fold_kernel(w):
    """(k_d, k_h, k_w, C_in, C_out) -> (k_h, k_w, k_d*C_in, C_out), matching the columns."""
    kd, kh, kw, cin, cout = w.shape
    return jnp.moveaxis(w, 0, 2).reshape(kh, kw, kd * cin, cout)


def fold_forward(x, w, strides, pads, dilation):
    """3-D convolution as one 2-D convolution over (H, W) with the depth taps on channels.

    Args:
      x: (N, D, H, W, C_in); w: (k_d, k_h, k_w, C_in, C_out); strides, dilation per axis;
        pads (low, high) per axis.

    Returns:
      (N, D_out, H_out, W_out, C_out) in x's dtype, equal to ``lax.conv_general_dilated``.
    """
    cols, do = _fold_columns(x, w.shape[0], strides[0], pads[0], dilation[0])
    y = primitives.conv_xla(cols, _fold_kernel(w), strides[1:], pads[1:], dilation[1:])
    return y.reshape(x.shape[0], do, *y.shape[1:])


def strided_input_grad_2d(dy, w, in_hw, strides, pads):
    """Input-gradient of a strided 2-D convolution (no dilation) as ``s_h * s_w`` stride-1
    convolutions, one per output phase, interleaved.

    XLA differentiates a strided convolution into one over the zero-dilated output gradient
    (``lhs_dilation``), which XLA:CPU does not hand to YNNPACK and which multiplies the
    inserted zeros: 6.6x slower than this on a 192x60x60x96 -> 64 stride-2 layer. Input
    position ``i = q*s + r`` only meets kernel taps ``r, r+s, ...``: phase ``r`` is the full
    correlation of dy with that flipped sub-kernel.

    Args:
      dy: (N, H_out, W_out, C_out) gradient of the convolution's output.
      w: (k_h, k_w, C_in, C_out) kernel.
      in_hw: (H, W) of the convolution's (unpadded) input.
      strides: (s_h, s_w); pads: ((low, high), (low, high)) of the forward.

    Returns:
      (N, H, W, C_in) in dy's dtype.
    """
    n = dy.shape[0]
    cin = w.shape[2]
    padded = [size + lo + hi for size, (lo, hi) in zip(in_hw, pads)]
    q = [-(-size // s) for size, s in zip(padded, strides)]
    rows = []
    for rh in range(strides[0]):
        phases = []
        for rw in range(strides[1]):
            sub = w[rh::strides[0], rw::strides[1]]
            if 0 in sub.shape[:2]:  # kernel smaller than the stride: this phase gets nothing
                phases.append(jnp.zeros((n, q[0], q[1], cin), dy.dtype))
                continue
            mh, mw = sub.shape[:2]
            # dx_pad[q*s + r] = sum_m dy[q - m] sub[m]: dy padded by m-1 below and to q rows.
            d = lax.pad(dy, jnp.zeros((), dy.dtype),
                        [(0, 0, 0), (mh - 1, q[0] - dy.shape[1], 0),
                         (mw - 1, q[1] - dy.shape[2], 0), (0, 0, 0)])
            phases.append(primitives.conv_xla(d, jnp.flip(sub, (0, 1)).swapaxes(2, 3), (1, 1),
                                              ((0, 0), (0, 0)), (1, 1)).astype(dy.dtype))
        rows.append(jnp.stack(phases, axis=3))  # (N, Q_h, Q_w, s_w, C_in)
    full = jnp.stack(rows, axis=2).reshape(n, q[0] * strides[0], q[1] * strides[1], cin)
    (lo_h, _), (lo_w, _) = pads
    return full[:, lo_h:lo_h + in_hw[0], lo_w:lo_w + in_hw[1]]


def fold_input_grad(x, w, dy, strides, pads, dilation):
    """dx of ``fold_forward``: the 2-D convolution's input-gradient (phase-decomposed when
    strided in H, W; XLA's own otherwise), sent back through the depth-folded columns.

    Args:
      x: (N, D, H, W, C_in) forward input (only its shape and dtype are used);
      w: (k_d, k_h, k_w, C_in, C_out); dy: (N, D_out, H_out, W_out, C_out).

    Returns:
      (N, D, H, W, C_in) in x's dtype.
    """
    fold = lambda xx: _fold_columns(xx, w.shape[0], strides[0], pads[0], dilation[0])[0]  # noqa: E731
    cols, unfold = jax.vjp(fold, x)  # cols' values go unused (XLA drops them)
    wk = _fold_kernel(w)
    dy2 = dy.reshape(-1, *dy.shape[2:])
    if max(strides[1:]) > 1 and tuple(dilation[1:]) == (1, 1):
        dcols = strided_input_grad_2d(dy2, wk, cols.shape[1:3], strides[1:], pads[1:])
    else:  # stride 1: XLA's input-gradient is itself a YNNPACK convolution
        _, vjp = jax.vjp(lambda c: primitives.conv_xla(c, wk, strides[1:], pads[1:],
                                                       dilation[1:]), cols)
        dcols = vjp(dy2)[0]
    return unfold(dcols.astype(x.dtype))[0]


def _chunks_for(x, f: str, chunks: int) -> int:
    """Chunks a pass with choice ``f`` runs in: native and depth-folded passes and batches
    that ``chunks`` does not divide run whole; slab passes loop over their slabs already.
    (XLA:CPU runs a convolution inside a loop body far below its speed outside one: a
    depth-folded input-gradient over 8 chunks of a 16x24x60x60x32 layer took 16.8 s instead
    of 0.4 s.)"""
    return (chunks if f not in "xf" + "".join(WINOGRAD_SLABS) and chunks > 1
            and x.shape[0] % chunks == 0 else 1)


def _fwd(x, w, strides, pads, dilation, f, chunks=1):
    if f == "x":
        return primitives.conv_xla(x, w, strides, pads, dilation)
    if f == "f":
        fn = lambda xc: fold_forward(xc, w, strides, pads, dilation)  # noqa: E731
    elif f in WINOGRAD_TILES:
        fn = lambda xc: conv_winograd.forward(  # noqa: E731
            xc, w, pads, WINOGRAD_TILES[f], f in WINOGRAD_SLABS)
    else:
        fn = lambda xc: conv_forward(xc, w, strides, pads, dilation, int(f))  # noqa: E731
    return _chunked(fn, _chunks_for(x, f, chunks), x)


def _igrad(x, w, dy, strides, pads, dilation, i, chunks=1):
    if i == "x":
        _, vjp = jax.vjp(lambda xx: primitives.conv_xla(xx, w, strides, pads, dilation), x)
        return vjp(dy)[0]
    if i == "c":
        fn = lambda xc, dyc: primitives.input_grad_col2im(  # noqa: E731
            xc, dyc, w, strides, pads, dilation)
    elif i == "f":
        fn = lambda xc, dyc: fold_input_grad(xc, w, dyc, strides, pads, dilation)  # noqa: E731
    elif i in WINOGRAD_TILES:
        fn = lambda xc, dyc: conv_winograd.input_grad(  # noqa: E731
            dyc, w, xc.shape[1:-1], pads, WINOGRAD_TILES[i], i in WINOGRAD_SLABS)
    else:
        fn = lambda xc, dyc: input_grad(  # noqa: E731
            dyc, w, xc.shape[1:-1], strides, pads, dilation, int(i))
    return _chunked(fn, _chunks_for(x, i, chunks), x, dy)


def _wgrad(x, w, dy, strides, pads, dilation, wc, chunks=1):
    if wc == "x":
        _, vjp = jax.vjp(lambda ww: primitives.conv_xla(x, ww, strides, pads, dilation), w)
        return vjp(dy)[0]
    if wc == "f":
        def fold_w(xc, dyc):
            _, vjp = jax.vjp(lambda ww: fold_forward(xc, ww, strides, pads, dilation), w)
            return vjp(dyc)[0]
        return _chunked_sum(fold_w, _chunks_for(x, wc, chunks), x, dy)
    if wc in WINOGRAD_TILES:
        return _chunked_sum(lambda xc, dyc: conv_winograd.weight_grad(
                                xc, dyc, w.shape, w.dtype, pads, WINOGRAD_TILES[wc],
                                wc in WINOGRAD_SLABS),
                            _chunks_for(x, wc, chunks), x, dy)
    return _chunked_sum(lambda xc, dyc: weight_grad(xc, dyc, w.shape, w.dtype, strides, pads,
                                                    dilation, int(wc)),
                        _chunks_for(x, wc, chunks), x, dy)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def conv_split(x, w, strides, pads, dilation, plan, chunks=1):
    """Convolution whose forward / input-gradient / weight-gradient follow ``plan`` (F, I, W),
    non-native passes over ``chunks`` batch slices in sequence."""
    return _fwd(x, w, strides, pads, dilation, plan[0], chunks)


def _conv_split_fwd(x, w, strides, pads, dilation, plan, chunks):
    return _fwd(x, w, strides, pads, dilation, plan[0], chunks), (x, w)


def _conv_split_bwd(strides, pads, dilation, plan, chunks, res, dy):
    x, w = res
    dx = _igrad(x, w, dy, strides, pads, dilation, plan[1], chunks).astype(x.dtype)
    dw = _wgrad(x, w, dy, strides, pads, dilation, plan[2], chunks).astype(w.dtype)
    return dx, dw


conv_split.defvjp(_conv_split_fwd, _conv_split_bwd)


def conv(x, w, strides, pads, dilation, impl: str):
    """``ops.conv`` for a ``"split_FIW[bK]"`` impl (see module docstring)."""
    plan = parse(impl, w.ndim - 2)
    for c in sorted(set(plan) & set(WINOGRAD_TILES)):
        if not winograd_ok(w.shape[:-2], strides, dilation, c):
            raise ValueError(
                f"conv impl={impl!r}: Winograd ({c}) needs a stride-1 undilated convolution "
                f"with a kernel larger than 1"
                + (f" and at most {WINOGRAD_MAX_TAPS[c]} taps per axis"
                   if c in WINOGRAD_MAX_TAPS else "")
                + f"; this one has kernel {tuple(w.shape[:-2])}, strides {tuple(strides)}, "
                f"dilation {tuple(dilation)}")
    return conv_split(x, w, strides, pads, dilation, plan, batch_chunks(impl))


def pass_fn(pass_name: str, choice: str, strides, pads, dilation):
    """One pass alone, for timing: fwd (x, w) -> y; igrad (x, w, dy) -> dx; wgrad -> dw.

    ``choice`` as in ``choices``, optionally with a chunk count (``"2b4"``)."""
    c, k = split_choice(choice)
    if pass_name == "fwd":
        return lambda x, w, dy: _fwd(x, w, strides, pads, dilation, c, k)
    if pass_name == "igrad":
        return lambda x, w, dy: _igrad(x, w, dy, strides, pads, dilation, c, k)
    if pass_name == "wgrad":
        return lambda x, w, dy: _wgrad(x, w, dy, strides, pads, dilation, c, k)
    raise ValueError(f"pass {pass_name!r}: expected fwd, igrad or wgrad")
