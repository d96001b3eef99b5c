"""One file layer for what a run writes and reads back: local paths and object-store URLs.

Run folders (stage records, checkpoints' neighbours, metric logs, plots, submissions),
exports and reports go through these functions, so one code path serves a local folder
and a bucket: ``gs://bucket/dir`` or ``s3://bucket/dir`` (``file:///abs/dir`` is a local
path). Local paths use the standard library; URLs use fsspec (``gcsfs`` / ``s3fs``, the
``cloud`` extra: ``pip install 'lungjax[cloud]'``), the layer Orbax's own path library
(``etils.epath``) stands on. Checkpoints go through Orbax and the patch store through
tensorstore, which address the same URLs themselves.

Object stores have folders only as key prefixes and no rename: ``makedirs`` does nothing
there, a folder exists once a file is under it, and a file appears whole when its upload
finishes (what ``lungjax.atomic`` relies on for URLs). A local S3-compatible server (MinIO,
Ceph) is reached with ``AWS_ENDPOINT_URL``; a GCS emulator with ``STORAGE_EMULATOR_HOST``
(gcsfs) and ``TENSORSTORE_GCS_HTTP_URL`` (tensorstore).
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import shutil
from typing import IO, Any

__all__ = ["abspath", "exists", "is_url", "isdir", "isfile", "listdir", "local_path",
           "makedirs", "move", "open_file", "remove", "url_filesystem"]

_URL_RE = re.compile(r"^([a-z][a-z0-9+.-]*)://")
# scheme -> the fsspec implementation package it needs.
URL_BACKENDS = {"gs": "gcsfs", "s3": "s3fs"}


def local_path(p: str | os.PathLike) -> str:
    """``p`` as a string, with ``file://`` stripped (a local path stays as it is)."""
    p = os.fspath(p)
    return "/" + p[len("file://"):].lstrip("/") if p.startswith("file://") else p


def is_url(p: str | os.PathLike) -> bool:
    """Whether ``p`` names an object-store location (``gs://``, ``s3://``), not a local
    path (``file://`` counts as local)."""
    p = os.fspath(p)
    return _URL_RE.match(p) is not None and not p.startswith("file://")


def url_filesystem(url: str):
    """``(fsspec filesystem, path within it)`` for a ``gs://`` / ``s3://`` URL.

    Raises:
      ValueError: another scheme, or its fsspec package is not installed (the message
        names the URL and the package).
    """
    scheme = _URL_RE.match(url).group(1)
    if scheme not in URL_BACKENDS:
        raise ValueError(f"{url}: unsupported URL scheme {scheme!r} (use a local path, "
                         f"file://, {', '.join(s + '://' for s in URL_BACKENDS)})")
    if importlib.util.find_spec(URL_BACKENDS[scheme]) is None:
        raise ValueError(f"{url}: {scheme}:// needs the {URL_BACKENDS[scheme]} package "
                         "(pip install 'lungjax[cloud]')")
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    # Checkpoints and the store are written by tensorstore, past fsspec's listing cache.
    fs.invalidate_cache()
    return fs, path


def abspath(p: str | os.PathLike) -> str:
    """A URL as given (no trailing slash); a local path made absolute."""
    p = os.fspath(p)
    return p.rstrip("/") if is_url(p) else os.path.abspath(local_path(p))


def exists(p: str | os.PathLike) -> bool:
    if not is_url(p):
        return os.path.exists(local_path(p))
    fs, path = url_filesystem(os.fspath(p))
    return fs.exists(path)


def isfile(p: str | os.PathLike) -> bool:
    if not is_url(p):
        return os.path.isfile(local_path(p))
    fs, path = url_filesystem(os.fspath(p))
    return fs.isfile(path)


def isdir(p: str | os.PathLike) -> bool:
    """A local folder, or a URL prefix that has at least one file under it."""
    if not is_url(p):
        return os.path.isdir(local_path(p))
    fs, path = url_filesystem(os.fspath(p))
    return fs.isdir(path)


def listdir(p: str | os.PathLike) -> list[str]:
    """Names (not paths) in folder ``p``, as ``os.listdir``; a missing folder raises
    ``FileNotFoundError``."""
    if not is_url(p):
        return os.listdir(local_path(p))
    fs, path = url_filesystem(os.fspath(p))
    if not fs.isdir(path):
        raise FileNotFoundError(f"{os.fspath(p)}: no such folder")
    return [os.path.basename(e.rstrip("/")) for e in fs.ls(path, detail=False)
            if e.rstrip("/") != path.rstrip("/")]


def makedirs(p: str | os.PathLike) -> None:
    """``os.makedirs(p, exist_ok=True)``; nothing for a URL (folders are key prefixes)."""
    if not is_url(p):
        os.makedirs(local_path(p), exist_ok=True)


def open_file(p: str | os.PathLike, mode: str = "r", encoding: str | None = None) -> IO[Any]:
    """``open(p, mode)`` for a local path or a URL.

    A URL is read whole into memory (files read back are records and exports, small next
    to memory) or written as one upload when the handle closes; appending to a URL is not
    supported (object stores cannot append).
    """
    if not is_url(p):
        return open(local_path(p), mode, encoding=encoding)
    url = os.fspath(p)
    if "a" in mode or "+" in mode:
        raise ValueError(f"{url}: object stores cannot append or update in place "
                         f"(mode {mode!r})")
    fs, path = url_filesystem(url)
    if "r" in mode:
        try:
            data = fs.cat_file(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{url}: no such file") from None
        return io.BytesIO(data) if "b" in mode else io.StringIO(
            data.decode(encoding or "utf-8"))
    f = fs.open(path, "wb")
    return f if "b" in mode else io.TextIOWrapper(f, encoding=encoding or "utf-8")


def remove(p: str | os.PathLike) -> None:
    """Deletes a file or a whole folder; a missing one is not an error."""
    if not is_url(p):
        q = local_path(p)
        if os.path.isdir(q):
            shutil.rmtree(q)
        elif os.path.lexists(q):
            os.unlink(q)
        return
    fs, path = url_filesystem(os.fspath(p))
    if fs.exists(path):
        fs.rm(path, recursive=True)


def move(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Renames file or folder ``src`` to ``dst`` (on an object store: copy, then delete,
    so not atomic; used only to set a stage's old results aside)."""
    if not is_url(src) and not is_url(dst):
        os.replace(local_path(src), local_path(dst))
        return
    if is_url(src) != is_url(dst):
        raise ValueError(f"cannot move {os.fspath(src)} to {os.fspath(dst)}: one is a URL "
                         "and the other a local path")
    fs, path = url_filesystem(os.fspath(src))
    _, to = url_filesystem(os.fspath(dst))
    if fs.isfile(path):
        fs.copy(path, to)
    else:  # each object under the prefix (fsspec's recursive mv differs between stores)
        for key in fs.find(path):
            fs.copy(key, to + key[len(path.rstrip("/")):])
    fs.rm(path, recursive=True)
