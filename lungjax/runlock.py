"""One run per run folder: a lock file that says who holds it.

Two processes that each believe they are a whole run (e.g. ``srun -n 2`` without JAX's
cluster detection, or the same command started twice) would write the same checkpoints
and records. Before a fold runs, process 0 of the run takes ``<folder>/.lungjax.lock``
with ``fcntl.flock`` and writes into it the holder's host, pid, process count and start
time; a second run finds the lock held and stops with one line naming the holder. The
kernel drops the lock when the holder exits, however it exits (a killed run leaves a
stale file but no lock), so resuming after a crash needs nothing removed by hand.
Processes 1..N-1 of a multi-host run take no lock: their process 0 holds it for them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
import warnings
from typing import Iterator

from lungjax import fileio

LOCK_NAME = ".lungjax.lock"


class RunFolderBusy(RuntimeError):
    """The run folder is held by another run."""


@contextlib.contextmanager
def run_folder_lock(folder: str | os.PathLike, *, process_index: int = 0,
                    process_count: int = 1) -> Iterator[str | None]:
    """Holds ``<folder>/.lungjax.lock`` for the duration of the block (process 0 only).

    Args:
      folder: the run folder (created if missing).
      process_index, process_count: this process's place in its run (``jax.process_*``).

    Yields:
      The lock file's path (None on processes other than 0).

    Raises:
      RunFolderBusy: another live run holds the folder; the message names the folder and
        the holder (host, pid, process count, start time).
    """
    if process_index != 0:
        yield None
        return
    folder = os.fspath(folder)
    if fileio.is_url(folder):
        # Object stores have no advisory locks; a lock object could not be told from one
        # a killed run left behind.
        warnings.warn(f"{folder}: an object store cannot lock the run folder; two runs on "
                      "it would not be stopped", stacklevel=3)
        yield None
        return
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderBusy(f"{folder}: in use by another run ({_holder(path)}); wait "
                                "for it to finish or give this run another --workdir") from None
        except OSError as e:  # a file system without locks (some network mounts)
            warnings.warn(f"{folder}: cannot lock the run folder ({e.strerror}); two runs on "
                          "it would not be stopped", stacklevel=3)
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "process_count": int(process_count),
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the flock


def _holder(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            h = json.load(f)
        return (f"host {h['host']}, pid {h['pid']}, {h['process_count']} process(es), "
                f"started {h['started']}")
    except (OSError, ValueError, KeyError):
        return "holder unknown"
