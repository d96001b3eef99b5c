"""Keeping freed memory in the process heap, so large XLA:CPU buffers stop page-faulting.

XLA:CPU allocates every executable's temporary and output buffers with ``posix_memalign``
at each call. glibc serves large requests (and any request from a worker thread's arena
that does not fit its 64 MB heap) with a fresh ``mmap`` and returns it with ``munmap`` on
free, so every call touches brand-new pages: the kernel faults in and zeroes each 4 KiB page
again. For a convolution written as im2col + matmul this costs more than the arithmetic: the
forward of a 64x(8x13x13)x64 (3,5,5) layer faults ~290,000 pages (1.2 GB) per call, ~0.3 s of
a ~0.8 s step on the 2-core development machine, and XLA's native convolutions pay the same
for their outputs and gradients.

``keep_freed_memory()`` sets glibc's ``mallopt`` so that all threads share the main heap
(``M_ARENA_MAX=1``), large blocks come from it instead of ``mmap`` (``M_MMAP_MAX=0``) and
freed memory is never returned to the kernel (``M_TRIM_THRESHOLD=-1``, which mallopt(3)
documents as disabling trimming): after the first steps the same pages are reused and the
faults disappear. Any finite threshold is too small for some step: the 16x24x60x60 residual
FP-reduction benchmark frees a 5.34 GB temporary block at the top of the heap every step;
with the largest positive threshold mallopt takes (2 GiB) the heap shrank and grew back by
that much every step (1.3 million page faults per step, 12.1 s per step against 9.5 s
without trimming), and the environment form's ``trim_threshold`` tunable still let the heap
shrink every step (strace: ``brk`` down and up by the block size). The price: the
process's resident memory stays at its peak, and without huge pages heap fragmentation can
put the next step's block somewhere new (that benchmark: 20.8 GB resident after six steps;
with ``MALLOC_ENV``'s huge pages as well, 10.3 GB and no faults after the first step).
Measured by ``python bench/malloc_bench.py --net fpr``. Call it once, early (before JAX
runs its first computation, so that XLA's worker threads attach to the shared heap), in a
training or inference process on CPU. ``MALLOC_ENV`` is the
environment form (for a process started by a script, ``reexec_with_malloc_env``), which can
also ask for transparent huge pages (``glibc.malloc.hugetlb=1``) that a running process
cannot switch on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NO_TRIM = -1  # M_TRIM_THRESHOLD: never give the top of the heap back (mallopt(3))

MALLOC_ENV = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                                "glibc.malloc.trim_threshold=4294967296:glibc.malloc.hugetlb=1"}

# Transparent huge pages for glibc's large blocks, nothing else changed: the blocks are
# still mapped per call, but the kernel faults them 2 MiB at a time (512x fewer faults) and
# the heap keeps glibc's own trimming, so resident memory does not grow with fragmentation.
THP_ENV = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}

_done = False


def keep_freed_memory() -> bool:
    """Configures glibc malloc to keep freed memory (module docstring); idempotent.

    Returns:
      True if glibc accepted the settings; False where there is no glibc (macOS, musl), in
      which case nothing changes.
    """
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = all(mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NO_TRIM)))
    _done = ok
    return ok


def is_kept() -> bool:
    """Whether ``keep_freed_memory`` took effect in this process."""
    return _done


def huge_pages_available() -> bool:
    """Whether the kernel gives transparent huge pages to memory that asks for them
    (``/sys/kernel/mm/transparent_hugepage/enabled`` is ``always`` or ``madvise``)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def huge_pages_on() -> bool:
    """Whether this process started with glibc's huge-page tunable (``THP_ENV``)."""
    return THP_ENV["GLIBC_TUNABLES"] in os.environ.get("GLIBC_TUNABLES", "").split(":")


def reexec_with_huge_pages(module: str) -> None:
    """Restarts the running ``python -m <module>`` command with ``THP_ENV`` added to
    ``GLIBC_TUNABLES``, so that glibc backs its large blocks with transparent huge pages.

    glibc reads its tunables only when a process starts, so a running program cannot
    switch them on. Nothing happens when ``module`` is not the program's main module (a
    test or a library call must never restart its host), when the variable already names
    ``glibc.malloc.hugetlb`` (the restarted process, or the user's own choice), off Linux
    glibc, or where the kernel has huge pages off. Does not return when it restarts
    (``os.execv`` with the original command line, interpreter flags included).

    Measured by ``python bench/malloc_bench.py --net dou2017_fpr --modes default,thp`` and
    ``--net fcn``: page faults per step 509k -> 40k and 107k -> 1k, seconds per step -12%
    and -11%, the same peak resident memory (unlike ``keep_freed_memory``).
    """
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if getattr(spec, "name", None) != module:
        return
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb=" in tunables:
        return
    import platform

    if (not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc"
            or not huge_pages_available()):
        return
    os.environ["GLIBC_TUNABLES"] = ":".join(
        t for t in (tunables, THP_ENV["GLIBC_TUNABLES"]) if t)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, list(sys.orig_argv))


def reexec_with_malloc_env(argv: list[str] | None = None) -> None:
    """Restarts the current Python script with ``MALLOC_ENV`` set, unless it already is;
    in the restarted process, also ``keep_freed_memory()`` (the environment cannot switch
    trimming off; see the module docstring).

    For benchmark scripts: call first thing, before importing JAX. Does not return when it
    restarts (``os.execv``).
    """
    if all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        keep_freed_memory()
        return
    os.environ.update(MALLOC_ENV)
    argv = sys.argv if argv is None else argv
    os.execv(sys.executable, [sys.executable] + list(argv))
