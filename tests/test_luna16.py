"""LUNA16 layout discovery and the real reference tables."""

import numpy as np
import pytest

from lungjax.data.coords import Geometry
from lungjax.data.io import write_scan
from lungjax.data.luna16 import Luna16Dataset, read_candidates_csv
from lungjax.data.tables import TableError


def test_real_reference_tables(luna16_tables_dir):
    ds = Luna16Dataset.open(luna16_tables_dir, require_scans=False)
    assert len(ds.annotations) == 1186
    assert len(set(ds.annotations.uid.tolist())) == 601
    assert len(ds.excluded) == 35192
    assert len(ds.seriesuids) == 888 and len(set(ds.seriesuids)) == 888
    # Every annotated and excluded scan is one of the 888 challenge scans.
    assert set(ds.annotations.uid.tolist()) <= set(ds.seriesuids)
    assert set(ds.excluded.uid.tolist()) <= set(ds.seriesuids)
    assert ds.annotations.diameter_mm.min() >= 3.0
    assert ds.uids == [] and ds.problems == []


def test_real_tables_without_scans_are_rejected_by_default(luna16_tables_dir):
    with pytest.raises(FileNotFoundError, match="no scans found"):
        Luna16Dataset.open(luna16_tables_dir)


def _tiny(path):
    write_scan(path, np.zeros((2, 3, 4), np.int16), Geometry.identity())


def test_layout_folds_masks_and_problems(tmp_path):
    for fold, uid in ((0, "1.2.3"), (3, "1.2.4"), (3, "1.2.5")):
        _tiny(tmp_path / f"subset{fold}" / f"{uid}.mhd")
    _tiny(tmp_path / "subset9" / "1.2.3.mhd")  # duplicate of a subset0 scan
    _tiny(tmp_path / "seg-lungs-LUNA16" / "1.2.4.mhd")
    _tiny(tmp_path / "nodule-masks" / "1.2.5.mhd")
    (tmp_path / "subset4").mkdir()
    (tmp_path / "annotations.csv").write_text(
        "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
        "1.2.3,1,2,3,5.5\n1.2.4,4,5,6,7\n9.9.9,0,0,0,4\n")
    (tmp_path / "annotations_excluded.csv").write_text(
        "seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2.5,1,1,1,-1\n")
    (tmp_path / "candidates_V2.csv").write_text(
        "seriesuid,coordX,coordY,coordZ,class\n1.2.3,1,2,3,1\n1.2.3,7,8,9,0\n1.2.5,0,0,0,0\n")
    (tmp_path / "seriesuids.csv").write_text("1.2.3\n1.2.4\n8.8.8\n")

    ds = Luna16Dataset.open(tmp_path)
    assert ds.uids == ["1.2.3", "1.2.4", "1.2.5"]
    assert [ds.fold_of(u) for u in ds.uids] == [0, 3, 3]
    assert ds.uids_in_folds([3]) == ["1.2.4", "1.2.5"]
    assert ds.scan_path("1.2.4").endswith("subset3/1.2.4.mhd")
    assert ds.lung_mask_path("1.2.4").endswith("seg-lungs-LUNA16/1.2.4.mhd")
    assert ds.lung_mask_path("1.2.3") is None
    assert ds.nodule_mask_path("1.2.5").endswith("nodule-masks/1.2.5.mhd")
    assert len(ds.annotations) == 3 and len(ds.excluded) == 1
    np.testing.assert_array_equal(ds.candidates.for_uid("1.2.3").label, [1, 0])
    problems = "\n".join(ds.problems)
    assert "annotations.csv rows whose UID has no scan: 1 UID(s): 9.9.9" in problems
    assert "seriesuids.csv UIDs with no scan: 1 UID(s): 8.8.8" in problems
    assert "scans not listed in seriesuids.csv: 1 UID(s): 1.2.5" in problems
    assert "more than one subset" in problems and "1.2.3" in problems
    with pytest.raises(KeyError, match="no scan '7.7'"):
        ds.fold_of("7.7")


def test_missing_annotations_and_bad_candidates(tmp_path):
    _tiny(tmp_path / "subset0" / "1.mhd")
    with pytest.raises(FileNotFoundError, match="annotations.csv: no such file"):
        Luna16Dataset.open(tmp_path)
    (tmp_path / "c.csv").write_text("seriesuid,coordX,coordY,coordZ,class\n1,a,2,3,0\n")
    with pytest.raises(TableError, match=r"c\.csv: row 2"):
        read_candidates_csv(tmp_path / "c.csv")
    (tmp_path / "c.csv").write_text("seriesuid,coordX,coordY,coordZ\n")
    with pytest.raises(TableError, match=r"missing column\(s\) \['class'\]"):
        read_candidates_csv(tmp_path / "c.csv")
