"""Metric logging: JSON lines + TensorBoard event files (no TensorFlow), and banners.

``MetricWriter(workdir)`` appends one JSON object per call to ``<workdir>/metrics.jsonl``
(``{"step": int, "split": "train"|..., "<name>": float, ...}``) and writes the same scalars
as TensorBoard summaries under ``<workdir>/tb/<split>/``. Only process 0 writes.
``read_jsonl`` reads the log back and ``metric_series`` turns it into curves per split.
A stage with several networks logs each network's training metrics as
``"<network>/<name>"`` (e.g. "segmenter/loss"; TensorBoard groups them by network);
``network_rows`` gives one network's view of a log.

A run folder on an object store (``gs://``, ``s3://``) cannot be appended to: the log and
the event files are kept in a local folder and uploaded whole at most every
``UPLOAD_SECONDS`` and when the writer closes.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import tempfile
import time
from typing import Iterable, Mapping

import numpy as np

from lungjax import fileio

METRICS_JSONL = "metrics.jsonl"  # a run directory's metric log (read by learning curves)
UPLOAD_SECONDS = 30.0  # a URL run folder's log is at most this much behind


def banner(title: str, width: int = 72) -> str:
    """Prints and returns a section banner for the log."""
    line = "=" * width
    text = f"{line}\n== {title}\n{line}"
    print(text, flush=True)
    return text


def _to_float(v) -> float:
    f = float(np.asarray(v))
    return f


class MetricWriter:
    """Scalars to ``metrics.jsonl`` and TensorBoard event files.

    Args:
      workdir: run directory.
      enabled: False on non-zero processes of a multi-host run.
      tensorboard: also write event files.
    """

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True,
                 tensorboard: bool = True):
        self.workdir = os.fspath(workdir)
        self.enabled = enabled
        self._tb = {}
        self._use_tb = tensorboard
        self._jsonl = None
        # Where the files are written: the run folder, or a local stand-in for a URL.
        self._local = self.workdir
        self._staged = fileio.is_url(self.workdir)
        self._uploaded = 0.0
        if enabled:
            if self._staged:
                self._local = tempfile.mkdtemp(prefix="lungjax-metrics-")
                # A run that fails past its training loop still uploads what it logged.
                atexit.register(self.close)
                remote = os.path.join(self.workdir, METRICS_JSONL)
                if fileio.isfile(remote):  # a resumed run appends to its log
                    with fileio.open_file(remote, "rb") as src, \
                            open(os.path.join(self._local, METRICS_JSONL), "wb") as dst:
                        dst.write(src.read())
            os.makedirs(self._local, exist_ok=True)
            self._jsonl = open(os.path.join(self._local, METRICS_JSONL), "a",
                               encoding="utf-8")

    def _tb_writer(self, split: str):
        if split not in self._tb:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self._tb[split] = EventFileWriter(os.path.join(self._local, "tb", split))
        return self._tb[split]

    def _upload(self, force: bool = False) -> None:
        """A URL run folder: the local log and event files uploaded over their copies."""
        if not self._staged or (not force and time.time() - self._uploaded < UPLOAD_SECONDS):
            return
        from lungjax.atomic import atomic_write_bytes

        for root, _, files in os.walk(self._local):
            for n in files:
                p = os.path.join(root, n)
                with open(p, "rb") as f:
                    atomic_write_bytes(os.path.join(
                        self.workdir, os.path.relpath(p, self._local)), f.read())
        self._uploaded = time.time()

    def write(self, step: int, scalars: Mapping[str, float], split: str = "train") -> None:
        """Writes scalars for ``step``; non-finite values are kept in JSON as strings."""
        if not self.enabled:
            return
        values = {k: _to_float(v) for k, v in scalars.items()}
        record = {"step": int(step), "split": split, "time": time.time()}
        for k, v in values.items():
            record[k] = v if math.isfinite(v) else repr(v)
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._use_tb:
            from tensorboard.compat.proto import event_pb2, summary_pb2

            summary = summary_pb2.Summary(value=[
                summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
            w = self._tb_writer(split)
            w.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
            w.flush()
        self._upload()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        for w in self._tb.values():
            w.close()
        self._tb = {}
        if self._staged and self.enabled:
            self._upload(force=True)
            shutil.rmtree(self._local, ignore_errors=True)
            self._staged = False
            atexit.unregister(self.close)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Reads a ``metrics.jsonl`` file; a torn last line (killed writer) is skipped."""
    out = []
    with fileio.open_file(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


_RECORD_KEYS = ("step", "split", "time")


def network_rows(rows: Iterable[Mapping], network: str) -> list[dict]:
    """One network's view of a log of several networks' metrics.

    Keys "<network>/<name>" become "<name>"; other networks' keys ("<other>/<name>")
    are dropped; unprefixed keys (record keys, held-out figures) are kept.
    """
    pre = network + "/"
    out = []
    for r in rows:
        out.append({(k[len(pre):] if k.startswith(pre) else k): v for k, v in r.items()
                    if k.startswith(pre) or "/" not in k})
    return out


def metric_series(rows: Iterable[Mapping]) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Records of ``read_jsonl`` as curves: ``{split: {metric: (steps, values)}}``.

    ``steps`` (T,) int64 ascending and ``values`` (T,) float64 (non-finite values, which
    ``MetricWriter`` writes as strings, come back as nan / inf). Of several records of one
    (split, step), the last written wins: a run resumed from an earlier checkpoint logs the
    steps after it again.
    A metric missing from some records has fewer points; non-numeric values are skipped.
    """
    latest: dict[tuple[str, int], Mapping] = {}
    for r in rows:
        if "step" in r and "split" in r:
            latest[(str(r["split"]), int(r["step"]))] = r
    points: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for (split, step), r in sorted(latest.items()):
        for k, v in r.items():
            if k in _RECORD_KEYS or isinstance(v, bool):
                continue
            try:
                f = float(v)
            except (TypeError, ValueError):
                continue
            points.setdefault(split, {}).setdefault(k, []).append((step, f))
    return {split: {k: (np.array([p[0] for p in pts], np.int64),
                        np.array([p[1] for p in pts], np.float64))
                    for k, pts in metrics.items()}
            for split, metrics in points.items()}
