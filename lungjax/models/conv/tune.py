"""Timing of one convolution shape in each formulation (forward + backward), and of each
pass (forward, input-gradient, weight-gradient) alone in each of its ``split`` choices, for
the per-shape choice of ``impl="auto"`` on CPU (see ``select``, ``split``): exhaustively
(``tune_key``, for the shipped table) or bounded in time with a prior's ranking
(``tune_bounded``, on the machine that runs)."""

from __future__ import annotations

import statistics
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lungjax.models.conv import ops as conv_ops
from lungjax.models.conv import primitives
from lungjax.models.conv import split as conv_split


def _loss_fn(key, impl: str):
    """Scalar function of (x, w) whose gradient runs the layer's full backward."""
    def f(x, w, g):
        if key.kind == "conv":
            y = conv_ops.conv(x, w, strides=key.strides, pads=key.pads, dilation=key.dilation,
                              impl=impl)
        else:
            y = conv_ops.conv_transpose(x, w, strides=key.strides, pads=key.pads,
                                        dilation=key.dilation, impl=impl)
        return jnp.vdot(y.astype(jnp.float32), g)
    return f


def _inputs(key):
    """Random x (N, *spatial, C_in), w (*kernel, C_in, C_out) and output cotangent."""
    dtype = jnp.dtype(key.dtype)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((key.batch, *key.spatial, key.cin)), dtype)
    w = jnp.asarray(rng.standard_normal((*key.kernel, key.cin, key.cout)) * 0.1, dtype)
    y_shape = jax.eval_shape(
        lambda a, b: (conv_ops.conv if key.kind == "conv" else conv_ops.conv_transpose)(
            a, b, strides=key.strides, pads=key.pads, dilation=key.dilation, impl="xla"), x, w)
    g = jnp.asarray(rng.standard_normal(y_shape.shape), jnp.float32)
    return x, w, g


def _median_ms(compiled, args, reps, warmup, give_up_ms):
    """Median ms of ``compiled(*args)`` over ``reps`` runs after ``warmup`` (at least 1)
    untimed runs; a run slower than ``give_up_ms`` ends the timing (it cannot win), and a
    warm-up run over four times that skips the timed runs (its time is returned: heap
    growth alone does not make a first run that much slower).

    The warm-up is never timed otherwise: the first run of a program also pays for growing
    the heap to its buffer sizes (a depth-folded forward of a 16x24x60x60x32 layer: 1361 ms
    first, ~900 ms after), and judging a choice by that run alone dropped ones that win warm.
    """
    for _ in range(max(warmup, 1)):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        first = 1e3 * (time.perf_counter() - t0)
        if first > 4 * give_up_ms:
            return round(first, 3)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(1e3 * (time.perf_counter() - t0))
        if times[-1] > give_up_ms:
            break
    return round(statistics.median(times), 3)


def temp_bytes(compiled) -> int:
    """Temporary + output bytes XLA allocates per call of ``compiled`` (0 if unknown).

    XLA:CPU keeps every shifted slice of an im2col or shifted-slice formulation alive at
    once (e.g. 4.6 GB for the 27 slices of a 16x24x60x60x32 input), so the column-buffer
    estimate of ``conv_split.buffer_bytes`` alone underestimates the peak.
    """
    m = compiled.memory_analysis()
    if m is None:
        return 0
    return int(m.temp_size_in_bytes) + int(m.output_size_in_bytes)


def _chunk_count(need_bytes: int, max_bytes: int, batch: int, start: int = 1) -> int | None:
    """Smallest power-of-two multiple of ``start`` dividing ``batch`` that brings
    ``need_bytes / chunks`` within ``max_bytes``; None if there is none."""
    k = start
    if k > batch or batch % k:
        return None
    while need_bytes / k > max_bytes:
        k *= 2
        if k > batch or batch % k:
            return None
    return k


def _offered(key, pass_name: str, options) -> list[str]:
    """The choices of one pass worth timing, in timing order.

    Largest im2col first: usually the fastest, so the slow ones stop early. Then depth
    folding, then the Winograd choices in conv_split's order. A matmul contracting fewer
    than 8 numbers (im2col over few taps of a 1-channel input) is lowered as
    broadcast-multiplies that XLA fuses into, and recomputes in, the layer's consumers:
    fast alone, far slower inside a network. Not offered.
    """
    order = {"f": -9, **{c: i - 8 for i, c in enumerate(conv_split.WINOGRAD_TILES)}}
    options = sorted(options, key=lambda c: -int(c) if c.isdigit() else order.get(c, 10))
    return [c for c in options
            if not (c.isdigit() or c in conv_split.WINOGRAD_TILES)
            or conv_split.contraction_size(pass_name, c, key.kernel, key.cin, key.cout) >= 8]


def time_passes(key, reps: int = 3, warmup: int = 1,
                max_buffer_bytes: int = 2 << 30) -> dict[str, dict[str, float]]:
    """Median ms of each pass of a convolution alone, in each of its split choices.

    A choice already 2x slower than the best one of its pass is timed once only. A choice
    whose column buffer (``conv_split.buffer_bytes``) or compiled temporary memory
    (``temp_bytes``) would exceed ``max_buffer_bytes`` runs over the batch in the fewest
    power-of-two chunks that fit (recorded as e.g. ``"2b4"``), or not at all (absent from
    the result) when no chunking fits; "x" always runs whole.

    Args:
      key: a ``conv_select.ConvKey`` of kind "conv".

    Returns:
      {"fwd": {choice: ms}, "igrad": {...}, "wgrad": {...}} (choices as in
      ``conv_split.choices``, possibly with a ``b<chunks>`` suffix; "x" is always there).
    """
    x, w, g = _inputs(key)
    dy = g.astype(x.dtype)
    itemsize = jnp.dtype(key.dtype).itemsize
    out = {}
    for pass_name, options in conv_split.choices(len(key.kernel), key.kernel, key.strides,
                                                 key.dilation).items():
        options = _offered(key, pass_name, options)
        ms = {}
        for choice in options:
            chunks = _chunk_count(conv_split.buffer_bytes(
                pass_name, choice, key.batch, key.spatial, dy.shape[1:-1], key.kernel,
                key.cin, key.cout, itemsize), max_buffer_bytes, key.batch)
            if choice in conv_split.WINOGRAD_SLABS:  # loops over its slabs: never chunked
                chunks = 1
            if choice == "f" and chunks != 1:  # depth folding runs whole or not at all
                chunks = None
            compiled = None
            while chunks is not None:
                name = choice if chunks == 1 else f"{choice}b{chunks}"
                fn = conv_split.pass_fn(pass_name, name, key.strides, key.pads, key.dilation)
                compiled = jax.jit(fn).lower(x, w, dy).compile()
                need = temp_bytes(compiled)
                if choice == "x" or need <= max_buffer_bytes:
                    break
                if choice == "f" or choice in conv_split.WINOGRAD_SLABS:
                    # runs whole (conv_split._chunks_for): over the limit
                    chunks = None
                    break
                # The compiled program needs more than the estimate: more chunks.
                chunks = _chunk_count(need * chunks, max_buffer_bytes, key.batch, 2 * chunks)
            if chunks is None:
                continue
            ms[name] = _median_ms(compiled, (x, w, dy), reps, warmup,
                                  2 * min(ms.values()) if ms else float("inf"))
        out[pass_name] = ms
    return out


def best_plan(passes: dict[str, dict[str, float]]) -> str:
    """The ``"split_FIW[bK]"`` impl made of the fastest choice of each pass (K: the largest
    chunk count among them, so every pass stays within the memory it was timed in)."""
    pick = {p: conv_split.split_choice(min(ms, key=ms.get)) for p, ms in passes.items()}
    chunks = max(k for _, k in pick.values())
    return (conv_split.PREFIX + pick["fwd"][0] + pick["igrad"][0] + pick["wgrad"][0]
            + (f"b{chunks}" if chunks > 1 else ""))


def fit_plan(key, plan: str, max_buffer_bytes: int) -> str:
    """``plan`` with the fewest batch chunks (``b<K>``) whose full forward + backward, as
    XLA compiles it, needs at most ``max_buffer_bytes`` of temporary memory.

    Each pass was timed alone within the limit, but the composed program keeps more alive
    at once (``split_wvw`` of a 16x24x60x60x32 -> 32 layer: 2.05 GiB, its passes alone
    under 2); left unchunked such a plan is dropped and the layer falls back to a far
    slower formulation (there XLA's, 5.2 s, against 1.6 s for the plan's passes). Returns
    ``plan`` unchanged when no chunk count fits (it is then not timed).
    """
    x, w, g = _inputs(key)
    while True:
        step = jax.jit(jax.grad(_loss_fn(key, plan), argnums=(0, 1))).lower(x, w, g).compile()
        need = temp_bytes(step)
        if need <= max_buffer_bytes:
            return plan
        k = conv_split.batch_chunks(plan)
        more = _chunk_count(need * k, max_buffer_bytes, key.batch, 2 * k)
        if more is None:
            return plan
        plan = plan.split("b")[0] + f"b{more}"


def full_buffer_bytes(key, impl: str) -> int:
    """Size of the full im2col column buffer (N, *out, K*C_in) that ``impl`` builds for
    ``key`` (the forward of "im2col"/"matmul", the weight-gradient of "hybrid"); 0 for the
    native and the ``split`` formulations (whose passes are checked one by one)."""
    if key.kind != "conv" or impl not in ("im2col", "matmul", "hybrid"):
        return 0
    out = primitives.conv_out_shape(key.spatial, key.kernel, key.strides, key.pads, key.dilation)
    return (key.batch * int(np.prod(out)) * int(np.prod(key.kernel)) * key.cin
            * jnp.dtype(key.dtype).itemsize)


def time_key(key, impls: Sequence[str], reps: int = 5, warmup: int = 1,
             max_buffer_bytes: int | None = None) -> dict[str, float]:
    """Median milliseconds of forward + input- and weight-gradient of ``key`` per impl.

    Args:
      key: a ``conv_select.ConvKey``.
      impls: formulations to time.
      reps: timed repetitions after ``warmup`` (compile excluded).
      max_buffer_bytes: formulations other than "xla" whose full column buffer
        (``full_buffer_bytes``) or compiled temporary memory (``temp_bytes``) is larger are
        not run (absent from the result); None: no limit.

    Returns:
      {impl: median ms}.
    """
    x, w, g = _inputs(key)
    out = {}
    if max_buffer_bytes is not None:
        impls = [i for i in impls if full_buffer_bytes(key, i) <= max_buffer_bytes]
    for impl in impls:
        step = jax.jit(jax.grad(_loss_fn(key, impl), argnums=(0, 1)))
        step = step.lower(x, w, g).compile()  # compile outside the timed runs
        if (max_buffer_bytes is not None and impl != "xla"
                and temp_bytes(step) > max_buffer_bytes):
            continue
        # A formulation already 2x slower than the best one cannot win: stop timing it.
        out[impl] = _median_ms(step, (x, w, g), reps, warmup,
                               2 * min(out.values()) if out else float("inf"))
    return out


def pick_best(ms: dict[str, float], margin: float = 0.9) -> str:
    """The fastest formulation, except that a ``split`` plan must beat the fastest other
    one by ``margin`` (10%): per-pass choices are timed alone, and a plan that only ties
    in isolation has shown it can lose inside a network (fusion with its neighbours)."""
    others = {k: v for k, v in ms.items() if not conv_split.is_split(k)}
    best = min(ms, key=ms.get)
    if others and conv_split.is_split(best) and ms[best] > margin * min(others.values()):
        return min(others, key=others.get)
    return best


def tune_key(key, reps: int = 2, full: Sequence[str] = ("matmul", "xla"),
             max_buffer_bytes: int = 2 << 30) -> dict:
    """A table entry for ``key``: {"key", "ms", "best"[, "passes"]}.

    Convolutions: each pass timed alone in each split choice (``time_passes``), the fastest
    per pass composed into a ``"split_FIW"`` plan, then the full forward + backward of the
    plan and of ``full``; "best" is the fastest full timing (``pick_best``). Transposed
    convolutions: the full timing of each of their formulations. Formulations whose column
    buffers exceed ``max_buffer_bytes`` are left out (memory, and they would not win).
    """
    if key.kind != "conv":
        ms = time_key(key, conv_ops.CONV_TRANSPOSE_IMPLS, reps=reps)
        return {"key": key.to_json(), "ms": ms, "best": pick_best(ms)}
    passes = time_passes(key, reps=reps, max_buffer_bytes=max_buffer_bytes)
    plan = fit_plan(key, best_plan(passes), max_buffer_bytes)
    ms = time_key(key, [plan] + [i for i in full if i != plan], reps=reps,
                  max_buffer_bytes=max_buffer_bytes)
    return {"key": key.to_json(), "ms": ms, "best": pick_best(ms), "passes": passes}


#: Arithmetic rate assumed before a shape is measured (FLOP/s; the slowest formulations on
#: the 2-core machines run 3-D convolutions at 13-90 GFLOP/s), to skip at first use the
#: shapes whose measurement alone would overrun the per-shape time.
ASSUMED_FLOPS = 40e9
#: The same for XLA's native 3-D convolutions (13-90 GFLOP/s measured, forward and backward).
XLA_3D_FLOPS = 15e9


def pass_flops(key) -> float:
    """Multiply-adds x 2 of one pass (forward, input- or weight-gradient) of ``key``."""
    if key.kind == "conv":
        out = primitives.conv_out_shape(key.spatial, key.kernel, key.strides, key.pads,
                                        key.dilation)
    else:  # every input sample meets every tap once
        out = key.spatial
    return 2.0 * key.batch * float(np.prod(out)) * float(np.prod(key.kernel)) * key.cin * key.cout


def candidates(key, prior: dict | None, fallback: str, budget: int | None,
               shipped: str | None = None) -> list[str]:
    """Formulations worth measuring for ``key`` on a new machine, most promising first.

    The prior (the shipped or measured entry of this shape's training pass, ``select.prior``)
    ranks them: training keys take its full timings within 2x of its best, then
    ``fallback`` (the nearest shape's plan), the shipped table's plan, XLA's native form
    and im2col + matmul; forward-only convolutions take each forward choice as a
    ``"split_<F>xx"`` plan (XLA's native for "x"), ranked by the prior's forward-pass
    timings, then ``fallback``'s and the shipped plan's forward choices. Formulations whose
    buffers exceed ``budget`` bytes are left out.

    The shipped plan is always measured: ``fallback`` may be a shape this run has just
    measured, and a run tuning a network layer by layer would otherwise hand each
    winner on as the next layer's only plan to beat (matmul for every layer of yu2021's
    Res U-Net, 3x slower per step than the shipped split plans). ``shipped``: that plan,
    when the caller has looked it up already (default: looked up here).
    """
    from lungjax.models.conv import select as conv_select

    ms = dict((prior or {}).get("ms", {}))
    shipped = shipped or conv_select.lookup(key, measured=False)[0]
    if key.kind == "conv" and key.mode == "forward":
        fwd = {conv_split.split_choice(c)[0]: t
               for c, t in (prior or {}).get("passes", {}).get("fwd", {}).items()}
        first = [conv_split.parse(p, len(key.kernel))[0] for p in (fallback, shipped)
                 if conv_split.is_split(p)
                 and conv_split.plan_applies(p, key.kernel, key.strides, key.dilation)]
        opts = _offered(key, "fwd", conv_split.choices(
            len(key.kernel), key.kernel, key.strides, key.dilation)["fwd"])
        ordered = sorted((c for c in fwd if c in opts), key=fwd.get) + first + ["x"] + opts
        names = ["xla" if c == "x" else f"{conv_split.PREFIX}{c}xx" for c in ordered]
    else:
        ranked = sorted(ms, key=ms.get)
        names = [i for i in ranked if ms[i] <= 2 * ms[ranked[0]]] + [fallback, shipped, "xla"]
        names += ["matmul"] if key.kind == "conv" else list(conv_ops.CONV_TRANSPOSE_IMPLS)
    out = []
    for name in dict.fromkeys(names):
        if key.kind == "conv" and conv_split.is_split(name):
            if not conv_split.plan_applies(name, key.kernel, key.strides, key.dilation):
                continue
        elif name not in (conv_ops.CONV_IMPLS if key.kind == "conv"
                          else conv_ops.CONV_TRANSPOSE_IMPLS):
            continue
        if name == "xla" or budget is None or conv_select.buffer_bytes(name, key) <= budget:
            out.append(name)
    return out


def _timed_fn(key, impl: str):
    """(x, w, g) -> the forward (forward-only keys) or both gradients (training keys)."""
    if key.mode == "forward":
        op = conv_ops.conv if key.kind == "conv" else conv_ops.conv_transpose
        return lambda x, w, g: op(x, w, strides=key.strides, pads=key.pads,
                                  dilation=key.dilation, impl=impl)
    return jax.grad(_loss_fn(key, impl), argnums=(0, 1))


def _estimate_ms(key, name: str, prior: dict | None, measured: dict[str, float]) -> float:
    """Expected ms of one run of ``name`` before it runs: scaled from the prior's timings
    where the prior timed it and a measured candidate, else from its arithmetic (XLA's
    native 3-D convolutions at ``XLA_3D_FLOPS``, the others at ``ASSUMED_FLOPS``)."""
    ms = (prior or {}).get("ms", {}) if key.mode == "train" else {}
    common = [m for m in measured if m in ms and ms[m] > 0]
    if name in ms and common:
        return ms[name] * measured[common[0]] / ms[common[0]]
    rate = XLA_3D_FLOPS if name == "xla" and len(key.kernel) == 3 else ASSUMED_FLOPS
    return (1 if key.mode == "forward" else 3) * pass_flops(key) / rate * 1e3


# A first-use tuning replaces the shipped table's plan only with one at least this much
# faster (time ratio): a layer timed alone misleads. yu2021's Res U-Net (base 8, batch 6,
# 16x32x32) took each layer's fastest plan alone and trained at 3.9 steps/s against 6.6
# with the shipped plans; keeping the shipped plan where the gain was under 2x gave 6.2-6.9.
SHIPPED_MARGIN = 0.5


def tune_bounded(key, prior: dict | None, fallback: str, seconds: float,
                 budget: int | None, reps: int = 2) -> dict:
    """Measures ``candidates`` of ``key`` in order within ``seconds`` (compilation
    included): a candidate whose estimated runs (``_estimate_ms``, one warm-up and
    ``reps``) would overrun the time left is skipped; at least one is measured when the
    first fits, and a plan only wins over ones actually timed. The shipped table's plan,
    when measured, stays unless the winner takes at most ``SHIPPED_MARGIN`` of its time.

    Returns:
      {"ms": {impl: median ms} (empty when nothing fitted), "best": the winner
      (``pick_best``; ``fallback`` when nothing was measured), "seconds": spent}.
    """
    from lungjax.models.conv import select as conv_select

    t0 = time.perf_counter()
    shipped = conv_select.lookup(key, measured=False)[0]
    names = candidates(key, prior, fallback, budget, shipped)
    ms: dict[str, float] = {}
    x = w = g = None
    for name in names:
        left = seconds - (time.perf_counter() - t0)
        if (reps + 1) * _estimate_ms(key, name, prior, ms) / 1e3 > left:
            continue
        if x is None:
            x, w, g = _inputs(key)
        compiled = jax.jit(_timed_fn(key, name)).lower(x, w, g).compile()
        if name != "xla" and budget is not None and temp_bytes(compiled) > budget:
            continue
        ms[name] = _median_ms(compiled, (x, w, g), reps, 1,
                              2 * min(ms.values()) if ms else float("inf"))
    best = pick_best(ms) if len(ms) > 1 else fallback
    # With one plan timed (the others did not fit the time left), the fallback stands
    # untimed: nothing to compare it with.
    if shipped in ms and best in ms and ms[best] > SHIPPED_MARGIN * ms[shipped]:
        best = shipped
    return {"ms": ms if len(ms) > 1 else {}, "best": best,
            "seconds": round(time.perf_counter() - t0, 3)}
