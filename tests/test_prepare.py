"""End-to-end preparation of a LUNA16-layout folder into a store: every bad input
of the issue is skipped with its reason while the run goes on; resume after an
interruption; the CLI's exit codes; workers."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from lungjax.data import prepare as prepare_lib
from lungjax.data import synthetic
from lungjax.data.coords import voxel_to_world, world_to_voxel
from lungjax.data.io import write_scan
from lungjax.data.luna16 import Luna16Dataset
from lungjax.data.prepare import prepare_dataset
from lungjax.data.store import PatchStore, StoreError
from test_preprocess import chest_phantom, phantom_geometry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = ["1.1", "1.2", "1.3"]
BAD = {  # uid -> (what is broken, expected words in the reason)
    "2.missing_raw": "ElementDataFile points to",
    "2.nowhere": "ElementDataFile points to 'nowhere/x.raw'",
    "2.truncated": "truncated pixel data",
    "2.nan": "NaN/inf voxel",
    "2.zero_spacing": "ElementSpacing must be positive",
    "2.negative_spacing": "ElementSpacing must be positive",
    "2.no_lungs": "empty lung mask",
}


def _set_header(path, key, value):
    lines = [f"{key} = {value}" if ln.startswith(key + " ") else ln
             for ln in open(path).read().splitlines()]
    open(path, "w").write("\n".join(lines) + "\n")


def make_luna_folder(root, with_bad=True):
    """Writes a LUNA16-layout folder: three good phantom scans (one with a LUNA16 lung
    mask and a nodule mask), the bad scans of ``BAD``, and the tables (one annotation
    whose UID has no scan, one nodule outside its scan)."""
    rows, excluded, cands = [], [], []
    geom = phantom_geometry()
    for i, uid in enumerate(GOOD):
        hu, lung, nodule = chest_phantom(seed=i)
        path = root / f"subset{i}" / f"{uid}.mhd"
        write_scan(path, hu, geom)
        world = voxel_to_world(nodule, geom)
        rows.append((uid, *world, 8.0))
        excluded.append((uid, *(world + 30), -1))
        cands += [(uid, *world, 1), (uid, *(world + 5), 0), (uid, 900.0, 900.0, 900.0, 0)]
        if i == 0:
            write_scan(root / "seg-lungs-LUNA16" / f"{uid}.mhd",
                       np.where(lung, 4, 0).astype(np.uint8), geom)
            labels = np.zeros(hu.shape, np.uint8)
            c = np.rint(nodule).astype(int)
            labels[c[0] - 1:c[0] + 2, c[1] - 2:c[1] + 3, c[2] - 2:c[2] + 3] = 1
            write_scan(root / "nodule-masks" / f"{uid}.mhd", labels, geom)
    # A nodule far outside the scanned volume of 1.2.
    rows.append(("1.2", 500.0, 500.0, 500.0, 5.0))
    rows.append(("9.no_scan", 0.0, 0.0, 0.0, 5.0))
    if with_bad:
        hu, _, _ = chest_phantom(seed=9)
        for uid in BAD:
            path = root / "subset5" / f"{uid}.mhd"
            if uid == "2.nan":
                bad = hu.astype(np.float32)
                bad[3, 4, 5] = np.nan
                write_scan(path, bad, geom)
            elif uid == "2.no_lungs":
                write_scan(path, chest_phantom(lungs=False)[0], geom)
            else:
                write_scan(path, hu, geom)
            if uid == "2.missing_raw":
                os.remove(path.with_suffix(".raw"))
            elif uid == "2.nowhere":
                _set_header(path, "ElementDataFile", "nowhere/x.raw")
            elif uid == "2.truncated":
                raw = path.with_suffix(".raw")
                raw.write_bytes(raw.read_bytes()[: raw.stat().st_size // 2])
            elif uid == "2.zero_spacing":
                _set_header(path, "ElementSpacing", "1.5 0 2")
            elif uid == "2.negative_spacing":
                _set_header(path, "ElementSpacing", "1.5 1.5 -2")
    table = lambda rs, last: "seriesuid,coordX,coordY,coordZ," + last + "\n" + "".join(
        ",".join(str(v) for v in r) + "\n" for r in rs)
    (root / "annotations.csv").write_text(table(rows, "diameter_mm"))
    (root / "annotations_excluded.csv").write_text(table(excluded, "diameter_mm"))
    (root / "candidates_V2.csv").write_text(table(cands, "class"))
    return root


@pytest.fixture(scope="module")
def luna_root(tmp_path_factory):
    return make_luna_folder(tmp_path_factory.mktemp("luna"))


@pytest.fixture(scope="module")
def prepared(luna_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "st"
    report = prepare_dataset(luna_root, out, margin_mm=5.0, progress=False)
    return out, report


def test_bad_inputs_are_skipped_with_reasons(prepared):
    out, report = prepared
    assert sorted(report.done) == GOOD and report.reused == []
    assert set(report.skipped) == set(BAD)
    for uid, words in BAD.items():
        assert words in report.skipped[uid], (uid, report.skipped[uid])
        assert uid in report.skipped[uid] or "subset5" in report.skipped[uid]
    assert report.dropped_nodules == 1
    text = report.summary()
    assert "3 scan(s) prepared" in text and "7 skipped" in text
    assert "lies outside the scanned volume" in text
    assert "annotations.csv rows whose UID has no scan: 1 UID(s): 9.no_scan" in text
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert set(manifest["skipped"]) == set(BAD) and set(manifest["scans"]) == set(GOOD)


def test_store_contents_and_centre_round_trip(prepared, luna_root):
    out, _ = prepared
    st = PatchStore.open(out)
    assert st.uids() == GOOD and st.uids(folds=[1]) == ["1.2"]
    assert st.spacing_zyx == (1.0, 1.0, 1.0)
    for uid in GOOD:
        rec = st.scan(uid)
        assert len(rec.nodules_zyx) == 1
        # Annotated centre -> stored voxel -> world within half a voxel.
        v = np.rint(rec.nodules_zyx[0])
        err = np.abs(voxel_to_world(v, rec.geometry) - rec.nodules_world[0])
        assert np.all(err <= 0.5 + 1e-9)
        np.testing.assert_allclose(world_to_voxel(rec.nodules_world[0], rec.geometry),
                                   rec.nodules_zyx[0], atol=1e-9)
        patch = st.read_patch(uid, v.astype(int), (5, 5, 5))
        assert patch[2, 2, 2] > 0.6  # the solid nodule
        assert st.read_patch(uid, v.astype(int), (1, 1, 1), array="lung")[0, 0, 0] == 1
        # The candidate at (900, 900, 900) mm is outside and dropped; two remain.
        assert rec.candidates_label.tolist() == [1, 0]
        assert len(rec.excluded_diameter_mm) == 1
    first = st.scan("1.1")
    assert first.arrays == ("image", "lung", "nodules")
    assert first.transforms["lung_mask_source"] == "luna16"
    c = np.rint(first.nodules_zyx[0]).astype(int)
    assert st.read_patch("1.1", c, (1, 1, 1), array="nodules")[0, 0, 0] == 1
    assert st.scan("1.2").transforms["lung_mask_source"] == "threshold"
    # The out-of-volume nodule is not a training record but stays in the findings.
    assert len(st.scan("1.2").findings()) == 2 and len(st.scan("1.2").dropped_world) == 1


def test_rerun_skips_done_scans_and_rejects_other_settings(prepared, luna_root):
    out, _ = prepared
    report = prepare_dataset(luna_root, out, margin_mm=5.0, progress=False, subsets=[0, 1, 2])
    assert report.done == [] and sorted(report.reused) == GOOD and report.skipped == {}
    assert report.dropped_nodules == 1
    with pytest.raises(StoreError, match="store was prepared with"):
        prepare_dataset(luna_root, out, margin_mm=9.0, progress=False)


def test_source_recorded_through_links_and_updated_when_the_dataset_moved(
        prepared, luna_root, tmp_path, capsys):
    """The store records its dataset's real folder (not the link it was reached through);
    a store whose recorded dataset is gone is told where it is now by the next prepare,
    and until then a nodule's patient is each scan's own, said on stderr."""
    from lungjax.data.dense_sampling import nodule_patients

    out, _ = prepared
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["source_root"] == os.path.realpath(luna_root)
    moved = tmp_path / "st"
    shutil.copytree(out, moved)
    manifest["source_root"] = str(tmp_path / "gone" / "luna")
    (moved / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    patients = nodule_patients(PatchStore.open(moved), GOOD)
    assert all(set(patients[u]) <= {u} for u in GOOD)
    assert "source dataset" in capsys.readouterr().err
    link = tmp_path / "link"
    link.symlink_to(luna_root, target_is_directory=True)
    report = prepare_dataset(link, moved, margin_mm=5.0, progress=False)
    assert report.done == [] and sorted(report.reused) == GOOD
    assert any("is gone" in w for w in report.warnings)
    assert PatchStore.open(moved).manifest["source_root"] == os.path.realpath(luna_root)


def test_interrupted_then_resumed(luna_root, tmp_path, monkeypatch):
    out = tmp_path / "st"
    real = prepare_lib.prepare_scan
    calls = []

    def flaky(job):
        calls.append(job["uid"])
        if job["uid"] == "1.2":
            real(job)  # arrays written, but the run dies before it is recorded
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(prepare_lib, "prepare_scan", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(luna_root, out, subsets=[0, 1, 2], progress=False)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert list(manifest["scans"]) == ["1.1"]  # flushed on interruption
    monkeypatch.setattr(prepare_lib, "prepare_scan", real)
    report = prepare_dataset(luna_root, out, subsets=[0, 1, 2], progress=False)
    assert report.reused == ["1.1"] and sorted(report.done) == ["1.2", "1.3"]
    st = PatchStore.open(out)
    assert st.uids() == GOOD
    assert st.read_volume("1.2").shape == st.scan("1.2").shape_zyx
    # A recorded scan whose arrays disappeared is prepared again, not trusted.
    shutil.rmtree(out / "scans" / "1.3")
    report = prepare_dataset(luna_root, out, subsets=[0, 1, 2], progress=False)
    assert report.done == ["1.3"] and "arrays are missing" in report.summary()
    assert PatchStore.open(out).read_volume("1.3").shape == st.scan("1.3").shape_zyx


_KILL_AFTER_TWO = """
import os, signal, sys
from lungjax.data import prepare as p
real, n = p.prepare_scan, []
def killed_after_two(job):
    if len(n) == 2:  # two scans recorded: die as a preempted machine does, no cleanup
        os.kill(os.getpid(), signal.SIGKILL)
    n.append(job["uid"])
    return real(job)
p.prepare_scan = killed_after_two
p.prepare_dataset(sys.argv[2], sys.argv[1], subsets=[0, 1, 2], progress=False)
"""


def test_sigkill_loses_no_finished_scan(luna_root, tmp_path):
    """The manifest is rewritten after every scan: a SIGKILL (no finally, no flush)
    after two scans leaves both recorded, and the resumed run prepares only the third."""
    out = tmp_path / "st"
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", _KILL_AFTER_TWO, str(out), str(luna_root)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert sorted(manifest["scans"]) == GOOD[:2]
    report = prepare_dataset(luna_root, out, subsets=[0, 1, 2], progress=False)
    assert sorted(report.reused) == GOOD[:2] and report.done == GOOD[2:]


def _cli(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "data_prep", "prepare_luna16.py"),
                           *args], capture_output=True, text=True, timeout=300)


def test_cli_workers_and_exit_codes(luna_root, tmp_path):
    out = tmp_path / "cli"
    r = _cli("--root", str(luna_root), "--out", str(out), "--spacing", "3,1.5,1.5",
             "--workers", "2", "--subsets", "0,1,5", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "2 scan(s) prepared" in r.stdout and "7 skipped" in r.stdout
    assert "skipped 2.truncated: ScanReadError" in r.stdout
    st = PatchStore.open(out)
    assert st.spacing_zyx == (3.0, 1.5, 1.5) and st.uids() == ["1.1", "1.2"]
    # Only bad scans: nothing prepared -> exit code 1.
    bad_only = tmp_path / "bad"
    shutil.copytree(luna_root, bad_only, ignore=shutil.ignore_patterns("subset0", "subset1",
                                                                       "subset2"))
    r = _cli("--root", str(bad_only), "--out", str(tmp_path / "none"), "--quiet")
    assert r.returncode == 1 and "0 scan(s) prepared" in r.stdout
    r = _cli("--root", str(tmp_path / "absent"), "--out", str(tmp_path / "x"))
    assert r.returncode == 1 and "no such dataset folder" in r.stderr
    r = _cli("--root", str(luna_root), "--out", str(tmp_path / "y"), "--spacing", "1,0,1")
    assert r.returncode == 2 and "--spacing" in r.stderr


def test_tiny_generated_dataset(tmp_path_factory):
    """The generated LUNA16-format data go through the real loader and preprocessing:
    every scan prepared, every nodule kept, annotated centres land on their masks."""
    root = synthetic.generate_dataset(str(tmp_path_factory.mktemp("gen") / "tiny"), "tiny", seed=0)
    out = tmp_path_factory.mktemp("gen_store") / "st"
    report = prepare_dataset(root, out, progress=False)
    ds = Luna16Dataset.open(root)
    assert report.skipped == {} and sorted(report.done) == sorted(ds.uids)
    assert report.dropped_nodules == 0 and ds.problems == []
    st = PatchStore.open(out)
    assert sum(len(st.scan(u).nodules_zyx) for u in st.uids()) == len(ds.annotations)
    for uid in st.uids():
        rec = st.scan(uid)
        assert rec.fold == ds.fold_of(uid)
        assert rec.transforms["lung_mask_source"] == (
            "luna16" if ds.lung_mask_path(uid) else "threshold")
        for v, w in zip(rec.nodules_zyx, rec.nodules_world):
            c = np.rint(v).astype(int)
            assert np.all(np.abs(voxel_to_world(c, rec.geometry) - w) <= 0.5 + 1e-9)
            if "nodules" in rec.arrays:
                assert st.read_patch(uid, c, (3, 3, 3), array="nodules").max() > 0
            assert st.read_patch(uid, c, (3, 3, 3), array="lung").max() == 1


def test_cli_argument_parsing():
    from data_prep.prepare_luna16 import parse_args

    a = parse_args(["--root", "r", "--out", "o", "--spacing", "native", "--subsets", "0,3",
                    "--hu-window=-1000,400"])
    assert a.spacing is None and a.subsets == [0, 3] and a.hu_window == (-1000.0, 400.0)
    assert parse_args(["--root", "r", "--out", "o"]).spacing == (1.0, 1.0, 1.0)
    with pytest.raises(SystemExit):
        parse_args(["--root", "r", "--out", "o", "--workers", "0"])
