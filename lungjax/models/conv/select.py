"""Which convolution formulation a layer runs: overrides, platform, per-shape measurements.

Resolution, done once per layer when it is traced:

1. a global override: ``set_conv_impl(name)`` (what a config calls), else the environment
   variable ``LUNGJAX_CONV_IMPL``; "auto" or unset means no override;
2. the layer's own ``impl`` attribute when it is not "auto";
3. "auto": off CPU (GPU/TPU) always ``"xla"``; on CPU the plan measured fastest on this
   machine for this layer shape and pass (training, or forward-only inside
   :func:`forward_only`: inference) when there is one (``read_cache``:
   ``~/.cache/lungjax/conv/<fingerprint>.json``, the directory ``LUNGJAX_CONV_CACHE_DIR``,
   the fingerprint ``machine``); else, when tuning is on (``LUNGJAX_CONV_TUNE``, default
   on), the shape is measured now (``tune.tune_bounded``: the candidates the shipped
   table's timings of this shape, or of the nearest shape, rank first, within
   ``LUNGJAX_CONV_TUNE_SECONDS`` per shape; announced once per process on stderr) and
   the winner cached; else the shipped table ``table.json`` (``python
   bench/conv_autotune.py``: every pass of every layer shape of the benchmark networks and
   the lungjax models timed in each formulation, on the machine its ``"machine"`` field
   names), exact or nearest shape. ``python -m lungjax.tune --config=...`` measures every
   shape a method meets ahead of time, without the per-shape bound's shortcuts. Tests, CI
   and multi-host runs (every host must compile the same program) use the shipped table
   only: no timing at trace time there.

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
import sys
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from lungjax.models.conv import machine as conv_machine
from lungjax.models.conv import ops as conv_ops
from lungjax.models.conv import primitives
from lungjax.models.conv import split as conv_split

ENV_IMPL = "LUNGJAX_CONV_IMPL"
ENV_TUNE = "LUNGJAX_CONV_TUNE"
ENV_TUNE_SECONDS = "LUNGJAX_CONV_TUNE_SECONDS"
ENV_TUNE_TOTAL = "LUNGJAX_CONV_TUNE_TOTAL_SECONDS"
#: Seconds a shape may take to tune on first use (compilation and timing).
TUNE_SECONDS = 4.0
#: Seconds one process may spend tuning on first use; later runs measure the rest.
TUNE_TOTAL_SECONDS = 90.0
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
    forward: int = 0  # > 0 inside forward_only()
    untuned: int = 0  # > 0 inside no_tuning()
    announced: bool = False  # the first-use tuning line was printed
    spent: float = 0.0  # seconds this process spent tuning on first use
    spent_said: bool = False  # the "tuning time spent" line was printed
    warned: set = set()  # cache files already warned about


_state = _State()
_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class ConvKey:
    """Everything about a convolution call that its speed depends on.

    ``kind`` is "conv" or "conv_transpose"; shapes are channels-last, spatial tuples in
    array axis order; ``mode`` "train" (forward and both gradients) or "forward"
    (inference only).
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
    mode: str = "train"

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (list(map(list, v)) if k == "pads" else list(v) if isinstance(v, tuple) else v)
                for k, v in d.items()}

    @classmethod
    def from_json(cls, d: dict) -> "ConvKey":
        return cls(kind=d["kind"], batch=int(d["batch"]), spatial=tuple(d["spatial"]),
                   cin=int(d["cin"]), cout=int(d["cout"]), kernel=tuple(d["kernel"]),
                   strides=tuple(d["strides"]), dilation=tuple(d["dilation"]),
                   pads=tuple(tuple(p) for p in d["pads"]), dtype=str(d["dtype"]),
                   mode=str(d.get("mode", "train")))

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


def tuning_enabled() -> bool:
    """Whether "auto" may use and extend this machine's measured plans
    (``LUNGJAX_CONV_TUNE``, default on; "0", "false", "no" or "off": the shipped table
    only, the cache neither read nor written)."""
    raw = os.environ.get(ENV_TUNE, "1").strip().lower()
    return raw not in ("0", "false", "no", "off", "")


def _seconds(env: str, default: float) -> float:
    raw = os.environ.get(env, "").strip()
    try:
        return float(raw) if raw else default
    except ValueError:
        raise ValueError(f"environment variable {env}={raw!r}: expected a number of "
                         "seconds") from None


def tune_seconds() -> float:
    """The time one shape may take to tune on first use (``LUNGJAX_CONV_TUNE_SECONDS``)."""
    return _seconds(ENV_TUNE_SECONDS, TUNE_SECONDS)


def tune_total_seconds() -> float:
    """The time one process may spend tuning on first use
    (``LUNGJAX_CONV_TUNE_TOTAL_SECONDS``)."""
    return _seconds(ENV_TUNE_TOTAL, TUNE_TOTAL_SECONDS)


def _entry_ok(e) -> dict:
    ConvKey.from_json(e["key"]), str(e["best"]), dict(e["ms"])
    return e


def _read_entries(path: pathlib.Path) -> list[dict]:
    """The shipped table's entries (a broken shipped table is an error)."""
    try:
        return [_entry_ok(e) for e in json.loads(path.read_text(encoding="utf-8"))["entries"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a convolution timing table ({err})") from err


@functools.lru_cache(maxsize=1)
def _table() -> dict[ConvKey, dict]:
    """The shipped table: key -> entry ({"key", "best", "ms"[, "passes"]})."""
    return {ConvKey.from_json(e["key"]): e for e in _read_entries(TABLE_PATH)}


def _warn_once(path: pathlib.Path, why: str) -> None:
    if (path, why) in _state.warned:  # once per file and reason
        return
    _state.warned.add((path, why))
    warnings.warn(f"{path}: convolution plan cache ignored ({why}); plans are measured "
                  "again and the file is rewritten", RuntimeWarning, stacklevel=3)


def read_cache(path: pathlib.Path | None = None) -> dict[ConvKey, dict]:
    """This machine's measured plans (``machine.cache_file()``): key -> entry.

    A file that is not valid JSON of the expected layout, or whose fingerprint is not this
    machine's (copied from another machine, another jax version, another allocator
    setting), is ignored with a warning, never trusted.
    """
    path = conv_machine.cache_file() if path is None else path
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        fp = data["fingerprint"]
        entries = {ConvKey.from_json(e["key"]): _entry_ok(e) for e in data["entries"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        _warn_once(path, f"unreadable: {type(err).__name__}: {err}"[:200])
        return {}
    if fp != conv_machine.fingerprint():
        _warn_once(path, f"measured on another machine: {conv_machine.describe(fp)}"
                   if isinstance(fp, dict) and "cpu" in fp else "no machine fingerprint")
        return {}
    return entries


def _cache() -> dict[ConvKey, dict]:
    """``read_cache()``, read again when the file changed (another process tuned); empty
    where tuning is off or the run spans several processes (the shipped table only: the
    hosts of a multi-host run must compile the same program)."""
    if not tuning_enabled() or jax.process_count() > 1:
        return {}
    path = conv_machine.cache_file()
    try:
        st = path.stat()
        stamp = (str(path), st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = (str(path), None, None)
    cached = _state.cache
    if cached is None or cached[0] != stamp:
        cached = (stamp, read_cache(path))
        _state.cache = cached
    return cached[1]


def _similar(a: ConvKey, b: ConvKey) -> bool:
    """Same layer, pass and dtype, with output rows within a factor 2: a forward-only
    plan measured on one scan's tiles serves the next scan's (tiles are sized to each
    volume, so whole-scan shapes rarely repeat exactly)."""
    same = dataclasses.replace(b, batch=a.batch, spatial=a.spatial) == a
    return same and abs(a.features()[0] - b.features()[0]) <= 1.0


def _train_key(key: ConvKey) -> ConvKey:
    return dataclasses.replace(key, mode="train")


def lookup(key: ConvKey, measured: bool = True) -> tuple[str, str]:
    """Best known formulation for ``key``: (impl, how); ``measured=False`` reads the
    shipped table alone (what runs where nothing is measured).

    how: "tuned" (measured on this machine, ``read_cache``; a forward-only key also takes
    a similar measured shape), "skipped" (a first-use tuning found no time to measure two
    candidates and kept this plan; ``python -m lungjax.tune`` measures it), "exact" (the
    shipped table's entry of this shape, or of its training pass for a forward-only key),
    "nearest" (the shipped or measured entry of the nearest shape whose plan can run this
    layer) or "default" (no entry of this kind).
    """
    cache = _cache() if measured else {}
    if key in cache:
        return cache[key]["best"], "tuned" if cache[key]["ms"] else "skipped"
    if key.mode == "forward":
        # Measured first; a similar shape found too large to measure ("skipped") also
        # stands for this one, or every new scan's shape would be tried again (the
        # dou2017 main job's whole-scan screening did so on every scan).
        near = [e for k, e in cache.items() if _similar(key, k)]
        if near:
            e = max(near, key=lambda e: bool(e["ms"]))  # the first measured, if any
            return e["best"], "tuned" if e["ms"] else "skipped"
    entries = {k: e["best"] for k, e in _table().items()}
    entries.update({k: e["best"] for k, e in cache.items() if k.mode == "train"})
    if _train_key(key) in entries:
        return entries[_train_key(key)], "exact"
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


def prior(key: ConvKey) -> dict | None:
    """The shipped or measured entry of ``key``'s training pass (its timings order the
    candidates a first-use tuning measures), or None."""
    measured = _cache().get(_train_key(key))
    return measured if measured and measured["ms"] else _table().get(_train_key(key))


def record(key: ConvKey, ms: dict[str, float], best: str | None = None,
           passes: dict | None = None) -> str:
    """Adds a measurement to this machine's cache (atomic rewrite); returns the best impl."""
    from lungjax.atomic import atomic_write_text

    from lungjax.models.conv.tune import pick_best

    best = best or pick_best(ms)
    with _lock:
        path = conv_machine.cache_file()
        entries = {k: e for k, e in read_cache(path).items() if k != key}
        entry = {"key": key.to_json(), "ms": ms, "best": best}
        if passes:
            entry["passes"] = passes
        entries[key] = entry
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"fingerprint": conv_machine.fingerprint(),
                                            "entries": list(entries.values())}, indent=1))
        _state.cache = None
    return best


def _tune(key: ConvKey, fallback: str) -> str:
    """First-use tuning of ``key`` within ``tune_seconds()`` and what is left of
    ``tune_total_seconds()``; announced once per process."""
    from lungjax.models.conv import tune as conv_tune

    left = tune_total_seconds() - _state.spent
    if left <= 0:
        if not _state.spent_said:
            _state.spent_said = True
            print(f"lungjax: this run's convolution tuning time ({tune_total_seconds():g} s, "
                  f"{ENV_TUNE_TOTAL}) is spent; the other shapes run the shipped plans until "
                  "a later run or `python -m lungjax.tune --config=...` measures them",
                  file=sys.stderr, flush=True)
        return fallback
    if not _state.announced:
        _state.announced = True
        print(f"lungjax: tuning convolution plans for this machine ({conv_machine.describe()})"
              f" on first use, at most ~{tune_seconds():g} s per layer shape and "
              f"{tune_total_seconds():g} s per run; kept in {conv_machine.cache_file()} "
              f"({ENV_TUNE}=0: the shipped plans)", file=sys.stderr, flush=True)
    # Tracing a jitted function stages every array operation; the measurement must run.
    with jax.ensure_compile_time_eval():
        result = conv_tune.tune_bounded(key, prior(key), fallback,
                                        min(tune_seconds(), left), buffer_budget())
    _state.spent += result["seconds"]
    if not result["ms"] and left < tune_seconds():
        return fallback  # cut short by this run's total: a later run measures it
    # Recorded even when nothing fitted ("skipped"): later runs do not try again.
    return record(key, result["ms"], result["best"])


def tunable() -> bool:
    """Whether first-use tuning may measure a shape in this process: enabled, on CPU, one
    process (hosts of a multi-host run must compile the same program, so they all use the
    shipped table), not while only recording keys or inside ``no_tuning``."""
    return (tuning_enabled() and _state.recorded is None and not _state.untuned
            and jax.process_count() == 1 and jax.default_backend() == "cpu")


@contextlib.contextmanager
def _counted(field: str):
    """Raises the process-wide counter ``_state.<field>`` for the duration (nestable)."""
    with _lock:
        setattr(_state, field, getattr(_state, field) + 1)
    try:
        yield
    finally:
        with _lock:
            setattr(_state, field, getattr(_state, field) - 1)


def no_tuning():
    """Context: layers traced inside never start a first-use tuning (a parameter
    initialisation's batch-1 trace, whose shapes the training never runs)."""
    return _counted("untuned")


def forward_only():
    """Context: layers traced inside are looked up (and tuned) as forward-only: inference,
    where no gradient is taken, has its own best plans (the whole-scan and tile shapes)."""
    return _counted("forward")


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


# The forward plan for a forward-only convolution whose chosen plan is over the buffer
# budget: Winograd one depth slab at a time (a ``lax.map`` over slabs, so only one slab's
# transforms are alive). Not shifted-slice accumulation ("0"): XLA:CPU keeps every shifted
# slice of the input alive at once, far beyond its estimate (dou2017's FCN on a 300^3
# volume asked for 142 GB).
_LEAN_FORWARD = "split_sxx"


def _within_budget(key: ConvKey, budget: int) -> str:
    """The formulation of a layer whose chosen plan is over ``budget`` bytes: XLA's own,
    except for a forward-only convolution, which runs ``_LEAN_FORWARD`` where it applies
    and fits. XLA:CPU's native 3-D convolution is the slowest choice by far at
    whole-scan size: the dou2017 FCN's first layer (1 -> 32 channels, (3, 5, 5)) on a
    176x126x194 volume took 5.9 s natively and 1.1 s as split_sxx."""
    if (key.mode == "forward" and key.kind == "conv" and math.prod(key.kernel) > 1
            and conv_split.plan_applies(_LEAN_FORWARD, key.kernel, key.strides, key.dilation)
            and buffer_bytes(_LEAN_FORWARD, key) <= budget):
        return _LEAN_FORWARD
    return "xla"


def resolve(layer_impl: str, key: ConvKey) -> str:
    """The formulation a layer with attribute ``impl=layer_impl`` runs for ``key``."""
    if _state.forward:
        key = dataclasses.replace(key, mode="forward")
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
        if how not in ("tuned", "skipped") and tunable():
            impl = _tune(key, impl)
    if key.kind == "conv_transpose" and (impl == "hybrid" or conv_split.is_split(impl)):
        impl = "matmul"
    if auto:
        budget = buffer_budget()
        if budget is not None and buffer_bytes(impl, key) > budget:
            return _within_budget(key, budget)
    if key.kind == "conv" and conv_split.is_split(impl):
        conv_split.parse(impl, len(key.kernel))
    elif key.kind == "conv" and impl not in conv_ops.CONV_IMPLS:
        raise ValueError(f"Conv.impl={impl!r}: expected one of {conv_ops.CONV_IMPLS}, "
                         "'split_FIW' or 'auto'")
    if key.kind == "conv_transpose" and impl not in conv_ops.CONV_TRANSPOSE_IMPLS:
        raise ValueError(f"ConvTranspose.impl={impl!r}: expected one of "
                         f"{conv_ops.CONV_TRANSPOSE_IMPLS}, 'hybrid' or 'auto'")
    return impl
