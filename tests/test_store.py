"""Patch store: zarr writes, patch/volume reads, addressing and manifest checks."""

import json
import os
import pickle

import numpy as np
import pytest

from lungjax.data import store as S
from lungjax.data.coords import Geometry, voxel_to_world


def _record(uid, fold, shape, arrays=("image", "lung")):
    geom = Geometry(np.array([0.9, 1.0, 1.1]), np.array([-10.0, 20.0, -300.0]), np.eye(3))
    z3 = np.zeros((0, 3))
    cand = np.array([[1.0, 2.0, 3.0], [4.5, 5.0, 6.0]])
    return S.ScanRecord(
        uid=uid, fold=fold, shape_zyx=shape, geometry=geom, arrays=arrays,
        nodules_zyx=np.array([[5.0, 6.0, 7.0]]), nodules_world=voxel_to_world([[5.0, 6, 7]], geom),
        nodule_diameter_mm=np.array([6.0]), dropped_world=np.array([[0.0, 0, 0]]),
        dropped_diameter_mm=np.array([4.0]), excluded_zyx=z3, excluded_world=z3,
        excluded_diameter_mm=np.zeros(0), candidates_zyx=cand,
        candidates_world=voxel_to_world(cand, geom), candidates_label=np.array([1, 0]),
        transforms={"crop_start_zyx": [1, 2, 3]})


@pytest.fixture(scope="module")
def volumes():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 50, 45), dtype=np.uint8)
    b = rng.integers(0, 256, (20, 33, 70), dtype=np.uint8)
    return {"s.1": a, "s.2": b}


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, volumes):
    root = tmp_path_factory.mktemp("store")
    scans = {}
    for fold, (uid, image) in enumerate(volumes.items()):
        arrays = {"image": image, "lung": (image > 128).astype(np.uint8)}
        if uid == "s.2":
            arrays["nodules"] = (image > 250).astype(np.uint8) * 3
        S.write_scan_arrays(root, uid, arrays, chunk=16)
        scans[uid] = _record(uid, fold * 2, image.shape, tuple(arrays)).to_json()
    S.write_manifest(root, {"format": S.STORE_FORMAT, "version": S.STORE_VERSION,
                            "spacing_zyx": [1.1, 1.0, 0.9], "hu_window": [-1200, 600],
                            "scans": scans})
    return root


def test_open_and_records(store_dir):
    st = S.PatchStore.open(store_dir)
    assert len(st) == 2 and st.uids() == ["s.1", "s.2"] and st.uids(folds=[2]) == ["s.2"]
    assert st.spacing_zyx == (1.1, 1.0, 0.9) and st.hu_window == (-1200.0, 600.0)
    rec = st.scan("s.2")
    assert rec.shape_zyx == (20, 33, 70) and rec.arrays == ("image", "lung", "nodules")
    assert rec.crop_start_zyx == (1, 2, 3)
    # Candidate world positions are rebuilt from voxels exactly.
    np.testing.assert_allclose(rec.candidates_world, voxel_to_world(rec.candidates_zyx,
                                                                    rec.geometry), atol=1e-12)
    f = rec.findings()
    assert len(f) == 2 and set(f.uid) == {"s.2"}  # the dropped nodule is kept for evaluation
    assert len(rec.findings(include_dropped=False)) == 1
    assert len(st.findings()) == 4 and len(st.excluded()) == 0
    with pytest.raises(KeyError, match="no scan 'x'"):
        st.scan("x")


def test_read_volume_and_patches(store_dir, volumes):
    st = S.PatchStore.open(store_dir)
    img = volumes["s.1"]
    vol = st.read_volume("s.1")
    assert vol.dtype == np.float32 and vol.shape == img.shape
    np.testing.assert_allclose(vol, img / 255.0, atol=1e-7)
    rng = np.random.default_rng(1)
    for _ in range(20):
        size = rng.integers(1, 30, 3)
        center = rng.integers(-10, np.asarray(img.shape) + 10)
        patch = st.read_patch("s.1", center, size)
        # Reference: pad the full volume with zeros and slice.
        pad = 50
        padded = np.pad(vol, pad)
        start = center - size // 2 + pad
        expected = padded[start[0]:start[0] + size[0], start[1]:start[1] + size[1],
                          start[2]:start[2] + size[2]]
        np.testing.assert_array_equal(patch, expected)
    lung = st.read_patch("s.1", (20, 25, 22), (4, 4, 4), array="lung")
    np.testing.assert_array_equal(lung, (img[18:22, 23:27, 20:24] > 128).astype(np.float32))
    nod = st.read_volume("s.2", "nodules")
    assert set(np.unique(nod).tolist()) <= {0.0, 3.0}
    # Entirely outside: zeros, no read.
    assert not st.read_patch("s.1", (-100, 0, 0), (8, 8, 8)).any()
    with pytest.raises(KeyError, match="no array 'nodules'"):
        st.read_patch("s.1", (0, 0, 0), (2, 2, 2), array="nodules")
    with pytest.raises(ValueError, match="integer voxels"):
        st.read_patch("s.1", (0.5, 0, 0), (2, 2, 2))


def test_pickle_and_file_url(store_dir, volumes):
    st = S.PatchStore.open("file://" + str(store_dir))
    st.read_patch("s.2", (5, 5, 5), (3, 3, 3))
    clone = pickle.loads(pickle.dumps(st))
    np.testing.assert_array_equal(clone.read_patch("s.2", (10, 16, 35), (8, 8, 8)),
                                  st.read_patch("s.2", (10, 16, 35), (8, 8, 8)))


def test_kvstore_specs():
    assert S.kvstore_spec("gs://bucket/a/b", "scans/") == {
        "driver": "gcs", "bucket": "bucket", "path": "a/b/scans/"}
    assert S.kvstore_spec("s3://bkt", "m") == {"driver": "s3", "bucket": "bkt", "path": "m"}
    assert S.kvstore_spec("file:///x/y/")["path"] == "/x/y/"
    assert S.kvstore_spec("rel/dir")["path"] == os.path.abspath("rel/dir") + "/"
    assert S.scan_arrays_present("gs://b/x", "u", ["image"])
    with pytest.raises(S.StoreError, match="unsupported store URL scheme 'ftp'"):
        S.kvstore_spec("ftp://host/x")
    with pytest.raises(S.StoreError, match="not allowed"):
        S.check_uid("../evil")


def test_manifest_errors(tmp_path):
    with pytest.raises(S.StoreError, match="no manifest.json; not a prepared store"):
        S.PatchStore.open(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(S.StoreError, match="manifest.json: not valid JSON"):
        S.PatchStore.open(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": S.STORE_FORMAT, "version": 99}))
    with pytest.raises(S.StoreError, match="store version 99"):
        S.PatchStore.open(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"format": S.STORE_FORMAT, "version": S.STORE_VERSION, "scans": {"a": {"uid": "a"}}}))
    with pytest.raises(S.StoreError, match="record for 'a' is malformed"):
        S.PatchStore.open(tmp_path)


def test_rewriting_a_scan_replaces_stale_arrays(tmp_path):
    S.write_scan_arrays(tmp_path, "u", {"image": np.ones((4, 4, 4), np.uint8),
                                        "nodules": np.ones((4, 4, 4), np.uint8)})
    S.write_scan_arrays(tmp_path, "u", {"image": np.full((5, 4, 4), 7, np.uint8)})
    assert not (tmp_path / "scans" / "u" / "nodules" / ".zarray").exists()
    assert (tmp_path / "scans" / "u" / "image" / ".zarray").exists()
