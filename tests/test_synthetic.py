"""The generated LUNA16-format dataset (tiny preset): layout, content, determinism,
resumption, and that vessels defeat a plain intensity-threshold detector."""

import hashlib
import json
import os
import re

import numpy as np
import pytest
from scipy import ndimage

from lungjax.data import io
from lungjax.data.coords import voxel_to_world, world_to_voxel
from lungjax.data.lidc import load_nodule_library
from lungjax.data.luna16 import Luna16Dataset
from lungjax.data.synthetic import (MARKER, PRESETS, RECORDS, UID_PREFIX, generate_dataset,
                                    read_malignancy_csv, series_uids)
from lungjax.data.synthetic_nodules import density_class, resample_mask
from lungjax.data.synthetic_scan import (MIN_ANNOTATED_MM, MIN_READERS, is_annotated,
                                         lidc_geometries)
from lungjax.data.tables import Marks, read_findings_csv, read_uid_list
from lungjax.evaluation.blob_baseline import THRESHOLDS_HU, blob_marks, evaluate_blob_baseline
from lungjax.evaluation.froc import compute_froc

N_TINY = PRESETS["tiny"].n_scans


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return generate_dataset(tmp_path_factory.mktemp("syn") / "tiny", preset="tiny", seed=0)


def _digests(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _scan_path(root, uid):
    return next(os.path.join(root, d, uid + ".mhd") for d in sorted(os.listdir(root))
                if d.startswith("subset") and os.path.isfile(os.path.join(root, d, uid + ".mhd")))


# ---- layout ----------------------------------------------------------------------

def test_layout_reads_with_the_luna16_loader(tiny):
    ds = Luna16Dataset.open(tiny)
    assert ds.problems == []
    assert len(ds.uids) == N_TINY
    assert sorted(ds.fold_of(u) for u in ds.uids) == list(range(N_TINY))
    assert set(read_uid_list(os.path.join(tiny, "seriesuids.csv"))) == set(ds.uids)
    for uid in ds.uids:
        assert re.fullmatch(re.escape(UID_PREFIX) + r"[1-9]\d{29}", uid)
        assert ds.lung_mask_path(uid) is not None
        assert os.path.isfile(os.path.join(tiny, "nodule-masks", uid + ".mhd"))
    assert len(ds.annotations) >= N_TINY  # the tiny preset puts >= 1 nodule in every scan
    assert np.all(ds.annotations.diameter_mm >= 2.0)
    assert np.any(ds.excluded.diameter_mm == -1)
    assert set(np.unique(ds.candidates.label).tolist()) == {0, 1}
    readme = open(os.path.join(tiny, "README.md"), encoding="utf-8").read()
    assert "synthetic" in readme.lower() and "NOT real CT" in readme


def test_scan_content_is_chest_like(tiny):
    ds = Luna16Dataset.open(tiny)
    allowed = {tuple(np.round(s, 4)) for s in lidc_geometries(load_nodule_library())}
    for uid in ds.uids[:2]:
        scan = io.read_scan(ds.scan_path(uid))
        lung = io.read_scan(ds.lung_mask_path(uid)).array
        assert scan.array.dtype == np.int16
        np.testing.assert_array_equal(scan.geometry.direction, np.eye(3))
        # Voxel size of a real LIDC scan.
        assert tuple(np.round(scan.geometry.spacing_zyx, 4)) in allowed
        assert set(np.unique(lung).tolist()) <= {0, 3, 4, 5} and {3, 4, 5} <= set(np.unique(lung))
        hu = scan.array
        assert abs(np.median(hu[0, :3, :3]) + 1000) < 80  # air in the corner
        assert -900 < np.median(hu[lung == 3]) < -780  # lung parenchyma
        assert np.median(hu[lung == 5]) < -900  # trachea lumen
        assert np.percentile(hu, 99.9) > 300  # bone
        # Right lung (3) on the patient's right = smaller world x (LPS).
        xs = [voxel_to_world(np.argwhere(lung == v).mean(0), scan.geometry)[0] for v in (3, 4)]
        assert xs[0] < xs[1]
        # Vessels: many bright voxels inside the lungs besides the nodules.
        nod = io.read_scan(os.path.join(tiny, "nodule-masks", uid + ".mhd")).array
        bright = (hu > -300) & np.isin(lung, (3, 4)) & (ndimage.binary_dilation(nod > 0, iterations=3) == 0)
        assert bright.sum() > 200


def test_nodules_masks_and_malignancy_table_agree(tiny):
    ann = read_findings_csv(os.path.join(tiny, "annotations.csv"))
    mal = read_malignancy_csv(os.path.join(tiny, "malignancy.csv"))
    lib = load_nodule_library()
    assert len(mal["seriesuid"]) == len(ann)
    np.testing.assert_array_equal(mal["seriesuid"], ann.uid)
    np.testing.assert_allclose(np.stack([mal["coordX"], mal["coordY"], mal["coordZ"]], 1),
                               ann.xyz, atol=1e-5)
    # Scores are the real LIDC medians of the source nodule.
    rows = mal["library_index"]
    for name in ("malignancy", "texture", "spiculation", "calcification"):
        np.testing.assert_array_equal(mal[name], getattr(lib, name)[rows])
    np.testing.assert_array_equal(mal["n_readers"], lib.n_readers[rows])
    for d, t in zip(mal["density"], mal["texture"]):
        assert d == density_class(t)
    for uid in np.unique(ann.uid):
        labels = io.read_scan(os.path.join(tiny, "nodule-masks", uid + ".mhd"))
        lung = io.read_scan(os.path.join(tiny, "seg-lungs-LUNA16", uid + ".mhd")).array
        sel = mal["seriesuid"] == uid
        assert sorted(mal["mask_label"][sel].tolist()) == list(
            range(1, int(labels.array.max()) + 1))
        voxel_mm3 = np.prod(labels.geometry.spacing)
        for label, x, y, z, d in zip(mal["mask_label"][sel], mal["coordX"][sel],
                                     mal["coordY"][sel], mal["coordZ"][sel],
                                     mal["diameter_mm"][sel]):
            vox = np.argwhere(labels.array == label)
            centre = world_to_voxel(np.array([x, y, z]), labels.geometry)
            # The annotated centre is the centre of the mask, inside the lung mask.
            assert np.all(np.abs(vox.mean(0) - centre) * labels.geometry.spacing_zyx < 1.5)
            assert lung[tuple(np.rint(centre).astype(int))] in (3, 4)
            d_mask = np.cbrt(6 * len(vox) * voxel_mm3 / np.pi)
            assert abs(d_mask - d) < 0.25 * d + 1.0
            # Size follows the real nodule it came from.
            assert abs(d - lib.diameter_mm[mal["library_index"][sel][label - 1]]) < 0.3 * d + 1.0


def test_candidates_label_nodules_and_look_alikes(tiny):
    ds = Luna16Dataset.open(tiny)
    ann, cand = ds.annotations, ds.candidates
    for uid in ds.uids:
        a, c = ann.for_uid(uid), cand.label[cand.uid == uid]
        cxyz = cand.xyz[cand.uid == uid]
        dist = np.linalg.norm(cxyz[:, None] - a.xyz[None], axis=-1)  # (K, N)
        near = dist < 0.5 * a.diameter_mm[None]
        assert np.all(near[c == 1].any(axis=1))  # class 1: inside a nodule
        assert not near[c == 0].any()  # class 0: never inside one
        assert np.all(near[c == 1].any(axis=0))  # every nodule has a class-1 candidate
        assert (c == 0).sum() > 3 * (c == 1).sum()


def test_resample_mask_preserves_volume():
    zz, yy, xx = np.mgrid[-4:5, -12:13, -12:13]
    src_sp = np.array([2.5, 0.7, 0.7])
    mask = (zz * 2.5) ** 2 + (yy * 0.7) ** 2 + (xx * 0.7) ** 2 <= 7.0 ** 2
    lo, occ = resample_mask(mask, src_sp, (1.0, 1.0, 1.0), (20.0, 20.0, 20.0), 0.7, True,
                            (40, 40, 40))
    v_src, v_dst = mask.sum() * np.prod(src_sp), occ.sum()
    assert abs(v_dst - v_src) / v_src < 0.05
    grid = np.indices(occ.shape).reshape(3, -1).T + lo
    np.testing.assert_allclose((grid * occ.reshape(-1, 1)).sum(0) / occ.sum(), 20.0, atol=0.1)


def test_uids_are_deterministic_and_seeded():
    a, b = series_uids("tiny", 0, 10), series_uids("tiny", 1, 10)
    assert a == series_uids("tiny", 0, 10) and len(set(a)) == 10 and not set(a) & set(b)


# ---- determinism, resumption, idempotence ------------------------------------------

def test_same_bytes_with_workers_and_after_resume(tiny, tmp_path):
    other = generate_dataset(tmp_path / "again", preset="tiny", seed=0, workers=2)
    ref = _digests(tiny)
    assert _digests(other) == ref
    # Interrupt: lose the marker, one scan's record and files, and a table; resume.
    uid = read_uid_list(os.path.join(other, "seriesuids.csv"))[2]
    os.remove(os.path.join(other, MARKER))
    os.remove(os.path.join(other, RECORDS, uid + ".json"))
    os.remove(_scan_path(other, uid)[:-4] + ".raw")
    os.remove(os.path.join(other, "annotations.csv"))
    generate_dataset(other, preset="tiny", seed=0)
    assert _digests(other) == ref


def test_complete_dataset_is_reused_and_mismatch_rejected(tiny):
    before = {p: os.stat(os.path.join(tiny, p)).st_mtime_ns for p in _digests(tiny)}
    assert generate_dataset(tiny, preset="tiny", seed=0) == str(tiny)
    assert {p: os.stat(os.path.join(tiny, p)).st_mtime_ns for p in before} == before
    with pytest.raises(ValueError, match="seed"):
        generate_dataset(tiny, preset="tiny", seed=1)
    with pytest.raises(ValueError, match="unknown preset"):
        generate_dataset(tiny, preset="huge")
    marker = json.load(open(os.path.join(tiny, MARKER), encoding="utf-8"))
    assert marker["params"]["seed"] == 0 and len(marker["uids"]) == N_TINY


def test_cli_reuses_dataset_and_renders(tiny, tmp_path):
    from data_prep.make_synthetic import main

    png = tmp_path / "scan.png"
    assert main(["--preset", "tiny", "--seed", "0", "--out", str(tiny), "--render", str(png),
                 "--quiet"]) == 0
    assert 10_000 < png.stat().st_size < 300_000
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[1] > img.shape[0] > 200
    assert main(["--preset", "tiny", "--seed", "3", "--out", str(tiny), "--quiet"]) == 1
    with pytest.raises(SystemExit):
        main(["--preset", "huge", "--out", str(tmp_path / "x")])


# ---- vessels make intensity thresholding insufficient ------------------------------

def test_bright_blob_detector_scores_clearly_below_a_perfect_one(tiny):
    ds = Luna16Dataset.open(tiny)
    uids = read_uid_list(os.path.join(tiny, "seriesuids.csv"))
    ann = ds.annotations
    perfect = compute_froc(ann, ds.excluded, uids, Marks(ann.uid, ann.xyz, np.ones(len(ann))))
    assert perfect.cpm == pytest.approx(1.0)
    res = evaluate_blob_baseline(ds, uids)
    cpms = {(r["threshold_hu"], r["score"]): r["cpm"] for r in res["settings"]}
    print("blob detector CPM by (threshold HU, score):",
          {k: round(v, 3) for k, v in cpms.items()}, "perfect:", perfect.cpm)
    assert len(cpms) == len(THRESHOLDS_HU) * 2
    assert res["best"]["cpm"] == max(cpms.values())
    assert max(cpms.values()) < perfect.cpm - 0.35
    # The marks themselves: one per connected component, inside the scans' lungs.
    marks = blob_marks(ds, uids[:1], THRESHOLDS_HU[0], "size")
    assert len(marks) > 0 and set(marks.uid) == {uids[0]}


def test_annotations_follow_the_luna16_rule(tiny):
    """Annotated nodules are >= 3 mm and marked by >= 3 readers; a library nodule rendered
    under 3 mm is an excluded finding, drawn in the image but with no mask label."""
    ann = read_findings_csv(os.path.join(tiny, "annotations.csv"))
    mal = read_malignancy_csv(os.path.join(tiny, "malignancy.csv"))
    assert len(ann) > 0
    assert np.all(ann.diameter_mm >= MIN_ANNOTATED_MM)
    assert np.all(mal["n_readers"] >= MIN_READERS)
    assert is_annotated(3.0, 3) and not is_annotated(2.99, 4) and not is_annotated(5.0, 2)
    for rec_file in os.listdir(os.path.join(tiny, RECORDS)):
        with open(os.path.join(tiny, RECORDS, rec_file), encoding="utf-8") as f:
            rec = json.load(f)
        small = [e for e in rec["excluded"] if e["kind"] == "small_nodule"]
        for e in small:  # under 3 mm: LUNA16 lists them without a diameter
            assert e["diameter_mm"] == -1.0
        assert [n["label"] for n in rec["nodules"]] == list(range(1, len(rec["nodules"]) + 1))
