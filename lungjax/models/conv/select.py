"""Which convolution formulation a layer runs: overrides, platform, per-shape measurements.

Resolution, done once per layer when it is traced:

1. a global override: ``set_conv_impl(name)`` (what a config calls), else the environment
   variable ``LUNGJAX_CONV_IMPL``; "auto" or unset means no override;
2. the layer's own ``impl`` attribute when it is not "auto";
3. "auto": off CPU (GPU/TPU) always ``"xla"``; on CPU the formulation measured fastest for
   the nearest layer shape in the committed table ``table.json`` (produced by
   ``python bench/conv_autotune.py``: for every layer shape of the benchmark networks and
   the lungjax models, each pass (forward, input-gradient, weight-gradient) timed alone in
   each of its formulations, the fastest per pass composed into a ``"split_FIW"`` plan
   (``split``), and that plan's full forward + backward timed against the reference
   formulations, on this project's 2-core CPU machine), merged with the on-disk cache of shapes tuned on first use when
   ``LUNGJAX_CONV_AUTOTUNE=1`` (``~/.cache/lungjax/conv_autotune.json``, or
   ``LUNGJAX_CONV_CACHE``). A committed table keeps "auto" deterministic and free of
   timing at trace time by default (tests, CI, exports); first-use tuning is there for a
   machine whose CPU differs from the one the table was measured on.

Memory: "auto" never picks a formulation whose largest temporary buffer (the im2col
patches, ``batch * out_voxels * kernel_volume * C_in * itemsize`` bytes, or a split plan's
largest column buffer, :func:`buffer_bytes`) exceeds ``BUFFER_BUDGET_BYTES`` (1 GiB; the
environment variable ``LUNGJAX_CONV_BUFFER_BYTES`` overrides it, <= 0 disables the check);
such a layer runs "xla", whose convolutions need no such buffer. This is what a layer
applied to a whole scan meets: the timing table holds training shapes, whose nearest entry
may be an im2col formulation whose patches at scan size would exhaust memory. A layer
with a symbolic batch size (``jax.export``) is looked up and budgeted per example (batch
1); one with symbolic spatial sizes runs "xla" (its buffers have no bound). A formulation
forced by a config, the environment or the layer attribute is used as given.

An override is read at trace time: functions already jitted keep the formulation they were
traced with (convolutions of every formulation share parameters, so switching is safe).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import pathlib
import threading

import jax
import jax.numpy as jnp
import numpy as np

from lungjax.models.conv import ops as conv_ops
from lungjax.models.conv import primitives
from lungjax.models.conv import split as conv_split

ENV_IMPL = "LUNGJAX_CONV_IMPL"
ENV_AUTOTUNE = "LUNGJAX_CONV_AUTOTUNE"
ENV_CACHE = "LUNGJAX_CONV_CACHE"
ENV_BUDGET = "LUNGJAX_CONV_BUFFER_BYTES"
#: Largest temporary buffer (bytes) a formulation picked by "auto" may build per layer.
BUFFER_BUDGET_BYTES = 1 << 30
TABLE_PATH = pathlib.Path(__file__).with_name("table.json")
ALL_IMPLS = ("auto",) + tuple(dict.fromkeys(conv_ops.CONV_IMPLS + conv_ops.CONV_TRANSPOSE_IMPLS))
# Used on CPU when neither the table nor the cache has an entry of this rank.
DEFAULT_CPU = {"conv": "matmul", "conv_transpose": "matmul"}

class _State:
    override: str | None = None  # process-wide: tracing may happen on any thread
    cache: tuple | None = None
    recorded: list | None = None  # keys seen by resolve() inside record_keys()


_state = _State()
_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class ConvKey:
    """Everything about a convolution call that its speed depends on.

    ``kind`` is "conv" or "conv_transpose"; shapes are channels-last, spatial tuples in
    array axis order.
    """

    kind: str
    batch: int
    spatial: tuple[int, ...]
    cin: int
    cout: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]
    dtype: str

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (list(map(list, v)) if k == "pads" else list(v) if isinstance(v, tuple) else v)
                for k, v in d.items()}

    @classmethod
    def from_json(cls, d: dict) -> "ConvKey":
        return cls(kind=d["kind"], batch=int(d["batch"]), spatial=tuple(d["spatial"]),
                   cin=int(d["cin"]), cout=int(d["cout"]), kernel=tuple(d["kernel"]),
                   strides=tuple(d["strides"]), dilation=tuple(d["dilation"]),
                   pads=tuple(tuple(p) for p in d["pads"]), dtype=str(d["dtype"]))

    def features(self) -> tuple[float, ...]:
        """Log-scale descriptors used for nearest-shape lookup (needs concrete sizes:
        see :func:`concrete_key`)."""
        kvol = math.prod(self.kernel)
        rows = self.batch * math.prod(max(1, n // s) for n, s in zip(self.spatial, self.strides))
        return (math.log2(rows), math.log2(self.cin * kvol), math.log2(self.cout), math.log2(kvol),
                4.0 * float(any(s > 1 for s in self.strides)), 4.0 * float(self.dtype != "float32"))


# ----------------------------------------------------------------------------------------
# Overrides
# ----------------------------------------------------------------------------------------


def _check(impl: str | None, where: str) -> str | None:
    if impl is None:
        return None
    impl = str(impl).strip().lower()
    if impl in ALL_IMPLS:
        return impl
    if impl.startswith(conv_split.PREFIX):
        conv_split.parse(impl, 3)  # a clear error for a malformed plan
        return impl
    raise ValueError(f"{where}: convolution impl {impl!r} unknown; expected one of {ALL_IMPLS} "
                     "or 'split_FIW' (see lungjax.models.conv.split)")


def set_conv_impl(impl: str | None) -> None:
    """Forces one formulation for every ``Conv``/``ConvTranspose`` traced from now on.

    Args:
      impl: "xla", "im2col", "matmul", "hybrid", "split_FIW" (see ``split``; a
        transposed convolution, which has no hybrid or split form, then runs "matmul"),
        "auto" (per-layer choice) or None (clear the
        override, falling back to ``LUNGJAX_CONV_IMPL``).
    """
    _state.override = _check(impl, "set_conv_impl")


def get_conv_impl_override() -> str | None:
    """The active global override ("auto" counts as none), or None."""
    impl = _state.override
    if impl is None:
        impl = _check(os.environ.get(ENV_IMPL) or None, f"environment variable {ENV_IMPL}")
    return None if impl in (None, "auto") else impl


@contextlib.contextmanager
def conv_impl(impl: str | None):
    """Context manager form of ``set_conv_impl`` (restores the previous override)."""
    prev = _state.override
    set_conv_impl(impl)
    try:
        yield
    finally:
        _state.override = prev


# ----------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------


def cache_path() -> pathlib.Path:
    return pathlib.Path(os.environ.get(ENV_CACHE) or
                        pathlib.Path.home() / ".cache" / "lungjax" / "conv_autotune.json")


def _read_entries(path: pathlib.Path) -> list[dict]:
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data["entries"]
        for e in entries:
            ConvKey.from_json(e["key"]), str(e["best"]), dict(e["ms"])
        return entries
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a convolution timing table ({err})") from err


@functools.lru_cache(maxsize=1)
def _table() -> tuple[tuple[ConvKey, str], ...]:
    return tuple((ConvKey.from_json(e["key"]), e["best"]) for e in _read_entries(TABLE_PATH))


def _cache() -> dict[ConvKey, str]:
    cached = _state.cache
    path = cache_path()
    if cached is None or cached[0] != path:
        cached = (path, {ConvKey.from_json(e["key"]): e["best"] for e in _read_entries(path)})
        _state.cache = cached
    return cached[1]


def lookup(key: ConvKey) -> tuple[str, str]:
    """Best measured formulation for ``key``: (impl, how) with how in
    {"exact", "nearest", "default"}."""
    entries = dict(_table())
    entries.update(_cache())
    if key in entries:
        return entries[key], "exact"
    # Nearest among the entries whose plan can run this layer: a Winograd plan measured on
    # a 3x3x3 layer cannot run a (3, 5, 5) or strided one.
    same = [(k, b) for k, b in entries.items()
            if k.kind == key.kind and len(k.kernel) == len(key.kernel)
            and (k.kind != "conv" or not conv_split.is_split(b)
                 or conv_split.plan_applies(b, key.kernel, key.strides, key.dilation))]
    if not same:
        return DEFAULT_CPU[key.kind], "default"
    f = key.features()
    best = min(same, key=lambda kb: sum((a - b) ** 2 for a, b in zip(kb[0].features(), f)))
    return best[1], "nearest"


def record(key: ConvKey, ms: dict[str, float]) -> str:
    """Adds a measurement to the on-disk cache (atomic rewrite); returns the best impl."""
    from lungjax.atomic import atomic_write_text

    from lungjax.models.conv.tune import pick_best

    best = pick_best(ms)
    with _lock:
        path = cache_path()
        entries = [e for e in _read_entries(path) if ConvKey.from_json(e["key"]) != key]
        entries.append({"key": key.to_json(), "ms": ms, "best": best})
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"entries": entries}, indent=1))
        _state.cache = None
    return best


def _autotune(key: ConvKey) -> str:
    from lungjax.models.conv import tune as conv_tune

    return record(key, conv_tune.tune_key(key)["ms"])


@contextlib.contextmanager
def record_keys():
    """Collects the ``ConvKey`` of every layer traced inside (for ``bench/conv_autotune.py``).

    Yields:
      a list that fills with keys, in trace order, duplicates included.
    """
    prev, _state.recorded = _state.recorded, []
    try:
        yield _state.recorded
    finally:
        _state.recorded = prev


# ----------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------


def _is_int(d) -> bool:
    return isinstance(d, (int, np.integer))


def concrete_key(key: ConvKey) -> ConvKey | None:
    """``key`` with a symbolic batch size (``jax.export``) replaced by 1 (per example);
    None when a spatial size is symbolic."""
    if not all(_is_int(n) for n in key.spatial):
        return None
    return key if _is_int(key.batch) else dataclasses.replace(key, batch=1)


def buffer_budget() -> int | None:
    """The buffer budget in bytes (``LUNGJAX_CONV_BUFFER_BYTES`` or
    ``BUFFER_BUDGET_BYTES``); None when disabled (a value <= 0)."""
    raw = os.environ.get(ENV_BUDGET, "").strip()
    try:
        budget = int(float(raw)) if raw else BUFFER_BUDGET_BYTES
    except ValueError:
        raise ValueError(f"environment variable {ENV_BUDGET}={raw!r}: expected a number of "
                         "bytes (<= 0 disables the budget)") from None
    return budget if budget > 0 else None


def buffer_bytes(impl: str, key: ConvKey) -> int:
    """Largest temporary buffer (bytes) formulation ``impl`` builds for ``key`` in any of
    its passes (forward, input-gradient, weight-gradient); 0 for "xla".

    im2col, matmul and hybrid build the patches ``(B, *out, K * C_in)`` (forward or
    weight-gradient; matmul's input-gradient the smaller of that and ``(B, *in, K * C_out)``,
    never more); a split plan its passes' column buffers (``conv_split.buffer_bytes``). A
    transposed convolution's matmul form builds ``(B, *in, K * C_out)`` tap outputs unless
    kernel == stride (then that is the output itself, reordered).
    """
    if impl == "xla":
        return 0
    item = int(jnp.dtype(key.dtype).itemsize)
    kvol = math.prod(key.kernel)
    if key.kind == "conv_transpose":
        if impl == "matmul":
            if tuple(key.kernel) == tuple(key.strides) and set(key.dilation) == {1}:
                return 0
            return key.batch * math.prod(key.spatial) * kvol * key.cout * item
        out = [(n - 1) * s + 1 + lo + hi - (k - 1) * d for n, s, (lo, hi), k, d in
               zip(key.spatial, key.strides, key.pads, key.kernel, key.dilation)]
        return key.batch * math.prod(out) * kvol * key.cin * item
    out = primitives.conv_out_shape(key.spatial, key.kernel, key.strides, key.pads, key.dilation)
    if conv_split.is_split(impl):
        plan = conv_split.parse(impl, len(key.kernel))
        # A "bK" plan builds one batch chunk's buffers at a time (when K divides the batch).
        chunks = conv_split.batch_chunks(impl)
        batch = key.batch // chunks if key.batch % chunks == 0 else key.batch
        return max(conv_split.buffer_bytes(p, c, batch, key.spatial, out, key.kernel,
                                           key.cin, key.cout, item)
                   for p, c in zip(("fwd", "igrad", "wgrad"), plan))
    return key.batch * math.prod(out) * kvol * key.cin * item


def resolve(layer_impl: str, key: ConvKey) -> str:
    """The formulation a layer with attribute ``impl=layer_impl`` runs for ``key``."""
    if _state.recorded is not None:
        _state.recorded.append(key)
    impl = get_conv_impl_override() or _check(layer_impl, "Conv.impl")
    auto = impl == "auto"
    if auto:
        if jax.default_backend() != "cpu":
            return "xla"
        key = concrete_key(key)
        if key is None:
            return "xla"
        impl, how = lookup(key)
        if how != "exact" and os.environ.get(ENV_AUTOTUNE, "") not in ("", "0"):
            impl = _autotune(key)
    if key.kind == "conv_transpose" and (impl == "hybrid" or conv_split.is_split(impl)):
        impl = "matmul"
    if auto:
        budget = buffer_budget()
        if budget is not None and buffer_bytes(impl, key) > budget:
            return "xla"
    if key.kind == "conv" and conv_split.is_split(impl):
        conv_split.parse(impl, len(key.kernel))
    elif key.kind == "conv" and impl not in conv_ops.CONV_IMPLS:
        raise ValueError(f"Conv.impl={impl!r}: expected one of {conv_ops.CONV_IMPLS}, "
                         "'split_FIW' or 'auto'")
    if key.kind == "conv_transpose" and impl not in conv_ops.CONV_TRANSPOSE_IMPLS:
        raise ValueError(f"ConvTranspose.impl={impl!r}: expected one of "
                         f"{conv_ops.CONV_TRANSPOSE_IMPLS}, 'hybrid' or 'auto'")
    return impl
