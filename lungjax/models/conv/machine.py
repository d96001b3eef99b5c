"""What a convolution timing depends on besides the layer: the machine's fingerprint.

A plan measured fastest on one CPU is not the fastest on another (the shipped table's
ratios against PyTorch moved from 0.49-0.97 to 0.71-1.48 between two machines of the same
kind), so measured plans are kept per fingerprint: CPU model, the instruction-set
extensions XLA:CPU's code generation uses, the cores this process may run on, the cache
sizes, the jax/jaxlib versions and the allocator setting (``malloc.keep_freed_memory``
moves the choice toward im2col). A cache file carries the fingerprint it was measured
under and is trusted only where it matches.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import platform

from lungjax.models.conv import malloc as conv_malloc

ENV_CACHE_DIR = "LUNGJAX_CONV_CACHE_DIR"
# The extensions that change which formulation wins (vector width, bf16/AMX matmuls, FMA).
_ISA = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16",
        "asimd", "sve")


def _cpuinfo() -> tuple[str, tuple[str, ...]]:
    """(CPU model name, the ``_ISA`` flags present), from /proc/cpuinfo where there is one."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return model, ()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name in ("model name", "cpu model") and value.strip():
            model = value.strip()
        elif name in ("flags", "features"):
            flags |= set(value.split())
        if name == "" and flags:  # end of the first processor's block
            break
    return model, tuple(f for f in _ISA if f in flags)


def _caches() -> str:
    """The first CPU's cache levels as "L1d 32K L1i 32K L2 1024K L3 32768K" ("" if unknown)."""
    base = pathlib.Path("/sys/devices/system/cpu/cpu0/cache")
    parts = []
    for d in sorted(base.glob("index*")):
        try:
            level = (d / "level").read_text().strip()
            kind = (d / "type").read_text().strip()
            size = (d / "size").read_text().strip()
        except OSError:
            continue
        suffix = {"Data": "d", "Instruction": "i"}.get(kind, "")
        parts.append(f"L{level}{suffix} {size}")
    return " ".join(parts)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=1)
def _static() -> dict:
    import jax
    import jaxlib

    model, isa = _cpuinfo()
    return {"cpu": model, "isa": " ".join(isa), "cores": _cores(), "caches": _caches(),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__}


# The rules a cache's plans were chosen by: a new number starts a new cache file, so
# plans chosen by older rules are not trusted. 2: the shipped plan is always measured and
# kept unless twice as slow (lungjax.models.conv.tune.SHIPPED_MARGIN).
TUNING_RULES = 2


def fingerprint() -> dict:
    """This process's machine fingerprint (JSON-able dict of strings and ints)."""
    heap = "keep" if conv_malloc.is_kept() else "default"
    return {**_static(), "malloc": heap + ("+thp" if conv_malloc.huge_pages_on() else ""),
            "tuning_rules": TUNING_RULES}


def fingerprint_id(fp: dict | None = None) -> str:
    """A short stable name of ``fp`` (default: this process's): 12 hex digits."""
    text = json.dumps(fingerprint() if fp is None else fp, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def describe(fp: dict | None = None) -> str:
    """One line for the console: "AMD EPYC, 2 cores, jax 0.10.2, malloc keep"."""
    fp = fingerprint() if fp is None else fp
    return f"{fp['cpu']}, {fp['cores']} cores, jax {fp['jax']}, malloc {fp['malloc']}"


def cache_dir() -> pathlib.Path:
    """Where measured plans are kept: ``LUNGJAX_CONV_CACHE_DIR`` or ~/.cache/lungjax/conv."""
    raw = os.environ.get(ENV_CACHE_DIR, "").strip()
    return pathlib.Path(raw).expanduser() if raw else \
        pathlib.Path.home() / ".cache" / "lungjax" / "conv"


def cache_file() -> pathlib.Path:
    """This machine's plan cache: ``<cache_dir>/<fingerprint_id>.json``."""
    return cache_dir() / f"{fingerprint_id()}.json"
