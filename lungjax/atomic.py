"""Atomic file writes: every result file is written to a temporary file in its target
directory, then renamed over the target, so a reader never sees a half-written file and
an interrupted write leaves the previous file intact.

``atomic_path`` is the one place that does the temp + rename; the ``atomic_write_*``
helpers are what most writers need. Writers that need a file name rather than bytes
(``np.savez``, ``Figure.savefig``, SimpleITK) write through ``atomic_path``.

A target that is a ``gs://`` / ``s3://`` URL (``lungjax.fileio``) is written to a local
temporary file and uploaded as one object when the block ends: an object store shows an
object only once its upload is complete, which is the same guarantee.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Iterator

import numpy as np

from lungjax import fileio

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_npz",
           "atomic_write_text"]

# mkstemp creates files readable by their owner only; results are shared read-only.
_FILE_MODE = 0o644


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path next to ``path``; on a clean exit renames it to ``path``.

    The temporary name ends with ``path``'s base name, so writers that choose a format
    from the extension (``savefig``) or append one when it is missing (``np.savez``) see
    the target's extension. Missing parent directories are created. On an exception the
    temporary file is removed and ``path`` is left as it was.

    Args:
      path: the file to write.

    Yields:
      The temporary file's path (str); it exists, empty, when the block starts.
    """
    path = os.fspath(path)
    if fileio.is_url(path):
        with _upload_on_exit(path) as tmp:
            yield tmp
        return
    path = fileio.local_path(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def _upload_on_exit(url: str) -> Iterator[str]:
    """``atomic_path`` for a URL: a local temporary file, uploaded whole on a clean exit."""
    fs, key = fileio.url_filesystem(url)  # fails before the block on a bad URL
    with tempfile.TemporaryDirectory(prefix="lungjax-upload-") as d:
        tmp = os.path.join(d, ".tmp-" + os.path.basename(url))
        open(tmp, "wb").close()
        yield tmp
        fs.put_file(tmp, key)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically, synced to disk before the rename."""
    if fileio.is_url(path):
        fs, key = fileio.url_filesystem(os.fspath(path))
        fs.pipe_file(key, data)  # one upload: the object appears whole or not at all
        return
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``atomic_write_bytes`` of ``text`` as UTF-8, line endings as given."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_plain(o):
    """JSON fallback for run records: NumPy scalars/arrays as Python values, objects with
    ``to_json()`` through it, anything else as its ``str``."""
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "to_json"):
        return o.to_json()
    return str(o)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """``obj`` as indented, key-sorted JSON (NumPy values converted), written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_plain)
                      + "\n")


def atomic_write_npz(path: str | os.PathLike, compressed: bool = False,
                     **arrays: np.ndarray) -> None:
    """``np.savez`` (or ``np.savez_compressed``) of ``arrays`` to ``path``, atomically.

    Args:
      path: the ``.npz`` file; written under exactly this name (no extension appended).
      compressed: deflate the members.
      **arrays: member name -> array, stored as given (dtype and shape kept).
    """
    save = np.savez_compressed if compressed else np.savez
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        save(f, **arrays)
