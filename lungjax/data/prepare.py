"""Preparing a LUNA16-layout folder into a patch store (the body of
``data_prep/prepare_luna16.py``).

One job per scan: read -> :func:`lungjax.data.preprocess.preprocess_scan` -> write the
zarr arrays -> return the manifest record. Jobs run in ``workers`` spawned processes;
only the parent writes the manifest, so records never race. A bad scan is skipped
with its reason and the run goes on. Re-running skips scans already recorded in the
manifest (a record is written only after its arrays are complete, and the manifest is
rewritten atomically after every scan), so a preparation killed at any point resumes
where it stopped: at most the scan in flight is done again. A store of an older format version is
prepared again from scratch.

Dense targets: every scan gets a nodule mask. With ``nodule_mask="consensus"`` it is
the dataset's own ``nodule-masks/<uid>.mhd`` where present (the generated data's LIDC
consensus masks); otherwise, or with ``nodule_mask="sphere"``, each annotated nodule is a
ball of its annotated diameter at its annotated centre; ``nodule_mask="disc"`` draws an
axial disc of the annotated diameter on every slice the nodule spans (Shrey et al. 2020). Per nodule the record keeps the
median reader malignancy from the dataset's ``malignancy.csv`` (the generated data) and
NaN where the dataset has none (LUNA16's annotations.csv has no malignancy). Labels that
cannot be right stop the run with a one-line error naming the scan: a malignancy outside
1-5, a nodule mask whose shape, spacing, origin or direction differ from its scan's.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import time
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from tqdm.auto import tqdm

from lungjax.data import store as store_lib
from lungjax.data.coords import inside_grid, world_to_voxel
from lungjax.data.io import ScanReadError, read_scan
from lungjax.data.luna16 import Luna16Dataset
from lungjax.data.preprocess import (DEFAULT_HU_WINDOW, LungMaskError, preprocess_scan,
                                     disc_labels, resample_to, sphere_labels)

NODULE_MASK_MODES = ("consensus", "sphere", "disc")
_MATCH_MM = 1e-3  # malignancy.csv and annotations.csv carry the same 6-decimal centres


@dataclasses.dataclass
class PrepareReport:
    """What a preparation run did.

    Attributes:
      out: the store.
      done: UIDs prepared by this run.
      reused: UIDs already in the store (skipped as finished).
      skipped: UID -> reason for scans that could not be prepared.
      dropped_nodules: annotated nodules outside their stored volume, over the scans
        prepared or reused (not in training records; still in
        ``ScanRecord.findings()`` for evaluation).
      warnings: per-scan warnings (dropped nodules etc.).
      problems: dataset-level inconsistencies (e.g. annotation UIDs with no scan).
    """

    out: str
    done: list[str] = dataclasses.field(default_factory=list)
    reused: list[str] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    dropped_nodules: int = 0
    warnings: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def n_ready(self) -> int:
        """Scans usable from the store after this run."""
        return len(self.done) + len(self.reused)

    def summary(self) -> str:
        lines = [f"store {self.out}: {len(self.done)} scan(s) prepared, {len(self.reused)} "
                 f"already done, {len(self.skipped)} skipped, {self.dropped_nodules} nodule(s) "
                 "outside their volume"]
        lines += [f"  skipped {uid}: {reason}" for uid, reason in sorted(self.skipped.items())]
        lines += [f"  warning: {w}" for w in self.warnings]
        lines += [f"  dataset problem: {p}" for p in self.problems]
        return "\n".join(lines)


def _settings(spacing_zyx, hu_window, margin_mm, chunk, closing_mm, use_lung_masks,
              nodule_mask) -> dict:
    return {
        "spacing_zyx": None if spacing_zyx is None else [float(v) for v in spacing_zyx],
        "hu_window": [float(v) for v in hu_window],
        "margin_mm": float(margin_mm), "chunk": int(chunk), "closing_mm": float(closing_mm),
        "use_lung_masks": bool(use_lung_masks), "nodule_mask": str(nodule_mask),
    }


class LabelError(ValueError):
    """A scan's labels are inconsistent with it; one line naming the scan."""


def _check_same_grid(uid: str, path: str, labels, scan) -> None:
    """Raises ``LabelError`` unless a label volume lies on exactly the scan's grid: a
    consensus mask resampled from another grid would no longer be the readers' mask."""
    lg, sg = labels.geometry, scan.geometry
    problems = []
    if tuple(labels.array.shape) != tuple(scan.array.shape):
        problems.append(f"shape {tuple(labels.array.shape)} vs {tuple(scan.array.shape)}")
    if not np.allclose(lg.spacing, sg.spacing, atol=1e-4):
        problems.append(f"spacing {np.round(lg.spacing, 4).tolist()} vs "
                        f"{np.round(sg.spacing, 4).tolist()}")
    if not np.allclose(lg.origin, sg.origin, atol=1e-3):
        problems.append(f"origin {np.round(lg.origin, 3).tolist()} vs "
                        f"{np.round(sg.origin, 3).tolist()}")
    if not np.allclose(lg.direction, sg.direction, atol=1e-5):
        problems.append("direction differs")
    if problems:
        raise LabelError(f"scan {uid}: nodule mask {path} does not match its scan: "
                         + "; ".join(problems) + " (mask vs scan)")


def nodule_labels_table(root: str | os.PathLike) -> dict[str, tuple[np.ndarray, ...]] | None:
    """Per-nodule labels of a dataset, from its ``malignancy.csv`` (the generated data
    writes one; LUNA16 has none).

    Returns:
      uid -> (xyz (n, 3) float64 world mm, malignancy (n,) float64, mask_label (n,)
      int64), or None when the dataset has no such table.
    """
    path = os.path.join(os.fspath(root), "malignancy.csv")
    if not os.path.isfile(path):
        return None
    from lungjax.data.synthetic import read_malignancy_csv

    cols = read_malignancy_csv(path)
    if not cols:
        return {}
    xyz = np.stack([cols["coordX"], cols["coordY"], cols["coordZ"]], axis=-1)
    label = cols.get("mask_label", np.zeros(len(xyz), np.int64))
    return {uid: (xyz[rows], cols["malignancy"][rows], label[rows])
            for uid, rows in _rows_by_uid(cols["seriesuid"]).items()}


def match_nodule_labels(uid: str, nodules_xyz: np.ndarray, table) -> tuple[np.ndarray, np.ndarray]:
    """Malignancy and mask label of each annotated nodule of a scan.

    Args:
      uid: the scan.
      nodules_xyz: (N, 3) world centres from annotations.csv.
      table: :func:`nodule_labels_table` output, or None.

    Returns:
      (malignancy (N,) float64, NaN = no score; mask_label (N,) int64, 0 = unknown),
      matched on the world centre.
    """
    n = len(nodules_xyz)
    mal, lab = np.full(n, np.nan), np.zeros(n, np.int64)
    if table is None or uid not in table or not n:
        return mal, lab
    xyz, t_mal, t_lab = table[uid]
    j, hit = match_centres(nodules_xyz, xyz)
    mal[hit], lab[hit] = t_mal[j[hit]], t_lab[j[hit]]
    return mal, lab


def match_centres(xyz: np.ndarray, table_xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each of ``xyz`` (N, 3) world mm matched to its row of ``table_xyz`` (M, 3), the
    same centre written to 6 decimals in two tables: (row (N,) int64, hit (N,) bool, the
    row within 1e-3 mm on every axis); M = 0 gives no hit."""
    xyz = np.asarray(xyz, np.float64).reshape(-1, 3)
    table_xyz = np.asarray(table_xyz, np.float64).reshape(-1, 3)
    if not len(table_xyz) or not len(xyz):
        return np.zeros(len(xyz), np.int64), np.zeros(len(xyz), bool)
    d = np.abs(xyz[:, None, :] - table_xyz[None]).max(-1)
    j = np.argmin(d, axis=1)
    return j, d[np.arange(len(xyz)), j] <= _MATCH_MM


def _read_on_grid(path: str, scan, what: str) -> np.ndarray:
    """Reads a label volume and brings it onto the scan's grid if it is not already."""
    labels = read_scan(path)
    same = (labels.array.shape == scan.array.shape
            and np.allclose(labels.geometry.spacing, scan.geometry.spacing, atol=1e-4)
            and np.allclose(labels.geometry.origin, scan.geometry.origin, atol=1e-3)
            and np.allclose(labels.geometry.direction, scan.geometry.direction, atol=1e-5))
    if same:
        return labels.array
    return resample_to(labels.array, labels.geometry, scan.geometry, scan.array.shape,
                       nearest=True)


def prepare_scan(job: dict) -> tuple[str, str, dict | str]:
    """Prepares one scan (run in a worker).

    Args:
      job: dict with uid, fold, scan_path, lung_path, nodule_path, nodules_xyz,
        nodules_d, excluded_xyz, excluded_d, candidates_xyz, candidates_label,
        settings, out.

    Returns:
      ("done", uid, record_json), ("skipped", uid, reason) or ("error", uid, message)
      for labels that cannot be right (the run stops on those).
    """
    uid, s = job["uid"], job["settings"]
    try:
        scan = read_scan(job["scan_path"])
        lung_seg = None
        if s["use_lung_masks"] and job["lung_path"]:
            lung_seg = _read_on_grid(job["lung_path"], scan, "lung mask")
        nodule_labels = None
        if s["nodule_mask"] == "consensus" and job["nodule_path"]:
            labels = read_scan(job["nodule_path"])
            _check_same_grid(uid, job["nodule_path"], labels, scan)
            nodule_labels = labels.array
            del labels
        pre = preprocess_scan(scan.array, scan.geometry, spacing_zyx=s["spacing_zyx"],
                              hu_window=s["hu_window"], margin_mm=s["margin_mm"],
                              lung_seg=lung_seg, nodule_labels=nodule_labels,
                              closing_mm=s["closing_mm"], name=job["scan_path"])
        del scan, lung_seg, nodule_labels
    except LabelError as e:
        return "error", uid, str(e)
    except (ScanReadError, LungMaskError, ValueError, RuntimeError, OSError) as e:
        return "skipped", uid, f"{type(e).__name__}: {e}"

    shape = pre.image.shape
    warnings = []
    nod_xyz, nod_d = job["nodules_xyz"], job["nodules_d"]
    nod_zyx = world_to_voxel(nod_xyz, pre.geometry)
    inside = inside_grid(nod_zyx, shape)
    in_scan = inside_grid(world_to_voxel(nod_xyz, pre.source_geometry), pre.source_shape_zyx)
    for xyz, d, scanned in zip(nod_xyz[~inside], nod_d[~inside], in_scan[~inside]):
        where = "the lung crop" if scanned else "the scanned volume"
        warnings.append(f"{uid}: nodule at world (x, y, z) = "
                        f"({xyz[0]:.1f}, {xyz[1]:.1f}, {xyz[2]:.1f}) mm, {d:.1f} mm lies outside "
                        f"{where}; dropped from training records")
    exc_zyx = world_to_voxel(job["excluded_xyz"], pre.geometry)
    cand_zyx = world_to_voxel(job["candidates_xyz"], pre.geometry)
    cand_in = inside_grid(cand_zyx, shape)

    # Nodule mask: the dataset's consensus labels, else balls of the annotated diameters
    # drawn on the stored grid (every annotated nodule, also those whose centre was
    # cropped away: part of the ball may still lie inside).
    if pre.nodules is not None:
        nodules, mask_source = pre.nodules, "consensus"
        mask_label = np.asarray(job["mask_labels"], np.int64)
        # A nodule the table does not name takes the label under its centre.
        c = np.clip(np.rint(nod_zyx).astype(np.int64), 0, np.asarray(shape) - 1)
        under = nodules[c[:, 0], c[:, 1], c[:, 2]].astype(np.int64) if len(c) else \
            np.zeros(0, np.int64)
        mask_label = np.where(mask_label > 0, mask_label, under)
    else:
        if len(nod_d) > 255:
            return "error", uid, f"scan {uid}: {len(nod_d)} nodules do not fit a uint8 mask"
        mask_label = np.arange(1, len(nod_d) + 1, dtype=np.int64)
        mask_source = "disc" if s["nodule_mask"] == "disc" else "sphere"
        draw = disc_labels if mask_source == "disc" else sphere_labels
        nodules = draw(shape, pre.geometry.spacing_zyx, nod_zyx, nod_d, mask_label)
    arrays = {"image": pre.image, "lung": pre.lung, "nodules": nodules}
    try:
        store_lib.write_scan_arrays(job["out"], uid, arrays, chunk=s["chunk"])
    except (ValueError, RuntimeError, OSError) as e:
        return "skipped", uid, f"cannot write arrays: {type(e).__name__}: {e}"
    record = store_lib.ScanRecord(
        uid=uid, fold=job["fold"], shape_zyx=tuple(int(v) for v in shape), geometry=pre.geometry,
        arrays=tuple(arrays),
        nodules_zyx=nod_zyx[inside], nodules_world=nod_xyz[inside], nodule_diameter_mm=nod_d[inside],
        dropped_world=nod_xyz[~inside], dropped_diameter_mm=nod_d[~inside],
        excluded_zyx=exc_zyx, excluded_world=job["excluded_xyz"],
        excluded_diameter_mm=job["excluded_d"],
        candidates_zyx=cand_zyx[cand_in], candidates_world=job["candidates_xyz"][cand_in],
        candidates_label=job["candidates_label"][cand_in],
        transforms=pre.transforms(), source=job["scan_path"], warnings=tuple(warnings),
        nodule_malignancy=np.asarray(job["malignancy"], np.float64)[inside],
        nodule_mask_label=mask_label[inside], nodule_mask_source=mask_source)
    return "done", uid, record.to_json()


def _rows_by_uid(uids: np.ndarray) -> dict[str, np.ndarray]:
    """UID -> (n,) int64 row indices, in table order."""
    if len(uids) == 0:
        return {}
    unique, inverse = np.unique(uids, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=len(unique)))[:-1]
    return dict(zip(unique.tolist(), np.split(order, bounds)))


def _worker_init() -> None:
    # Each worker is one process on one core: SimpleITK's own threads would oversubscribe.
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def prepare_dataset(root: str | os.PathLike, out: str | os.PathLike,
                    spacing_zyx: Sequence[float] | None = (1.0, 1.0, 1.0), workers: int = 1,
                    hu_window: Sequence[float] = DEFAULT_HU_WINDOW, margin_mm: float = 10.0,
                    subsets: Sequence[int] | None = None, *, chunk: int = store_lib.DEFAULT_CHUNK,
                    closing_mm: float = 5.0, use_lung_masks: bool = True,
                    nodule_mask: str = "consensus", progress: bool = True,
                    flush_every_s: float = 0.0) -> PrepareReport:
    """Preprocesses a LUNA16-layout folder (real or generated) into a patch store.

    Args:
      root: dataset folder (see :mod:`lungjax.data.luna16`).
      out: store root, local folder or URL (gs://, s3://, file://).
      spacing_zyx: target voxel size (z, y, x) mm; None keeps each scan's native grid.
      workers: processes (1 = in this process).
      hu_window: (low, high) HU scaled to [0, 1].
      margin_mm: margin around the lung bounding box.
      subsets: only these folds (None = all).
      chunk: zarr chunk edge in voxels.
      closing_mm: closing radius of the threshold lung mask.
      use_lung_masks: use ``seg-lungs-LUNA16`` masks where present.
      nodule_mask: "consensus" (``nodule-masks/<uid>.mhd`` where present, else
        spheres), "sphere" (always balls of the annotated diameters) or "disc" (axial
        discs of the annotated diameter on every slice the nodule spans).
      progress: show a progress bar.
      flush_every_s: rewrite the manifest at most this often (and always at the end or
        on interruption); 0 (the default) = after every scan, so a kill loses no
        finished scan. Larger values suit slow object stores: scans finished in the last
        ``flush_every_s`` seconds before a kill are redone on resume.

    Returns:
      :class:`PrepareReport`.

    Raises:
      StoreError: the store exists with different settings, or a scan's labels are
        wrong (malignancy outside 1-5, a nodule mask off its scan's grid); the
        message names the scan.
    """
    out = os.fspath(out)
    if nodule_mask not in NODULE_MASK_MODES:
        raise ValueError(f"nodule_mask must be one of {NODULE_MASK_MODES}, got {nodule_mask!r}")
    dataset = Luna16Dataset.open(root)
    labels_table = nodule_labels_table(root)
    settings = _settings(spacing_zyx, hu_window, margin_mm, chunk, closing_mm, use_lung_masks,
                         nodule_mask)
    stale = None
    try:
        manifest = store_lib.read_manifest(out)
    except store_lib.StoreVersionError as e:
        manifest, stale = None, str(e)
    # Symlinks resolved: a store prepared through a linked folder (a second checkout whose
    # data cache links to the first) keeps a source that outlives the link.
    source = os.path.realpath(os.fspath(root))
    report = PrepareReport(out=out, problems=list(dataset.problems))
    if manifest is None:
        manifest = {"format": store_lib.STORE_FORMAT, "version": store_lib.STORE_VERSION,
                    **settings, "source_root": source, "scans": {}, "skipped": {}}
    else:
        old = {k: manifest.get(k) for k in settings}
        if old != settings:
            raise store_lib.StoreError(
                f"{out}: store was prepared with {old}, this run asks for {settings}; "
                "use another --out or the same settings")
        recorded = manifest.get("source_root")
        if recorded != source and not (recorded and os.path.isdir(recorded)):
            # The dataset moved (or the link it was reached through is gone): its tables
            # (malignancy.csv: the nodules' patients) are read from where it is now.
            manifest["source_root"] = source
            report.warnings.append(f"{out}: source dataset {recorded} is gone; recorded as "
                                   f"{source} now")
    if stale:
        report.warnings.append(f"{stale}: every scan prepared again")
    uids = dataset.uids if subsets is None else dataset.uids_in_folds(subsets)
    for uid in uids:
        rec = manifest["scans"].get(uid)
        # A recorded scan whose arrays were removed since is prepared again.
        if rec is not None and not store_lib.scan_arrays_present(out, uid, rec.get("arrays", ())):
            del manifest["scans"][uid]
            report.warnings.append(f"{uid}: recorded but its arrays are missing; prepared again")
    report.reused = [u for u in uids if u in manifest["scans"]]
    report.dropped_nodules = sum(len(manifest["scans"][u].get("dropped_diameter_mm", ()))
                                 for u in report.reused)
    todo = [u for u in uids if u not in manifest["scans"]]

    # Row indices per UID computed once: the real candidate table has ~750k rows, and
    # filtering it by UID for each of 888 scans would dominate the run.
    by_uid = [_rows_by_uid(t.uid) for t in (dataset.annotations, dataset.excluded,
                                             dataset.candidates)]
    empty = np.zeros(0, np.int64)

    def job(uid: str) -> dict:
        ann, exc, cand = (t.select(g.get(uid, empty)) for t, g in zip(
            (dataset.annotations, dataset.excluded, dataset.candidates), by_uid))
        malignancy, mask_labels = match_nodule_labels(uid, ann.xyz, labels_table)
        store_lib.check_malignancy(malignancy, uid)
        return {"uid": uid, "fold": dataset.fold_of(uid), "scan_path": dataset.scan_path(uid),
                "lung_path": dataset.lung_mask_path(uid),
                "nodule_path": dataset.nodule_mask_path(uid),
                "nodules_xyz": ann.xyz, "nodules_d": ann.diameter_mm,
                "excluded_xyz": exc.xyz, "excluded_d": exc.diameter_mm,
                "candidates_xyz": cand.xyz, "candidates_label": cand.label,
                "malignancy": malignancy, "mask_labels": mask_labels,
                "settings": settings, "out": out}

    def record(result) -> None:
        status, uid, payload = result
        if status == "error":
            raise store_lib.StoreError(payload)
        if status == "done":
            manifest["scans"][uid] = payload
            manifest["skipped"].pop(uid, None)
            report.done.append(uid)
            report.warnings.extend(payload["warnings"])
            report.dropped_nodules += len(payload["dropped_diameter_mm"])
        else:
            manifest["skipped"][uid] = payload
            report.skipped[uid] = payload

    last_flush = time.monotonic()
    bar = tqdm(total=len(todo), disable=not progress, unit="scan", desc="prepare")
    pool = None
    try:
        if workers > 1 and len(todo) > 1:
            # spawn, not fork: tensorstore and SimpleITK hold threads in the parent.
            pool = multiprocessing.get_context("spawn").Pool(min(workers, len(todo)), _worker_init)
            results = pool.imap_unordered(prepare_scan, (job(u) for u in todo))
        else:
            results = (prepare_scan(job(u)) for u in todo)
        for result in results:
            record(result)
            bar.update(1)
            if time.monotonic() - last_flush >= flush_every_s:
                store_lib.write_manifest(out, manifest)
                last_flush = time.monotonic()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        store_lib.write_manifest(out, manifest)
    return report
