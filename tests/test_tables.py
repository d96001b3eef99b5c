import numpy as np
import pytest

from lungjax.data import tables


def test_findings_round_trip(tmp_path):
    f = tables.Findings(["a", "b"], [[1, 2, 3], [4.5, -5, 6]], [5.0, -1.0])
    tables.write_findings_csv(tmp_path / "x.csv", f)
    g = tables.read_findings_csv(tmp_path / "x.csv")
    assert g.uid.tolist() == ["a", "b"]
    np.testing.assert_allclose(g.xyz, f.xyz)
    np.testing.assert_allclose(g.diameter_mm, [5.0, -1.0])
    assert [p.name for p in tmp_path.iterdir()] == ["x.csv"]  # no temporary left behind


def test_marks_round_trip_with_extra_column(tmp_path):
    m = tables.Marks(["u"] * 3, np.arange(9).reshape(3, 3), [0.1, 0.5, 0.9])
    tables.write_marks_csv(tmp_path / "sub.csv", m, extra={"diameter_mm": [3, 4, 5]})
    header = (tmp_path / "sub.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header == "seriesuid,coordX,coordY,coordZ,probability,diameter_mm"
    r = tables.read_marks_csv(tmp_path / "sub.csv")
    np.testing.assert_allclose(r.probability, [0.1, 0.5, 0.9])
    np.testing.assert_allclose(r.xyz, m.xyz)


def test_missing_column_and_bad_number_name_the_file(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("seriesuid,coordX,coordY,probability\nu,1,2,0.5\n")
    with pytest.raises(tables.TableError, match=r"bad.csv.*coordZ"):
        tables.read_marks_csv(p)
    p.write_text("seriesuid,coordX,coordY,coordZ,probability\nu,1,2,3,high\n")
    with pytest.raises(tables.TableError, match=r"bad.csv: row 2: column 'probability'"):
        tables.read_marks_csv(p)
    with pytest.raises(FileNotFoundError, match="nothere.csv"):
        tables.read_marks_csv(tmp_path / "nothere.csv")


def test_real_luna16_tables(luna16_tables_dir):
    ann = tables.read_findings_csv(luna16_tables_dir / "annotations.csv")
    exc = tables.read_findings_csv(luna16_tables_dir / "annotations_excluded.csv")
    uids = tables.read_uid_list(luna16_tables_dir / "seriesuids.csv")
    assert len(ann) == 1186 and len(np.unique(ann.uid)) == 601
    assert len(exc) == 35192 and len(uids) == 888
    assert set(ann.uid) <= set(uids)
