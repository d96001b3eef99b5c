"""The preprocessed patch store: chunked, compressed zarr arrays read through
tensorstore, plus one ``manifest.json`` per dataset.

Layout under the store root (a local folder or a bucket URL)::

    manifest.json               dataset settings + one record per finished scan
    scans/<uid>/image/          zarr uint8 (z, y, x): HU window scaled to 0..255
    scans/<uid>/lung/           zarr uint8 0/1 lung mask
    scans/<uid>/nodules/        zarr uint8 nodule instance labels (0 = background)

``manifest.json`` holds ``format``/``version``, the preprocessing settings
(``spacing_zyx`` (null = native grid), ``hu_window``, ``margin_mm``, ``closing_mm``,
``chunk``, ``use_lung_masks``), ``source_root``, ``scans`` (uid -> :class:`ScanRecord`
JSON: fold, shape, stored-grid geometry, nodules / excluded findings / candidates in
voxel and world coordinates, per nodule its median reader malignancy (null = the source
has none) and its label in the ``nodules`` array, where the nodule mask came from
(``nodule_mask_source``: "consensus" = the dataset's own masks, "sphere" = balls of the
annotated diameters, "disc" = axial discs of the annotated diameter on the slices the
nodule spans), and the transforms: source and resampled geometry, crop box) and
``skipped`` (uid -> reason, from the last run).

Version 2 added the nodule mask of every scan (a sphere where the dataset has no
consensus mask) and the per-nodule malignancy and mask labels; a version-1 store is
prepared again rather than read.

A scan is finished only when its record is in the manifest; the manifest is
rewritten atomically after each scan, so a reader never sees a record whose arrays
are incomplete. Chunks are 32^3 by default so one 96^3 patch reads about 64 chunks
(~2 MB decompressed) instead of the whole volume.

Coordinates: voxel (z, y, x) of the stored arrays maps to world (x, y, z) mm through
``ScanRecord.geometry`` (see :mod:`lungjax.data.coords`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterable, Sequence

import numpy as np
import tensorstore as ts

from lungjax import fileio
from lungjax.atomic import atomic_write_text
from lungjax.data.coords import Geometry, voxel_to_world
from lungjax.data.preprocess import uint8_to_unit
from lungjax.data.tables import Findings

MANIFEST = "manifest.json"
STORE_FORMAT = "lungjax-patch-store"
STORE_VERSION = 2
NODULE_MASK_SOURCES = ("consensus", "sphere", "disc", "none")
MALIGNANCY_RANGE = (1.0, 5.0)  # LIDC reader scores; medians of 2 or 4 readers can be x.5
ARRAYS = ("image", "lung", "nodules")
DEFAULT_CHUNK = 32
_UID_RE = re.compile(r"^[A-Za-z0-9._-]+$")


class StoreError(ValueError):
    """The store or its manifest is missing or malformed; the message names it."""


class StoreVersionError(StoreError):
    """The manifest is a lungjax store of another version (prepare it again)."""


# ---------------------------------------------------------------------------
# Addressing: local path or URL -> tensorstore kvstore spec.
# ---------------------------------------------------------------------------

def kvstore_spec(path_or_url: str | os.PathLike, subpath: str = "") -> dict:
    """Tensorstore kvstore spec for a store root plus a sub-path.

    Args:
      path_or_url: a local folder, ``file:///abs/dir``, ``gs://bucket/dir`` or
        ``s3://bucket/dir``.
      subpath: key prefix under the root ("" or ending with "/" for folders).

    Returns:
      A JSON kvstore spec.
    """
    url = os.fspath(path_or_url)
    match = re.match(r"^([a-z0-9]+)://(.*)$", url)
    if match is None:
        base = os.path.abspath(url).rstrip("/") + "/"
        return {"driver": "file", "path": base + subpath}
    scheme, rest = match.groups()
    if scheme == "file":
        return {"driver": "file", "path": "/" + rest.lstrip("/").rstrip("/") + "/" + subpath}
    if scheme in ("gs", "s3"):
        bucket, _, prefix = rest.partition("/")
        prefix = prefix.strip("/")
        path = (prefix + "/" if prefix else "") + subpath
        spec = {"driver": "gcs" if scheme == "gs" else "s3", "bucket": bucket, "path": path}
        if scheme == "s3":
            # An S3-compatible server (MinIO, Ceph, a test double), named the way the AWS
            # tools name it, goes into the spec: without it tensorstore asks AWS for the
            # bucket's region and waits.
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            if endpoint:
                spec["endpoint"] = endpoint
            if region:
                spec["aws_region"] = region
        return spec
    raise StoreError(f"{url}: unsupported store URL scheme {scheme!r} "
                     "(use a local path, file://, gs://, s3:// or memory://)")


def check_uid(uid: str) -> str:
    if not _UID_RE.match(uid):
        raise StoreError(f"scan uid {uid!r} has characters not allowed in a store key")
    return uid


def read_manifest(path_or_url, context: ts.Context | None = None) -> dict | None:
    """The store's manifest as a dict, or None if the store has none yet."""
    if not fileio.is_url(path_or_url):
        p = os.path.join(fileio.local_path(path_or_url), MANIFEST)
        if not os.path.isfile(p):
            return None
        with open(p, encoding="utf-8") as f:
            text = f.read()
        where = p
    else:
        kv = ts.KvStore.open(kvstore_spec(path_or_url), context=context).result()
        got = kv.read(MANIFEST).result()
        if got.state != "value":
            return None
        text, where = got.value.decode(), f"{path_or_url}/{MANIFEST}"
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise StoreError(f"{where}: not valid JSON: {e}")
    if manifest.get("format") != STORE_FORMAT:
        raise StoreError(f"{where}: not a {STORE_FORMAT} manifest (format = "
                         f"{manifest.get('format')!r})")
    if manifest.get("version") != STORE_VERSION:
        raise StoreVersionError(f"{where}: store version {manifest.get('version')} is not the "
                         f"supported {STORE_VERSION}; prepare the store again")
    return manifest


def write_manifest(path_or_url, manifest: dict) -> None:
    """Writes the manifest atomically (temp + rename locally; object stores replace
    an object atomically)."""
    text = json.dumps(manifest, indent=1, sort_keys=True)
    if not fileio.is_url(path_or_url):
        atomic_write_text(os.path.join(fileio.local_path(path_or_url), MANIFEST), text)
    else:
        kv = ts.KvStore.open(kvstore_spec(path_or_url)).result()
        kv.write(MANIFEST, text.encode()).result()


def scan_arrays_present(path_or_url, uid: str, arrays: Iterable[str]) -> bool:
    """Whether the zarr metadata of every named array of a scan exists (local stores
    only; for bucket URLs the manifest record is trusted and this returns True)."""
    if fileio.is_url(path_or_url):
        return True
    base = os.path.join(fileio.local_path(path_or_url), "scans", check_uid(uid))
    return all(os.path.isfile(os.path.join(base, name, ".zarray")) for name in arrays)


def _array_spec(path_or_url, uid: str, name: str) -> dict:
    return {"driver": "zarr", "kvstore": kvstore_spec(path_or_url, f"scans/{check_uid(uid)}/{name}/")}


def write_scan_arrays(path_or_url, uid: str, arrays: dict[str, np.ndarray],
                      chunk: int = DEFAULT_CHUNK, clevel: int = 3) -> None:
    """Writes (replacing) the uint8 (z, y, x) arrays of one scan as blosc-zstd zarr.

    Args:
      path_or_url: store root.
      uid: scan uid.
      arrays: name -> (z, y, x) uint8 array, names from ``ARRAYS``.
      chunk: chunk edge in voxels.
      clevel: zstd level.
    """
    delete_scan_arrays(path_or_url, uid)
    futures = []
    for name, array in arrays.items():
        if name not in ARRAYS:
            raise StoreError(f"unknown array name {name!r}; expected one of {ARRAYS}")
        array = np.ascontiguousarray(array, dtype=np.uint8)
        spec = _array_spec(path_or_url, uid, name)
        spec["metadata"] = {
            "dtype": "|u1", "shape": list(array.shape),
            "chunks": [min(chunk, s) for s in array.shape],
            "compressor": {"id": "blosc", "cname": "zstd", "clevel": clevel, "shuffle": 2},
            "fill_value": 0,
        }
        arr = ts.open(spec, create=True, delete_existing=True).result()
        futures.append(arr.write(array))
    for f in futures:
        f.result()


def delete_scan_arrays(path_or_url, uid: str) -> None:
    """Removes everything stored under ``scans/<uid>/`` (e.g. from an interrupted run)."""
    kv = ts.KvStore.open(kvstore_spec(path_or_url, f"scans/{check_uid(uid)}/")).result()
    kv.delete_range(ts.KvStore.KeyRange()).result()


# ---------------------------------------------------------------------------
# Records.
# ---------------------------------------------------------------------------

def check_malignancy(values, uid: str) -> np.ndarray:
    """(N,) float64 malignancy scores, NaN = missing; anything else outside 1..5 raises
    a one-line ``StoreError`` naming the scan."""
    m = np.asarray(values, np.float64).reshape(-1)
    lo, hi = MALIGNANCY_RANGE
    bad = ~np.isnan(m) & ~((m >= lo) & (m <= hi))
    if bad.any():
        raise StoreError(f"scan {uid}: malignancy {m[bad].tolist()} outside {lo:g}-{hi:g} "
                         "(median LIDC reader score)")
    return m


def _points(values, n_cols: int = 3) -> np.ndarray:
    return np.asarray(values if values is not None else [], np.float64).reshape(-1, n_cols)


@dataclasses.dataclass(frozen=True)
class ScanRecord:
    """One preprocessed scan as recorded in the manifest.

    Voxel coordinates are (z, y, x) floats in the STORED grid (integer = voxel centre);
    world coordinates are (x, y, z) mm; ``voxel_to_world(v, rec.geometry)`` is exact.

    Attributes:
      uid: series instance UID.
      fold: LUNA16 subset number (0..9).
      shape_zyx: stored array shape.
      geometry: grid of the stored arrays.
      arrays: names of the stored arrays ("image", "lung", and "nodules" if present).
      nodules_zyx / nodules_world / nodule_diameter_mm: (N, 3), (N, 3), (N,) annotated
        nodules whose centre lies inside the stored volume.
      dropped_world / dropped_diameter_mm: (D, 3), (D,) annotated nodules whose centre
        lies outside the stored volume (kept for evaluation, not for training).
      excluded_zyx / excluded_world / excluded_diameter_mm: LUNA16 excluded findings
        (diameter -1 = unknown), all of them, inside the volume or not.
      candidates_zyx / candidates_world / candidates_label: (K, 3), (K, 3), (K,) int
        candidates inside the stored volume.
      nodule_malignancy: (N,) float64 median reader malignancy (1..5, in half steps
        where the readers split evenly) of each nodule of ``nodules_zyx``; NaN = the
        source has no score (LUNA16's annotations.csv).
      nodule_mask_label: (N,) int64 value of each nodule in the "nodules" array
        (0 = not in the mask).
      nodule_mask_source: "consensus" (the dataset's masks), "sphere" (balls of the
        annotated diameters), "disc" (axial discs of the annotated diameter on every
        slice the nodule spans) or "none" (no "nodules" array).
      transforms: JSON record of resampling and cropping (see
        :meth:`lungjax.data.preprocess.Preprocessed.transforms`).
      source: path of the scan that was read.
      warnings: messages about this scan (e.g. dropped nodules).
    """

    uid: str
    fold: int
    shape_zyx: tuple[int, int, int]
    geometry: Geometry
    arrays: tuple[str, ...]
    nodules_zyx: np.ndarray
    nodules_world: np.ndarray
    nodule_diameter_mm: np.ndarray
    dropped_world: np.ndarray
    dropped_diameter_mm: np.ndarray
    excluded_zyx: np.ndarray
    excluded_world: np.ndarray
    excluded_diameter_mm: np.ndarray
    candidates_zyx: np.ndarray
    candidates_world: np.ndarray
    candidates_label: np.ndarray
    transforms: dict
    source: str = ""
    warnings: tuple[str, ...] = ()
    nodule_malignancy: np.ndarray | None = None
    nodule_mask_label: np.ndarray | None = None
    nodule_mask_source: str = "none"

    def __post_init__(self):
        n = len(np.asarray(self.nodule_diameter_mm).reshape(-1))
        mal = np.full(n, np.nan) if self.nodule_malignancy is None else \
            np.asarray(self.nodule_malignancy, np.float64).reshape(-1)
        lab = np.zeros(n, np.int64) if self.nodule_mask_label is None else \
            np.asarray(self.nodule_mask_label, np.int64).reshape(-1)
        if len(mal) != n or len(lab) != n:
            raise StoreError(f"scan {self.uid}: {n} nodules but {len(mal)} malignancy scores "
                             f"and {len(lab)} mask labels")
        check_malignancy(mal, self.uid)
        if self.nodule_mask_source not in NODULE_MASK_SOURCES:
            raise StoreError(f"scan {self.uid}: nodule_mask_source "
                             f"{self.nodule_mask_source!r} not in {NODULE_MASK_SOURCES}")
        object.__setattr__(self, "nodule_malignancy", mal)
        object.__setattr__(self, "nodule_mask_label", lab)

    @property
    def spacing_zyx(self) -> np.ndarray:
        return self.geometry.spacing_zyx

    @property
    def crop_start_zyx(self) -> tuple[int, ...]:
        return tuple(self.transforms.get("crop_start_zyx", (0, 0, 0)))

    def findings(self, include_dropped: bool = True) -> Findings:
        """Annotated nodules in world mm, for evaluation. By default includes nodules
        outside the stored volume: the reference standard does not shrink with the crop."""
        xyz, d = self.nodules_world, self.nodule_diameter_mm
        if include_dropped and len(self.dropped_world):
            xyz = np.concatenate([xyz, self.dropped_world])
            d = np.concatenate([d, self.dropped_diameter_mm])
        return Findings(np.full(len(d), self.uid), xyz, d)

    def excluded_findings(self) -> Findings:
        """LUNA16 excluded findings (world mm), for evaluation."""
        return Findings(np.full(len(self.excluded_diameter_mm), self.uid), self.excluded_world,
                        self.excluded_diameter_mm)

    def to_json(self) -> dict:
        return {
            "uid": self.uid, "fold": int(self.fold), "shape_zyx": list(self.shape_zyx),
            "geometry": self.geometry.to_json(), "arrays": list(self.arrays),
            "nodules_zyx": self.nodules_zyx.tolist(), "nodules_world": self.nodules_world.tolist(),
            "nodule_diameter_mm": self.nodule_diameter_mm.tolist(),
            "dropped_world": self.dropped_world.tolist(),
            "dropped_diameter_mm": self.dropped_diameter_mm.tolist(),
            "excluded_zyx": self.excluded_zyx.tolist(),
            "excluded_world": self.excluded_world.tolist(),
            "excluded_diameter_mm": self.excluded_diameter_mm.tolist(),
            # World positions of candidates are derived from voxels on load (exact up to
            # float rounding): the real table has ~750k rows, which would double the manifest.
            "candidates_zyx": self.candidates_zyx.tolist(),
            "candidates_label": self.candidates_label.tolist(),
            "transforms": self.transforms, "source": self.source,
            "warnings": list(self.warnings),
            # JSON has no NaN: a missing score is null.
            "nodule_malignancy": [None if np.isnan(m) else float(m)
                                  for m in self.nodule_malignancy],
            "nodule_mask_label": self.nodule_mask_label.tolist(),
            "nodule_mask_source": self.nodule_mask_source,
        }

    @classmethod
    def from_json(cls, d: dict) -> "ScanRecord":
        try:
            return cls(
                uid=d["uid"], fold=int(d["fold"]), shape_zyx=tuple(int(s) for s in d["shape_zyx"]),
                geometry=Geometry.from_json(d["geometry"]), arrays=tuple(d["arrays"]),
                nodules_zyx=_points(d.get("nodules_zyx")),
                nodules_world=_points(d.get("nodules_world")),
                nodule_diameter_mm=np.asarray(d.get("nodule_diameter_mm", []), np.float64),
                dropped_world=_points(d.get("dropped_world")),
                dropped_diameter_mm=np.asarray(d.get("dropped_diameter_mm", []), np.float64),
                excluded_zyx=_points(d.get("excluded_zyx")),
                excluded_world=_points(d.get("excluded_world")),
                excluded_diameter_mm=np.asarray(d.get("excluded_diameter_mm", []), np.float64),
                candidates_zyx=_points(d.get("candidates_zyx")),
                candidates_world=voxel_to_world(_points(d.get("candidates_zyx")),
                                                Geometry.from_json(d["geometry"])),
                candidates_label=np.asarray(d.get("candidates_label", []), np.int64),
                transforms=dict(d.get("transforms", {})), source=d.get("source", ""),
                warnings=tuple(d.get("warnings", ())),
                nodule_malignancy=None if d.get("nodule_malignancy") is None else np.asarray(
                    [np.nan if m is None else m for m in d["nodule_malignancy"]], np.float64),
                nodule_mask_label=d.get("nodule_mask_label"),
                nodule_mask_source=d.get("nodule_mask_source", "none"),
            )
        except StoreError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"manifest record for {d.get('uid', '?')!r} is malformed: {e!r}")


# ---------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------

class PatchStore:
    """Read access to a prepared store.

    Tensorstore handles are opened lazily and re-opened in a new process (after a
    fork or when unpickled in a data-loader worker), so a ``PatchStore`` can be handed
    to Grain workers.
    """

    def __init__(self, path_or_url: str, manifest: dict, cache_bytes: int = 256 << 20):
        self.path = os.fspath(path_or_url)
        self.manifest = manifest
        self.cache_bytes = int(cache_bytes)
        try:
            records = [ScanRecord.from_json(r) for r in manifest.get("scans", {}).values()]
        except StoreError as e:
            raise StoreError(f"{self.path}/{MANIFEST}: {e}")
        self.scans: list[ScanRecord] = sorted(records, key=lambda r: (r.fold, r.uid))
        self._by_uid = {r.uid: r for r in self.scans}
        self._reset_handles()

    @classmethod
    def open(cls, path_or_url: str | os.PathLike, cache_bytes: int = 256 << 20) -> "PatchStore":
        """Opens a prepared store.

        Args:
          path_or_url: local folder or URL (file://, gs://, s3://).
          cache_bytes: tensorstore chunk cache size shared by this store's arrays.

        Raises:
          StoreError: no manifest (not prepared) or a malformed one.
        """
        manifest = read_manifest(path_or_url)
        if manifest is None:
            raise StoreError(f"{os.fspath(path_or_url)}: no {MANIFEST}; not a prepared store "
                             "(run data_prep/prepare_luna16.py)")
        return cls(os.fspath(path_or_url), manifest, cache_bytes)

    def _reset_handles(self) -> None:
        self._pid = os.getpid()
        self._context = None
        self._handles: dict[tuple[str, str], Any] = {}

    def __getstate__(self):
        return {"path": self.path, "manifest": self.manifest, "cache_bytes": self.cache_bytes}

    def __setstate__(self, state):
        self.__init__(state["path"], state["manifest"], state["cache_bytes"])

    def __len__(self) -> int:
        return len(self.scans)

    def __repr__(self) -> str:
        return f"PatchStore({self.path!r}, {len(self.scans)} scans, spacing_zyx={self.spacing_zyx})"

    # -- dataset-level settings ------------------------------------------------
    @property
    def spacing_zyx(self) -> tuple[float, float, float] | None:
        """Target voxel size (z, y, x) mm, or None if scans kept their native grid."""
        s = self.manifest.get("spacing_zyx")
        return None if s is None else tuple(float(v) for v in s)

    @property
    def hu_window(self) -> tuple[float, float]:
        return tuple(float(v) for v in self.manifest["hu_window"])

    def scan(self, uid: str) -> ScanRecord:
        try:
            return self._by_uid[uid]
        except KeyError:
            raise KeyError(f"{self.path}: no scan {uid!r} in the store") from None

    def uids(self, folds: Iterable[int] | None = None) -> list[str]:
        """UIDs of the stored scans (sorted by fold then uid), optionally of some folds."""
        if folds is None:
            return [r.uid for r in self.scans]
        folds = {int(f) for f in folds}
        return [r.uid for r in self.scans if r.fold in folds]

    def findings(self, uids: Sequence[str] | None = None) -> Findings:
        """Annotated nodules (world mm) of the given scans (all by default)."""
        parts = [self.scan(u).findings() for u in (uids if uids is not None else self.uids())]
        if not parts:
            return Findings.empty()
        return Findings(np.concatenate([p.uid for p in parts]),
                        np.concatenate([p.xyz for p in parts]),
                        np.concatenate([p.diameter_mm for p in parts]))

    def excluded(self, uids: Sequence[str] | None = None) -> Findings:
        """LUNA16 excluded findings (world mm) of the given scans (all by default)."""
        parts = [self.scan(u).excluded_findings()
                 for u in (uids if uids is not None else self.uids())]
        if not parts:
            return Findings.empty()
        return Findings(np.concatenate([p.uid for p in parts]),
                        np.concatenate([p.xyz for p in parts]),
                        np.concatenate([p.diameter_mm for p in parts]))

    # -- arrays ---------------------------------------------------------------
    def _array(self, uid: str, array: str):
        if os.getpid() != self._pid:  # forked: tensorstore state is not fork-safe
            self._reset_handles()
        key = (uid, array)
        handle = self._handles.get(key)
        if handle is None:
            rec = self.scan(uid)
            if array not in rec.arrays:
                raise KeyError(f"{self.path}: scan {uid} has no array {array!r} "
                               f"(has {list(rec.arrays)})")
            if self._context is None:
                self._context = ts.Context({"cache_pool": {"total_bytes_limit": self.cache_bytes}})
            handle = ts.open(_array_spec(self.path, uid, array), read=True,
                             context=self._context).result()
            if tuple(handle.shape) != rec.shape_zyx:
                raise StoreError(f"{self.path}: scan {uid} array {array!r} has shape "
                                 f"{tuple(handle.shape)}, manifest says {rec.shape_zyx}")
            self._handles[key] = handle
        return handle

    @staticmethod
    def _convert(values: np.ndarray, array: str) -> np.ndarray:
        return uint8_to_unit(values) if array == "image" else values.astype(np.float32)

    def read_patch(self, uid: str, center_zyx: Sequence[int], size_zyx: Sequence[int],
                   array: str = "image") -> np.ndarray:
        """Reads a box of one stored array, reading only the chunks it overlaps.

        Args:
          uid: scan uid.
          center_zyx: integer voxel (z, y, x) in the stored grid; the box starts at
            ``center - size // 2``.
          size_zyx: box size (z, y, x).
          array: "image" (returned in [0, 1]), "lung" (0/1) or "nodules" (labels).

        Returns:
          (size_zyx) float32; voxels outside the volume are 0.
        """
        size = np.asarray(size_zyx, np.int64).reshape(3)
        if np.any(size <= 0):
            raise ValueError(f"patch size must be positive, got {size.tolist()}")
        center = np.asarray(center_zyx)
        if not np.issubdtype(center.dtype, np.integer):
            rounded = np.rint(center)
            if not np.allclose(center, rounded):
                raise ValueError(f"center_zyx must be integer voxels, got {center.tolist()}")
            center = rounded
        start = center.astype(np.int64).reshape(3) - size // 2
        stop = start + size
        shape = np.asarray(self.scan(uid).shape_zyx)
        lo = np.clip(start, 0, shape)
        hi = np.clip(stop, 0, shape)
        out = np.zeros(tuple(size), np.float32)
        if np.any(hi <= lo):
            return out
        handle = self._array(uid, array)
        values = handle[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].read().result()
        a, b = lo - start, hi - start
        out[a[0]:b[0], a[1]:b[1], a[2]:b[2]] = self._convert(values, array)
        return out

    def read_volume(self, uid: str, array: str = "image") -> np.ndarray:
        """The whole stored array as (z, y, x) float32 (image in [0, 1])."""
        return self._convert(self._array(uid, array).read().result(), array)
