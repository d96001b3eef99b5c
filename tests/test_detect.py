"""Whole-scan detection on a real PatchStore and on a scan file, screening figures, CSV."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lungjax import export
from lungjax.data import io
from lungjax.data.coords import Geometry, voxel_to_world, world_to_voxel
from lungjax.data.tables import Findings, Marks, read_marks_csv
from lungjax.detect import (DetectionSettings, detect_scan, detect_store, detect_volume,
                            run_detection, screening_stats, store_screening_stats,
                            write_submission)
from lungjax.tasks.screening import output_mapping

# A fixed "network": mean over a (3, 5, 5) box, then a (1, 2, 2) stride-2 max-pool, all
# VALID. On an image that is 1.0 inside bright spheres (radius >= 3 voxels) and lower
# elsewhere it scores 1.0 exactly at sphere centres: a detector with known answers.
LAYERS = [((3, 5, 5), 1, "VALID"), ((1, 2, 2), (1, 2, 2), "VALID")]
MAPPING = output_mapping(LAYERS, center="patch")


def box_detector(x):
    """(B, D, H, W, 1) float32 -> (B, D - 2, (H - 4) // 2, (W - 4) // 2) float32."""
    k = jnp.full((3, 5, 5, 1, 1), 1.0 / 75.0, jnp.float32)
    y = jax.lax.conv_general_dilated(x, k, (1, 1, 1), "VALID",
                                     dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    y = jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 1, 2, 2, 1), (1, 1, 2, 2, 1), "VALID")
    return y[..., 0]


def _sphere(shape, centre_zyx, radius_vox):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    return ((grid - np.asarray(centre_zyx)) ** 2).sum(-1) <= radius_vox ** 2


# ---------------------------------------------------------------------------
# A two-scan PatchStore written through the store's own writer.
# ---------------------------------------------------------------------------

SCANS = {
    # uid: (shape, origin xyz, nodule centres zyx (voxels), decoy centre, excluded centre)
    "1.2.3.1": ((20, 40, 44), (-50.0, 10.0, -300.0), [(6, 12, 30), (13, 28, 11)],
                (15, 10, 12), None),
    "1.2.3.2": ((18, 36, 36), (5.0, -20.0, 100.0), [(9, 18, 18)], (4, 30, 6), (14, 7, 28)),
}
SPACING_XYZ = (0.8, 0.8, 1.0)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from lungjax.data import store as store_lib

    root = str(tmp_path_factory.mktemp("store"))
    scans = {}
    for fold, (uid, (shape, origin, nodules, decoy, excluded)) in enumerate(SCANS.items()):
        geom = Geometry(np.asarray(SPACING_XYZ), np.asarray(origin), np.eye(3))
        image = np.full(shape, 0.3, np.float32)
        for c in nodules + [decoy] + ([excluded] if excluded else []):
            image[_sphere(shape, c, 3.2)] = 1.0
        nod = np.asarray(nodules, np.float64)
        exc = np.asarray([excluded] if excluded else [], np.float64).reshape(-1, 3)
        lung = np.ones(shape, np.uint8)
        lung[_sphere(shape, decoy, 4)] = 0  # the decoys lie outside the lung mask
        store_lib.write_scan_arrays(root, uid, {
            "image": np.round(image * 255).astype(np.uint8), "lung": lung})
        empty = np.zeros((0, 3))
        rec = store_lib.ScanRecord(
            uid=uid, fold=fold, shape_zyx=shape, geometry=geom, arrays=("image", "lung"),
            nodules_zyx=nod, nodules_world=voxel_to_world(nod, geom),
            nodule_diameter_mm=np.full(len(nod), 6.0), dropped_world=empty,
            dropped_diameter_mm=np.zeros(0), excluded_zyx=exc,
            excluded_world=voxel_to_world(exc, geom), excluded_diameter_mm=np.full(len(exc), -1.0),
            candidates_zyx=empty, candidates_world=empty, candidates_label=np.zeros(0, np.int64),
            transforms={})
        scans[uid] = rec.to_json()
    store_lib.write_manifest(root, {
        "format": store_lib.STORE_FORMAT, "version": store_lib.STORE_VERSION,
        "spacing_zyx": None, "hu_window": [-1200.0, 600.0], "scans": scans})
    return store_lib.PatchStore.open(root)


def test_lung_restriction_comes_before_suppression():
    """A chest-wall peak next to an in-lung nodule neither suppresses the nodule's peak nor
    takes its place under the cap."""
    from lungjax.detect import candidates_of_scores
    from lungjax.tasks.screening import OutputMapping

    mapping = OutputMapping((1, 1, 1), (0.0, 0.0, 0.0))
    geometry = Geometry.identity()
    scores = np.zeros((12, 12, 24), np.float32)
    lung = np.zeros(scores.shape, bool)
    lung[:, :, :12] = True
    scores[6, 6, 10] = 0.8  # nodule, inside the lung, 3 voxels from the wall's peak
    scores[6, 6, 13] = 0.99  # chest wall, outside
    scores[2, 2, 20] = 0.95  # chest wall, far away
    settings = DetectionSettings(threshold=0.5, nms_radius_mm=5.0, max_candidates=1)
    free = candidates_of_scores(scores, mapping, geometry, settings, scores.shape)
    np.testing.assert_array_equal(free.voxel_zyx, [[6, 6, 13]])
    kept = candidates_of_scores(scores, mapping, geometry,
                                dataclasses.replace(settings, lung_only=True), scores.shape,
                                lung_mask=lung)
    np.testing.assert_array_equal(kept.voxel_zyx, [[6, 6, 10]])
    np.testing.assert_allclose(kept.score, [0.8])


def test_detect_store_finds_every_sphere_in_world_mm(store, tmp_path):
    uids = store.uids()
    settings = DetectionSettings(threshold=0.9, nms_radius_mm=5.0)
    run = run_detection(box_detector, store, uids, MAPPING, settings, progress=False)
    for uid, (shape, origin, nodules, decoy, excluded) in SCANS.items():
        rec = store.scan(uid)
        want = nodules + [decoy] + ([excluded] if excluded else [])
        got = run.candidates[uid]
        assert len(got) == len(want), uid
        # The mapping lands each sphere centre on the candidate voxel within one voxel
        # (the y/x stride is 2), and world mm follow the scan's geometry.
        for c in want:
            d = np.abs(got.voxel_zyx - np.asarray(c)).max(axis=1)
            assert d.min() <= 1.0, (uid, c, got.voxel_zyx)
        np.testing.assert_allclose(world_to_voxel(got.world_xyz, rec.geometry), got.voxel_zyx,
                                   atol=1e-9)
        assert set(run.seconds[uid]) == {"read", "detect", "total"}
    assert len(run.marks) == sum(len(c) for c in run.candidates.values())
    assert run.mean_seconds_per_scan() > 0

    # Screening figures: all 3 nodules hit; decoys are FPs (2), the excluded finding is not.
    stats = store_screening_stats(run.marks, store, uids)
    assert (stats["n_nodules"], stats["n_detected"], stats["n_false_positives"]) == (3, 3, 2)
    assert stats["sensitivity"] == 1.0 and stats["fps_per_scan"] == 1.0
    assert stats["candidates_per_scan"] == len(run.marks) / 2 and len(stats["missed"]) == 0

    # Tiled detection gives the same marks; detect_store returns the marks alone.
    tiled = detect_store(box_detector, store, uids, MAPPING, 0.9, 5.0, tile_zyx=(8, 16, 16),
                         batch=2, progress=False)
    np.testing.assert_array_equal(tiled.uid, run.marks.uid)
    np.testing.assert_allclose(tiled.xyz, run.marks.xyz)
    np.testing.assert_allclose(tiled.probability, run.marks.probability, rtol=1e-6)

    # Restricted to the lung mask: the decoys go, everything else stays.
    lung_only = run_detection(box_detector, store, uids, MAPPING,
                              DetectionSettings(0.9, 5.0, lung_only=True), progress=False)
    assert len(lung_only.marks) == len(run.marks) - 2
    assert store_screening_stats(lung_only.marks, store, uids)["n_false_positives"] == 0

    # The submission CSV round-trips (with the optional diameter column).
    path = tmp_path / "sub" / "marks.csv"
    write_submission(path, run.marks, diameter_mm=np.full(len(run.marks), 6.0))
    back = read_marks_csv(path)
    np.testing.assert_array_equal(back.uid, run.marks.uid)
    np.testing.assert_allclose(back.xyz, run.marks.xyz, atol=1e-6)
    assert path.read_text(encoding="utf-8").splitlines()[0].endswith("probability,diameter_mm")
    with pytest.raises(ValueError, match="diameters"):
        write_submission(path, run.marks, diameter_mm=[1.0])


def test_screening_stats_rules():
    ann = Findings(["a", "a", "b"], [[0, 0, 0], [50, 0, 0], [0, 0, 0]], [10.0, 4.0, 6.0])
    exc = Findings(["a"], [[0, 40, 0]], [-1.0])  # unknown size: 10 mm
    marks = Marks(["a", "a", "a", "a", "a", "b", "c"],
                  [[4.9, 0, 0],    # inside nodule 0 (r = 5)
                   [1, 1, 1],      # second hit on nodule 0: not an FP
                   [52, 0, 0],     # exactly at r = 2 of nodule 1: a miss (d^2 < r^2 rule)
                   [0, 44, 0],     # on the excluded finding: neither
                   [0, 46, 0],     # 6 mm from it: FP
                   [9, 9, 9],      # scan b: FP
                   [0, 0, 0]],     # scan c is not evaluated
                  [0.9] * 7)
    s = screening_stats(marks, ann, ["a", "b"], exc)
    assert (s["n_nodules"], s["n_detected"], s["n_false_positives"]) == (3, 1, 3)
    assert s["fps_per_scan"] == 1.5 and s["n_candidates"] == 6
    np.testing.assert_array_equal(s["missed"].xyz, [[50, 0, 0], [0, 0, 0]])
    # A fixed radius instead of each nodule's own.
    assert screening_stats(marks, ann, ["a", "b"], exc, radius_mm=2.5)["n_detected"] == 2
    with pytest.raises(ValueError, match="at least one"):
        screening_stats(marks, ann, [])


def test_settings_from_config_and_validation():
    s = DetectionSettings.from_config({"threshold": 0.85, "nms_distance_mm": 6.0,
                                       "max_candidates_per_scan": 0, "tile_zyx": [32, 64, 64]})
    assert s == DetectionSettings(0.85, 6.0, (32, 64, 64), 1, None, None, False, False)
    with pytest.raises(ValueError, match="nms_radius_mm"):
        DetectionSettings(nms_radius_mm=-1)


# ---------------------------------------------------------------------------
# A scan file: read -> preprocess like the store -> detect.
# ---------------------------------------------------------------------------


def _synthetic_chest(spacing_xyz, shape_zyx, nodules_world, geom):
    """HU volume: air, an elliptic body (40 HU), two lungs (-850 HU), 600 HU spheres."""
    z, y, x = np.meshgrid(*[np.arange(s) for s in shape_zyx], indexing="ij")
    mm = np.stack([x * spacing_xyz[0], y * spacing_xyz[1], z * spacing_xyz[2]], -1)
    cx, cy = shape_zyx[2] * spacing_xyz[0] / 2, shape_zyx[1] * spacing_xyz[1] / 2
    hu = np.full(shape_zyx, -1000.0, np.float32)
    body = ((mm[..., 0] - cx) / (cx - 3)) ** 2 + ((mm[..., 1] - cy) / (cy - 3)) ** 2 <= 1
    hu[body] = 40.0
    cz = shape_zyx[0] * spacing_xyz[2] / 2
    for side in (-1, 1):
        lung = (((mm[..., 0] - cx - side * 17) / 13) ** 2 + ((mm[..., 1] - cy) / 24) ** 2
                + ((mm[..., 2] - cz) / 22) ** 2) <= 1
        hu[lung] = -850.0
    world = voxel_to_world(np.stack([z, y, x], -1).astype(np.float64), geom)
    for c in nodules_world:
        hu[((world - np.asarray(c)) ** 2).sum(-1) <= 4.0 ** 2] = 600.0
    return hu


def test_detect_scan_from_a_metaimage_file(tmp_path):
    spacing = (1.5, 1.5, 2.0)
    shape = (26, 56, 56)
    geom = Geometry(np.asarray(spacing), np.asarray([-40.0, 25.0, -120.0]), np.eye(3))
    centre = voxel_to_world(np.asarray([13.0, 28.0, 28.0]), geom)
    nodules = [centre + [-17, 5, 3], centre + [17, -8, -4]]  # one per lung
    io.write_scan(str(tmp_path / "1.9.9.mhd"),
                  _synthetic_chest(spacing, shape, nodules, geom).astype(np.int16), geom)
    cfg = {"spacing_zyx": [1.0, 1.0, 1.0], "hu_window": [-1200.0, 600.0], "margin_mm": 5.0,
           "chunk": 64}  # extra manifest keys are ignored
    marks, info = detect_scan(box_detector, tmp_path / "1.9.9.mhd", cfg, MAPPING,
                              DetectionSettings(threshold=0.95, nms_radius_mm=5.0))
    assert info["uid"] == "1.9.9" and set(marks.uid) == {"1.9.9"}
    assert len(marks) == 2, marks.xyz
    for c in nodules:
        assert np.linalg.norm(marks.xyz - c, axis=1).min() <= 1.5
    assert info["seconds"]["total"] >= info["seconds"]["detect"] > 0
    with pytest.raises(ValueError, match="hu_window"):
        detect_scan(box_detector, tmp_path / "1.9.9.mhd", {"spacing_zyx": [1, 1, 1]}, MAPPING,
                    DetectionSettings())


def test_cli_runs_an_exported_model_on_every_format_and_survives_bad_scans(tmp_path, capsys):
    """One scan as .mhd, .mha, .nii.gz and a DICOM series (and the folder holding them),
    among a 2-D image and a non-image file: every good scan's marks land on the nodule,
    each bad scan is one line naming it, the others' outputs are written, exit code 1."""
    from lungjax import detect

    spacing = (1.5, 1.5, 2.0)
    shape = (26, 56, 56)
    geom = Geometry(np.asarray(spacing), np.asarray([0.0, 0.0, 0.0]), np.eye(3))
    nodule = voxel_to_world(np.asarray([13.0, 28.0, 28.0]), geom) + [-17, 5, 3]
    hu = _synthetic_chest(spacing, shape, [nodule], geom).astype(np.int16)
    scans = tmp_path / "scans"
    for name in ("1.9.1.mhd", "1.9.2.mha", "1.9.3.nii.gz"):
        io.write_scan(str(scans / name), hu, geom)
    io.write_dicom_series(scans / "1.9.4", hu, geom)
    io.write_scan(str(scans / "seg-lungs-LUNA16" / "1.9.1.mhd"),
                  (hu < -400).astype(np.uint8) * 3, geom)  # LUNA16's mask layout: used
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "notes.nii").write_text("not an image")
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(hu[0]), str(tmp_path / "broken" / "flat.mha"))

    def predict(variables, image):  # a "trained" scale on the box detector
        return box_detector(image) * variables["params"]["scale"]

    export.export_predictor(
        str(tmp_path / "model"), predict, {"params": {"scale": np.float32(1.0)}}, (12, 40, 40),
        {"output_mapping": MAPPING.to_json(),
         "preprocessing": {"spacing_zyx": [1, 1, 1], "hu_window": [-1200, 600], "margin_mm": 5},
         "detection": {"threshold": 0.95, "nms_distance_mm": 5.0}})
    out = tmp_path / "out"
    rc = detect.main([f"--model={tmp_path / 'model'}", f"--scan={scans}",
                      f"--scan={tmp_path / 'broken' / 'notes.nii'}",
                      f"--scan={tmp_path / 'broken' / 'flat.mha'}", f"--out={out}"])
    assert rc == 1
    cap = capsys.readouterr()
    errors = [ln for ln in cap.err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 2 and "notes.nii" in errors[0] and "flat.mha: expected a 3-D" in errors[1]
    marks = read_marks_csv(out / "submission.csv")
    assert sorted(set(marks.uid)) == ["1.9.1", "1.9.2", "1.9.3", "1.9.4"]
    for uid in set(marks.uid):
        own = marks.select(marks.uid == uid)
        assert len(own) == 1 and np.linalg.norm(own.xyz[0] - nodule) <= 1.5
        assert (out / "scans" / f"{uid}.csv").is_file() and (out / f"{uid}.png").is_file()
    record = json.loads((out / "predict.json").read_text(encoding="utf-8"))
    assert record["scans"]["1.9.1"]["lung_mask"].endswith("seg-lungs-LUNA16/1.9.1.mhd")
    assert record["scans"]["1.9.2"]["lung_mask"] == "threshold"
    assert record["scans"]["1.9.4"]["series"] == "1.2.826.0.1.3680043.2.1125.1"  # DICOM
    assert "series" not in record["scans"]["1.9.1"]
    assert len(record["failed"]) == 2
    assert not list(out.rglob(".tmp-*"))
    # Without pictures: the same marks, no PNG.
    quiet = tmp_path / "quiet"
    assert detect.main([f"--model={tmp_path / 'model'}", f"--scan={scans / '1.9.1.mhd'}",
                        f"--out={quiet}", "--no-png"]) == 0
    np.testing.assert_allclose(read_marks_csv(quiet / "submission.csv").xyz,
                               marks.select(marks.uid == "1.9.1").xyz)
    assert not list(quiet.glob("*.png"))
    # The screening network's probability map, on the scan's own grid, peaks at the nodule.
    maps = tmp_path / "maps"
    assert detect.main([f"--model={tmp_path / 'model'}", f"--scan={scans / '1.9.2.mha'}",
                        f"--out={maps}", "--no-png", "--save-maps"]) == 0
    written = json.loads((maps / "predict.json").read_text())["scans"]["1.9.2"]["maps"]
    assert list(written) == ["screen_probability"]
    prob = io.read_scan(written["screen_probability"])
    assert prob.array.shape == hu.shape and prob.array.dtype == np.float32
    np.testing.assert_allclose(prob.geometry.spacing, spacing)
    np.testing.assert_allclose(prob.geometry.origin, geom.origin)
    peak = np.unravel_index(np.argmax(prob.array), prob.array.shape)
    assert np.linalg.norm(voxel_to_world(np.asarray(peak, float), geom) - nodule) <= 3.0
    assert 0.9 <= prob.array.max() <= 1.0 and prob.array.min() >= 0.0
    assert detect.main([f"--model={tmp_path / 'model'}", f"--scan={tmp_path / 'none.mhd'}",
                        f"--out={out}"]) == 2
    assert "none.mhd" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    export.export_predictor(str(tmp_path / "bad"), predict, {"params": {"scale": np.float32(1)}},
                            (12, 40, 40), {})
    with pytest.raises(ValueError, match="output_mapping"):
        detect.load_exported_detector(tmp_path / "bad")


def test_a_dicom_folder_with_several_series_is_read_as_its_largest(tmp_path, capsys):
    """A study folder holding the CT series (26 slices) and a 3-slice localizer: the
    predict path reads the CT series, says so naming both, and records which it read."""
    import shutil

    from lungjax.detect import read_preprocessed

    spacing = (1.5, 1.5, 2.0)
    geom = Geometry(np.asarray(spacing), np.asarray([0.0, 0.0, 0.0]), np.eye(3))
    hu = _synthetic_chest(spacing, (26, 56, 56), [], geom).astype(np.int16)
    ct, loc = "1.2.826.0.1.3680043.2.1125.7", "1.2.826.0.1.3680043.2.1125.8"
    io.write_dicom_series(tmp_path / "study", hu, geom, series_uid=ct)
    io.write_dicom_series(tmp_path / "loc", np.full((3, 56, 56), 300, np.int16), geom,
                          series_uid=loc)
    for f in (tmp_path / "loc").iterdir():  # same file names: keep both series apart
        shutil.move(str(f), str(tmp_path / "study" / f"loc_{f.name}"))
    assert io.dicom_series_sizes(str(tmp_path / "study")) == {ct: 26, loc: 3}
    pre = {"spacing_zyx": [2, 2, 2], "hu_window": [-1200, 600], "margin_mm": 5}
    volume, _, _, uid, info = read_preprocessed(tmp_path / "study", pre)
    assert uid == "study" and info["series"] == ct
    said = capsys.readouterr().out
    assert f"2 DICOM series; reading the largest, {ct} (26 slices); not read: {loc} (3)" in said
    with pytest.raises(io.ScanReadError, match="2 DICOM series found"):
        io.read_scan(tmp_path / "study")  # the library call still asks which one


def test_log_odds_scores_rank_cells_a_float32_probability_ties():
    """Two peaks whose float32 probabilities are both 1.0: ranked by log-odds, the higher
    one comes first wherever it sits, the threshold stays a probability, and candidate
    scores are float64 probabilities."""
    from lungjax.tasks.screening import OutputMapping

    log_odds = np.full((12, 12, 12), -5.0, np.float32)
    log_odds[2, 2, 2] = 25.0   # first in scan order
    log_odds[9, 9, 9] = 40.0   # higher, later in scan order
    log_odds[5, 9, 2] = 0.5    # p = 0.62: below a 0.7 threshold
    assert float(1 / (1 + np.exp(np.float32(-25.0)))) == 1.0  # float32 saturates
    ident = OutputMapping((1, 1, 1), (0.0, 0.0, 0.0), (1, 1, 1))
    geom = Geometry.identity()
    predict = lambda x: x[..., 0]  # noqa: E731  the "network" returns its input
    settings = DetectionSettings(threshold=0.7, nms_radius_mm=2.0, max_candidates=1,
                                 log_odds=True)
    cands = detect_volume(predict, log_odds, geom, ident, settings)
    np.testing.assert_array_equal(cands.cells, [[9, 9, 9]])
    assert cands.score.dtype == np.float64 and 1 - cands.score[0] == pytest.approx(
        np.exp(-40.0), rel=1e-6)
    both = detect_volume(predict, log_odds, geom, ident,
                         dataclasses.replace(settings, max_candidates=None))
    np.testing.assert_array_equal(both.cells, [[9, 9, 9], [2, 2, 2]])
