"""Scan reading/writing: formats, geometry round trips, and every bad-input error."""

import os

import numpy as np
import pytest
import SimpleITK as sitk

from lungjax.data.coords import Geometry, voxel_to_world, world_to_voxel
from lungjax.data.io import ScanReadError, read_scan, write_dicom_series, write_scan

# A direction with axes permuted and flipped: catches any (x, y, z) / (z, y, x) mix-up.
ROTATED = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
# A genuinely oblique direction (30 degrees about z, then 10 about x).
_c, _s = np.cos(np.pi / 6), np.sin(np.pi / 6)
_c2, _s2 = np.cos(np.pi / 18), np.sin(np.pi / 18)
OBLIQUE = np.array([[1, 0, 0], [0, _c2, -_s2], [0, _s2, _c2]]) @ np.array(
    [[_c, -_s, 0], [_s, _c, 0], [0, 0, 1]])


def _volume(shape=(5, 6, 7), dtype=np.int16):
    return (np.arange(np.prod(shape)).reshape(shape) - 100).astype(dtype)


def _geometry(direction=ROTATED):
    return Geometry(np.array([0.7, 0.8, 1.25]), np.array([-120.5, 30.25, -310.0]), direction)


@pytest.mark.parametrize("name", ["a.mhd", "a.mha", "a.nii", "a.nii.gz"])
def test_round_trip_formats(tmp_path, name):
    array, geom = _volume(), _geometry()
    write_scan(tmp_path / name, array, geom)
    scan = read_scan(tmp_path / name)
    assert scan.array.dtype == np.int16
    np.testing.assert_array_equal(scan.array, array)
    np.testing.assert_allclose(scan.geometry.spacing, geom.spacing, rtol=1e-6)
    np.testing.assert_allclose(scan.geometry.origin, geom.origin, atol=1e-4)
    np.testing.assert_allclose(scan.geometry.direction, geom.direction, atol=1e-6)
    assert scan.path == str(tmp_path / name)
    # Atomic write leaves no temporary files behind.
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]


def test_compressed_mhd_and_float(tmp_path):
    array = _volume(dtype=np.float32) / 3
    write_scan(tmp_path / "f.mhd", array, _geometry(), compress=True)
    assert (tmp_path / "f.zraw").is_file()
    scan = read_scan(tmp_path / "f.mhd")
    assert scan.array.dtype == np.float32
    np.testing.assert_array_equal(scan.array, array)


def test_world_voxel_round_trip_on_written_mhd(tmp_path):
    """coords.py agrees with ITK's own index<->physical mapping on a real oblique file."""
    geom = _geometry(OBLIQUE)
    write_scan(tmp_path / "o.mhd", _volume(), geom)
    scan = read_scan(tmp_path / "o.mhd")
    image = sitk.ReadImage(str(tmp_path / "o.mhd"))
    rng = np.random.default_rng(0)
    voxels = rng.uniform(-2, 8, size=(20, 3))  # (z, y, x), some outside the grid
    world = voxel_to_world(voxels, scan.geometry)
    for v, w in zip(voxels, world):
        itk = image.TransformContinuousIndexToPhysicalPoint([float(t) for t in v[::-1]])
        np.testing.assert_allclose(w, itk, atol=1e-6)
    np.testing.assert_allclose(world_to_voxel(world, scan.geometry), voxels, atol=1e-9)
    # The array voxel (z, y, x) really holds the value at that world point.
    z, y, x = 3, 1, 4
    idx = image.TransformPhysicalPointToIndex(
        [float(t) for t in voxel_to_world(np.array([z, y, x]), scan.geometry)])
    assert idx == (x, y, z)
    assert scan.array[z, y, x] == image[x, y, z]


def _write_dicom(folder, array, spacing, slices=None):
    """One CT series in ``folder``, slice k at z = -100 + spacing[2] * k, only the
    ``slices`` given (default all)."""
    geom = Geometry(np.asarray(spacing), np.array([-10.0, 20.0, -100.0]), np.eye(3))
    write_dicom_series(folder, array, geom, slices=slices)


def test_dicom_series(tmp_path):
    array, spacing = _volume((4, 6, 5)), (0.7, 0.7, 2.0)
    folder = tmp_path / "dicom"
    _write_dicom(folder, array, spacing)
    scan = read_scan(folder)
    np.testing.assert_array_equal(scan.array, array)
    np.testing.assert_allclose(scan.geometry.spacing, spacing, atol=1e-4)
    np.testing.assert_allclose(scan.geometry.origin, (-10, 20, -100), atol=1e-4)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ScanReadError, match="empty_dir: no DICOM series"):
        read_scan(tmp_path / "empty_dir")


# ---------------------------------------------------------------------------
# Bad input: each error names the file and the problem.
# ---------------------------------------------------------------------------

def _edit_header(path, key, value):
    lines = path.read_text(encoding="utf-8").splitlines()
    lines = [f"{key} = {value}" if ln.startswith(key + " ") else ln for ln in lines]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def mhd(tmp_path):
    path = tmp_path / "scan.mhd"
    write_scan(path, _volume(), _geometry())
    return path


def test_missing_file(tmp_path):
    with pytest.raises(ScanReadError, match=r"nope\.mhd: no such file"):
        read_scan(tmp_path / "nope.mhd")


def test_missing_raw(mhd):
    os.remove(mhd.with_suffix(".raw"))
    with pytest.raises(ScanReadError, match=r"scan\.mhd: ElementDataFile points to 'scan\.raw'"):
        read_scan(mhd)


def test_header_pointing_nowhere(mhd):
    _edit_header(mhd, "ElementDataFile", "elsewhere/missing.raw")
    with pytest.raises(ScanReadError, match=r"scan\.mhd: ElementDataFile .*missing\.raw.* not exist"):
        read_scan(mhd)


def test_truncated_raw(mhd):
    raw = mhd.with_suffix(".raw")
    raw.write_bytes(raw.read_bytes()[:-10])
    with pytest.raises(ScanReadError, match=r"scan\.raw: truncated pixel data: 410 bytes, "
                                            r"expected 420"):
        read_scan(mhd)


def test_truncated_mha(tmp_path):
    path = tmp_path / "t.mha"
    write_scan(path, _volume(), _geometry())
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ScanReadError, match="truncated pixel data"):
        read_scan(path)


def test_nan_voxels(tmp_path):
    array = _volume(dtype=np.float32)
    array[2, 3, 4] = np.nan
    write_scan(tmp_path / "n.mhd", array, _geometry())
    with pytest.raises(ScanReadError, match=r"n\.mhd: 1 NaN/inf voxel\(s\), first at \(z, y, x\) "
                                            r"= \(2, 3, 4\)"):
        read_scan(tmp_path / "n.mhd")


@pytest.mark.parametrize("spacing", ["0.7 0 1.25", "0.7 0.8 -1.25"])
def test_bad_spacing_mhd(mhd, spacing):
    _edit_header(mhd, "ElementSpacing", spacing)
    with pytest.raises(ScanReadError, match=r"scan\.mhd: ElementSpacing must be positive"):
        read_scan(mhd)


def test_bad_spacing_nifti(tmp_path):
    path = tmp_path / "z.nii"
    write_scan(path, _volume(), _geometry())
    data = bytearray(path.read_bytes())
    data[80:84] = np.float32(0.0).tobytes()  # pixdim[1]
    path.write_bytes(bytes(data))
    with pytest.raises(ScanReadError, match=r"z\.nii: pixdim must be positive"):
        read_scan(path)


def test_not_3d(tmp_path):
    image = sitk.GetImageFromArray(np.zeros((4, 5), np.int16))
    sitk.WriteImage(image, str(tmp_path / "flat.mhd"))
    with pytest.raises(ScanReadError, match=r"flat\.mhd: expected a 3-D image"):
        read_scan(tmp_path / "flat.mhd")
    sitk.WriteImage(image, str(tmp_path / "flat.nii.gz"))
    with pytest.raises(ScanReadError, match=r"flat\.nii\.gz: expected a 3-D image"):
        read_scan(tmp_path / "flat.nii.gz")


def test_unsupported_suffix(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(ScanReadError, match="unsupported scan format"):
        read_scan(tmp_path / "x.png")


def test_raw_longer_than_the_header_says(mhd):
    """A DimSize smaller than the .raw holds would be read skewed: refused, both ways."""
    _edit_header(mhd, "DimSize", "7 6 4")  # x y z: one slice fewer than the 420-byte .raw
    with pytest.raises(ScanReadError, match=r"scan\.raw: 420 bytes of pixel data, 84 more "
                                            r"than the header describes"):
        read_scan(mhd)


def test_header_size_is_skipped(mhd):
    raw = mhd.with_suffix(".raw")
    raw.write_bytes(b"\0" * 16 + raw.read_bytes())
    with pytest.raises(ScanReadError, match="16 more than the header describes"):
        read_scan(mhd)
    lines = mhd.read_text(encoding="utf-8").splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("ElementDataFile"))
    mhd.write_text("\n".join(lines[:at] + ["HeaderSize = 16"] + lines[at:]) + "\n")
    np.testing.assert_array_equal(read_scan(mhd).array, _volume())


def test_mha_with_trailing_bytes(tmp_path):
    path = tmp_path / "a.mha"
    write_scan(path, _volume(), _geometry())
    path.write_bytes(path.read_bytes() + b"\0\0")
    with pytest.raises(ScanReadError, match=r"a\.mha: .*2 more than the header describes"):
        read_scan(path)


@pytest.mark.parametrize("delta", [-6, 8])
def test_nifti_data_size_must_match_the_header(tmp_path, delta):
    path = tmp_path / "a.nii"
    write_scan(path, _volume(), _geometry())
    data = path.read_bytes()
    path.write_bytes(data[:delta] if delta < 0 else data + b"\0" * delta)
    with pytest.raises(ScanReadError, match=r"a\.nii: (truncated NIfTI data|8 bytes more)"):
        read_scan(path)


def test_dicom_series_with_a_missing_slice(tmp_path):
    array = _volume((5, 6, 5))
    _write_dicom(tmp_path / "gap", array, (0.7, 0.7, 2.0), slices=(0, 1, 3, 4))
    with pytest.raises(ScanReadError, match=r"gap: series .* not equally spaced: slices at "
                                            r"-98\.00 and -94\.00 mm are 4\.00 mm apart"):
        read_scan(tmp_path / "gap")


def test_a_folder_without_dicom_has_no_series_and_prints_nothing(tmp_path, capfd):
    """ITK's "No Series were found" warning is an answer here (a folder of .mhd scans the
    predict command searches), not a message for the user."""
    from lungjax.data.io import list_dicom_series

    write_scan(str(tmp_path / "a.mhd"), np.zeros((2, 3, 4), np.int16),
               Geometry(np.ones(3), np.zeros(3), np.eye(3)))
    assert list_dicom_series(str(tmp_path)) == []
    assert "No Series" not in capfd.readouterr().err
    assert sitk.ProcessObject.GetGlobalWarningDisplay()  # restored for everyone else
