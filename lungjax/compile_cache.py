"""JAX's persistent compilation cache for the commands that serve scans.

A new scan shape (whole-scan tiles are sized to each volume) compiles its programs once per
machine instead of once per process: the second ``python -m lungjax.detect`` on scans of the
same size compiles nothing. Compiled programs are kept in ``~/.cache/lungjax/xla`` (or
``LUNGJAX_XLA_CACHE_DIR``; "0" or "off" disables it).
"""

from __future__ import annotations

import os
import pathlib

ENV = "LUNGJAX_XLA_CACHE_DIR"
#: Programs that compile faster than this are not worth a file.
MIN_COMPILE_SECONDS = 0.5


def enable() -> str | None:
    """Points JAX's persistent compilation cache at the cache folder; returns it, or None
    when ``LUNGJAX_XLA_CACHE_DIR`` disables it. Call before the first compilation."""
    import jax

    raw = os.environ.get(ENV, "").strip()
    if raw.lower() in ("0", "off", "no", "false"):
        return None
    path = pathlib.Path(raw).expanduser() if raw else \
        pathlib.Path.home() / ".cache" / "lungjax" / "xla"
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return str(path)
