"""Runs fold 0 of the toy two-stage method of ``test_stages.py`` with a fault injected at
the K-th file write (every output goes through ``lungjax.atomic.atomic_path``):

    python tests/fault_run.py WORKDIR CACHE_DIR MODE K

MODE "kill": SIGKILL as the K-th write starts (no cleanup runs, as when a machine is
preempted or the OOM killer strikes). MODE "enospc": the K-th write fails as on a full
disk, after its data went to the temporary file. MODE "none": no fault. On a normal exit
the last line printed is ``writes=N``.
"""

import contextlib
import os
import signal
import sys

import lungjax.atomic as atomic  # patched before any module binds atomic_path

workdir, cache_dir, mode, k = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
_real = atomic.atomic_path
_writes = [0]


@contextlib.contextmanager
def _faulty(path):
    _writes[0] += 1
    if mode == "kill" and _writes[0] == k:
        os.kill(os.getpid(), signal.SIGKILL)
    with _real(path) as tmp:
        yield tmp
        if mode == "enospc" and _writes[0] == k:
            raise OSError(28, "No space left on device", os.fspath(path))


atomic.atomic_path = _faulty
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_stages  # noqa: E402  (registers the toy method's models and stage kind)

from lungjax import stages  # noqa: E402

config = test_stages.toy_method(cache_dir)
config.data.fold = 0
try:
    stages.run("train", config, workdir)
except OSError as e:
    raise SystemExit(f"error: {e}") from None
print(f"writes={_writes[0]}")
