"""The generated default dataset: synthetic chest CT in the LUNA16 on-disk layout.

``generate_dataset(out_dir, preset, seed, workers)`` writes::

    subset0/ ... subset9/<uid>.mhd + .raw   int16 HU, MetaImage (spacing, origin, direction)
    seg-lungs-LUNA16/<uid>.mhd + .zraw      uint8: 3 right lung, 4 left lung, 5 trachea
    nodule-masks/<uid>.mhd + .zraw          uint8 instance labels (k = mask_label k)
    annotations.csv                         seriesuid,coordX,coordY,coordZ,diameter_mm
    annotations_excluded.csv                same columns; diameter -1 = unknown
    candidates_V2.csv                       seriesuid,coordX,coordY,coordZ,class
    seriesuids.csv                          one UID per line, no header
    malignancy.csv                          one row per nodule: LIDC reader scores, mask label
    README.md                               says what this is and how it was made
    synthetic-records/<uid>.json            per-scan record (written last for each scan)
    synthetic.json                          completion marker (written last of all)

Each scan is drawn from its own random stream, ``SeedSequence([seed, crc32(preset),
index])``, so the output does not depend on the number of workers. Re-running on a
complete dataset with the same preset and seed does nothing; an interrupted run
resumes, keeping the scans whose records exist.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import zlib

import numpy as np

from lungjax.atomic import atomic_write_text
from lungjax.data import io
from lungjax.data.synthetic_scan import PRESETS, SCORE_NAMES, Preset, generate_scan
from lungjax.data.tables import Findings, write_findings_csv

UID_PREFIX = "1.3.6.1.4.1.14519.5.2.1.6279.6001."
MARKER = "synthetic.json"
RECORDS = "synthetic-records"
LUNG_MASKS = "seg-lungs-LUNA16"
NODULE_MASKS = "nodule-masks"
FORMAT_VERSION = 2  # 2: LUNA16's annotation rule (>= 3 mm), 5 scans x 6-8 nodules per subset

__all__ = ["PRESETS", "Preset", "generate_dataset", "series_uids", "fold_of_index",
           "read_malignancy_csv"]


def _preset_key(preset: str) -> int:
    return zlib.crc32(preset.encode())


def series_uids(preset: str, seed: int, n: int) -> list[str]:
    """LUNA16-like series UIDs (prefix + 30 digits), deterministic in (preset, seed)."""
    rng = np.random.default_rng([seed, _preset_key(preset), 1 << 20])
    uids: list[str] = []
    while len(uids) < n:
        digits = "".join(str(d) for d in rng.integers(0, 10, 30))
        uid = UID_PREFIX + str(rng.integers(1, 10)) + digits[1:]
        if uid not in uids:
            uids.append(uid)
    return uids


def fold_of_index(i: int) -> int:
    """Scans go round-robin into subset0..subset9 (the LUNA16 folds)."""
    return i % 10


def _scan_rng(preset: str, seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _preset_key(preset), index]))


# ---- one scan (runs in workers) -------------------------------------------------

_LIBRARY = None


def _library():
    global _LIBRARY
    if _LIBRARY is None:
        from lungjax.data.lidc import load_nodule_library

        _LIBRARY = load_nodule_library()
    return _LIBRARY


def _record_path(out_dir: str, uid: str) -> str:
    return os.path.join(out_dir, RECORDS, uid + ".json")


def _make_one(out_dir: str, preset_name: str, seed: int, index: int, uid: str) -> dict:
    """Generates and writes scan ``index``; returns its record."""
    preset = PRESETS[preset_name]
    scan = generate_scan(_scan_rng(preset_name, seed, index), preset, _library())
    fold = fold_of_index(index)
    io.write_scan(os.path.join(out_dir, f"subset{fold}", uid + ".mhd"), scan.hu, scan.geometry)
    io.write_scan(os.path.join(out_dir, LUNG_MASKS, uid + ".mhd"), scan.lung_label,
                  scan.geometry, compress=True)
    io.write_scan(os.path.join(out_dir, NODULE_MASKS, uid + ".mhd"), scan.nodule_label,
                  scan.geometry, compress=True)
    record = dict(uid=uid, index=index, fold=fold, shape_zyx=list(scan.hu.shape),
                  geometry=scan.geometry.to_json(), nodules=scan.nodules,
                  excluded=scan.excluded, candidates=scan.candidates)
    # The record is written last: its presence means the scan's files are complete.
    atomic_write_text(_record_path(out_dir, uid), json.dumps(record, indent=1))
    return record


# ---- tables --------------------------------------------------------------------

def _fmt(v: float) -> str:
    return f"{v:.6f}"


def _write_tables(out_dir: str, records: list[dict]) -> None:
    ann_uid, ann_xyz, ann_d, exc_uid, exc_xyz, exc_d = [], [], [], [], [], []
    cand_lines = ["seriesuid,coordX,coordY,coordZ,class"]
    mal_lines = [",".join(["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm", "mask_label",
                           *SCORE_NAMES, "n_readers", "density", "juxtapleural",
                           "lidc_scan_uid", "lidc_patient_id", "lidc_diameter_mm",
                           "library_index"])]
    for r in records:
        uid = r["uid"]
        for n in r["nodules"]:
            ann_uid.append(uid), ann_xyz.append(n["xyz"]), ann_d.append(n["diameter_mm"])
            mal_lines.append(",".join(
                [uid, *map(_fmt, n["xyz"]), _fmt(n["diameter_mm"]), str(n["label"])]
                + [f"{n[s]:g}" for s in SCORE_NAMES]
                + [str(n["n_readers"]), n["density"], str(int(n["juxtapleural"])),
                   n["lidc_scan_uid"], n["lidc_patient_id"], _fmt(n["lidc_diameter_mm"]),
                   str(n["library_index"])]))
        for e in r["excluded"]:
            exc_uid.append(uid), exc_xyz.append(e["xyz"]), exc_d.append(e["diameter_mm"])
        for c in r["candidates"]:
            cand_lines.append(",".join([uid, *map(_fmt, c["xyz"]), str(c["label"])]))
    write_findings_csv(os.path.join(out_dir, "annotations.csv"),
                       Findings(ann_uid, np.reshape(ann_xyz, (-1, 3)), ann_d))
    write_findings_csv(os.path.join(out_dir, "annotations_excluded.csv"),
                       Findings(exc_uid, np.reshape(exc_xyz, (-1, 3)), exc_d))
    atomic_write_text(os.path.join(out_dir, "candidates_V2.csv"), "\n".join(cand_lines) + "\n")
    atomic_write_text(os.path.join(out_dir, "malignancy.csv"), "\n".join(mal_lines) + "\n")
    atomic_write_text(os.path.join(out_dir, "seriesuids.csv"),
                      "".join(r["uid"] + "\n" for r in records))


def read_malignancy_csv(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a generated ``malignancy.csv`` into columns.

    Returns:
      dict of (N,) arrays: seriesuid, density, lidc_scan_uid, lidc_patient_id (str);
      mask_label, n_readers, juxtapleural, library_index (int64); the rest float64
      (coordX, coordY, coordZ world mm, diameter_mm, and the LIDC median scores).
    """
    import csv

    path = os.fspath(path)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    text = {"seriesuid", "density", "lidc_scan_uid", "lidc_patient_id"}
    ints = {"mask_label", "n_readers", "juxtapleural", "library_index"}
    out = {}
    for k in rows[0]:
        try:
            col = [r[k] for r in rows]
            out[k] = (np.asarray(col, str) if k in text
                      else np.asarray(col, np.int64 if k in ints else np.float64))
        except ValueError as e:
            raise ValueError(f"{path}: column {k!r}: {e}") from e
    return out


def _readme(preset: Preset, seed: int, records: list[dict], library_source: str) -> str:
    n_nod = sum(len(r["nodules"]) for r in records)
    n_exc = sum(len(r["excluded"]) for r in records)
    sp = np.array([r["geometry"]["spacing_xyz"] for r in records])
    return f"""# Synthetic LUNA16-format dataset (NOT real CT)

Every image in this folder is **synthetic**: generated by `lungjax.data.synthetic`
(`python data_prep/make_synthetic.py --preset {preset.name} --seed {seed} --out DIR`).
No patient data are in it. It has exactly the LUNA16 on-disk layout and CSV columns so
that the same loaders, preprocessing and evaluation run on it as on the real data.

- {len(records)} scans in subset0..subset9 (round robin), {n_nod} annotated nodules,
  {n_exc} excluded findings.
- Voxel sizes are those of real LIDC-IDRI scans (drawn per scan from the scans behind
  the nodule library; x/y {sp[:, 0].min():.3f}-{sp[:, 0].max():.3f} mm, z
  {sp[:, 2].min():.3f}-{sp[:, 2].max():.3f} mm); the matrix is smaller than 512 x 512 and
  the chest is smaller than an adult's, so that it trains on a CPU. A voxel size whose
  grid would exceed {preset.max_voxels:,} voxels is redrawn, so thin slices are rarer
  than in LIDC-IDRI.
- Each scan: air, a body with a subcutaneous fat layer (~-100 HU) around soft tissue
  (~40 HU), ribs, spine and sternum, heart, trachea and main bronchi, two lungs
  (~-850 HU, denser towards the back, smooth texture) holding a branching vessel tree
  (tapering ~40 HU tubes: in cross-section they look like nodules), and CT noise.
- Nodules: the consensus masks (>= 50% of readers) of real LIDC-IDRI nodules
  (`{library_source}`), resampled to the scan's voxel size, rotated in-plane,
  placed inside the lungs (about a quarter touching the pleura). Density follows the
  LIDC texture score: ground glass (-600..-300 HU) for texture <= 2, ground glass with
  a solid core for 2 < texture < 4, solid (0..100 HU) above; calcified cores where the
  calcification score says so. Partial volume + noise.
- `annotations.csv`: centre of mass and equivalent-sphere diameter of each rendered
  nodule mask. `malignancy.csv`: the source nodule's median LIDC reader scores
  (malignancy, texture, ...), its reader count, and its label in `nodule-masks/`.
- `annotations.csv` follows LUNA16's rule: nodules of at least 3 mm marked by at least
  3 readers. A library nodule that renders under 3 mm at the scan's voxel size goes to
  `annotations_excluded.csv` instead (diameter -1), as do other sub-3 mm nodules
  (diameter -1) and faint 3-6 mm opacities, all drawn in the images; as in LUNA16, marks
  on them are neither hits nor false positives.
- `candidates_V2.csv`: class 1 near every nodule; class 0 on vessels (bifurcations
  first), at random lung points and on the excluded findings.
- `seg-lungs-LUNA16/`: lung masks with LUNA16's values (3 right, 4 left, 5 trachea).

Same preset and seed give the same bytes.
"""


# ---- the dataset ---------------------------------------------------------------

def _params(preset: str, seed: int, n: int) -> dict:
    return dict(format=FORMAT_VERSION, preset=preset, seed=int(seed), n_scans=n)


def generate_dataset(out_dir: str | os.PathLike, preset: str = "tiny", seed: int = 0,
                     workers: int = 1, progress: bool = False) -> str:
    """Writes a synthetic LUNA16-layout dataset (see the module docstring).

    Args:
      out_dir: destination folder (created).
      preset: "tiny" (5 small scans, seconds) or "default" (50 scans).
      seed: random seed; (preset, seed) fixes every byte of the output.
      workers: processes generating scans in parallel (same output for any count).
      progress: print one line per finished scan.

    Returns:
      ``out_dir`` as a string.

    Raises:
      ValueError: unknown preset, or ``out_dir`` holds a dataset made with another
        preset or seed.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    out_dir = os.fspath(out_dir)
    cfg = PRESETS[preset]
    params = _params(preset, seed, cfg.n_scans)
    marker = os.path.join(out_dir, MARKER)
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            done = json.load(f)
        if done.get("params") != params:
            raise ValueError(f"{out_dir} already holds a generated dataset made with "
                             f"{done.get('params')}, not {params}; use another --out")
        return out_dir
    os.makedirs(os.path.join(out_dir, RECORDS), exist_ok=True)
    uids = series_uids(preset, seed, cfg.n_scans)
    records: dict[int, dict] = {}
    todo = []
    for i, uid in enumerate(uids):
        path = _record_path(out_dir, uid)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                records[i] = json.load(f)
        else:
            todo.append(i)
    library = _library()  # fail early, in the parent, if the library is missing

    def report(rec):
        if progress:
            print(f"[{len(records)}/{len(uids)}] subset{rec['fold']}/{rec['uid']} "
                  f"{rec['shape_zyx']} nodules={len(rec['nodules'])}", flush=True)

    if workers <= 1 or len(todo) <= 1:
        for i in todo:
            records[i] = _make_one(out_dir, preset, seed, i, uids[i])
            report(records[i])
    else:
        ctx = multiprocessing.get_context("spawn")  # safe when the parent holds threads
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = {pool.submit(_make_one, out_dir, preset, seed, i, uids[i]): i for i in todo}
            for fut in concurrent.futures.as_completed(futures):
                records[futures[fut]] = fut.result()
                report(records[futures[fut]])
    ordered = [records[i] for i in range(len(uids))]
    _write_tables(out_dir, ordered)
    atomic_write_text(os.path.join(out_dir, "README.md"),
                      _readme(cfg, seed, ordered, os.path.basename(library.source)))
    atomic_write_text(marker, json.dumps(dict(params=params, uids=uids), indent=1) + "\n")
    return out_dir
