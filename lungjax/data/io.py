"""Reading and writing CT scans: MetaImage (.mhd/.raw, .mha), NIfTI and DICOM series.

Everything goes through SimpleITK, but headers are checked by this module first:
SimpleITK may crash or read garbage on a truncated .raw file, and it silently
replaces a zero or negative spacing by 1 mm, so a bad scan would otherwise flow on
into training with a wrong geometry. Every problem raises :class:`ScanReadError`
whose message starts with the offending file.

Arrays are (z, y, x) as SimpleITK returns them; geometry is a
:class:`lungjax.data.coords.Geometry` (ITK x, y, z order).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import shutil
import struct
import tempfile
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from lungjax import fileio
from lungjax.data.coords import Geometry

METAIMAGE_SUFFIXES = (".mhd", ".mha")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SUPPORTED_SUFFIXES = METAIMAGE_SUFFIXES + NIFTI_SUFFIXES

# Bytes per element of the MetaImage element types (MetaIO's own table).
_MET_ELEMENT_BYTES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4,
    "MET_UINT": 4, "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8,
    "MET_FLOAT": 4, "MET_DOUBLE": 8,
}
_INT16_INFO = np.iinfo(np.int16)


class ScanReadError(ValueError):
    """A scan cannot be read or is not a valid 3-D CT volume; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Scan:
    """A CT volume with its placement in world space.

    Attributes:
      array: (z, y, x) int16 (integer sources whose values fit) or float32, in HU for CT.
      geometry: spacing / origin / direction of the voxel grid (ITK x, y, z order).
      path: the file or DICOM directory it was read from ("" if built in memory).
    """

    array: np.ndarray
    geometry: Geometry
    path: str = ""

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)

    def to_sitk(self) -> sitk.Image:
        """The scan as a ``SimpleITK.Image`` (copies the array)."""
        image = sitk.GetImageFromArray(self.array)
        self.geometry.apply_to_sitk(image)
        return image


def scan_suffix(path: str) -> str:
    """The scan format suffix of ``path``, lower case (".nii.gz" as one suffix)."""
    lower = path.lower()
    for s in (".nii.gz",) + METAIMAGE_SUFFIXES + (".nii",):
        if lower.endswith(s):
            return s
    return os.path.splitext(lower)[1]


# ---------------------------------------------------------------------------
# Header checks done before SimpleITK sees the file.
# ---------------------------------------------------------------------------

def read_metaimage_header(path: str) -> tuple[dict[str, str], int]:
    """Parses a MetaImage header.

    Args:
      path: .mhd or .mha file.

    Returns:
      (fields, header_bytes): the ``key = value`` fields (keys as written) and the byte
      length of the header (where LOCAL pixel data start in a .mha file).

    Raises:
      ScanReadError: the file is missing or is not a MetaImage header.
    """
    if not os.path.isfile(path):
        raise ScanReadError(f"{path}: no such file")
    fields: dict[str, str] = {}
    offset = 0
    with open(path, "rb") as f:
        for raw_line in f:
            offset += len(raw_line)
            line = raw_line.decode("latin-1").strip()
            if not line:
                continue
            if "=" not in line:
                raise ScanReadError(f"{path}: not a MetaImage header (line {line[:60]!r})")
            key, value = (s.strip() for s in line.split("=", 1))
            fields[key] = value
            # ElementDataFile is always the last header field; pixel data may follow.
            if key == "ElementDataFile":
                break
            if offset > 1 << 20:
                raise ScanReadError(f"{path}: no ElementDataFile field in the first MiB")
    if "ElementDataFile" not in fields:
        raise ScanReadError(f"{path}: header has no ElementDataFile field")
    return fields, offset


def _floats(path: str, fields: dict, key: str) -> np.ndarray:
    try:
        return np.asarray([float(v) for v in fields[key].split()], np.float64)
    except ValueError:
        raise ScanReadError(f"{path}: header field {key} is not numeric: {fields[key]!r}")


def _check_spacing(path: str, spacing, field: str) -> None:
    spacing = np.asarray(spacing, np.float64)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ScanReadError(f"{path}: {field} must be positive, got {spacing.tolist()}")


def check_metaimage(path: str) -> None:
    """Validates a MetaImage header and its pixel data size before reading.

    Checks: 3 dimensions, positive spacing, the data file exists and holds exactly
    DimSize x element size x channels bytes after its ``HeaderSize`` (uncompressed data
    only; ``HeaderSize = -1``, data at the end of the file, needs at least that many).
    Too few bytes is a truncated file; too many means the header's DimSize or ElementType
    does not describe the data, which would be read skewed.

    Raises:
      ScanReadError: naming the file and the problem.
    """
    fields, header_bytes = read_metaimage_header(path)
    ndims = int(_floats(path, fields, "NDims")[0]) if "NDims" in fields else None
    if "DimSize" not in fields:
        raise ScanReadError(f"{path}: header has no DimSize field")
    dims = _floats(path, fields, "DimSize").astype(np.int64)
    if ndims is not None and ndims != len(dims):
        raise ScanReadError(f"{path}: NDims = {ndims} but DimSize has {len(dims)} values")
    if len(dims) != 3:
        raise ScanReadError(f"{path}: expected a 3-D image, header has NDims = {len(dims)}")
    if np.any(dims <= 0):
        raise ScanReadError(f"{path}: DimSize must be positive, got {dims.tolist()}")
    spacing_key = "ElementSpacing" if "ElementSpacing" in fields else (
        "ElementSize" if "ElementSize" in fields else None)
    if spacing_key is not None:
        spacing = _floats(path, fields, spacing_key)
        if len(spacing) != 3:
            raise ScanReadError(f"{path}: {spacing_key} has {len(spacing)} values, expected 3")
        _check_spacing(path, spacing, spacing_key)
    etype = fields.get("ElementType", "")
    if etype not in _MET_ELEMENT_BYTES:
        raise ScanReadError(f"{path}: unsupported ElementType {etype!r}")
    channels = int(fields.get("ElementNumberOfChannels", "1"))
    expected = int(np.prod(dims)) * _MET_ELEMENT_BYTES[etype] * channels
    compressed = fields.get("CompressedData", "False").lower() == "true"

    data_name = fields["ElementDataFile"]
    if data_name.upper() == "LOCAL":
        data_path, available = path, os.path.getsize(path) - header_bytes
    elif data_name.upper().startswith("LIST") or "%" in data_name:
        return  # Slice-per-file layouts: SimpleITK checks each file itself.
    else:
        data_path = os.path.join(os.path.dirname(path), data_name)
        if not os.path.isfile(data_path):
            raise ScanReadError(
                f"{path}: ElementDataFile points to {data_name!r}, which does not exist "
                f"(looked for {data_path})")
        available = os.path.getsize(data_path)
    skip = int(_floats(path, fields, "HeaderSize")[0]) if "HeaderSize" in fields else 0
    if skip > 0:
        available -= skip
    if compressed:
        if "CompressedDataSize" in fields:
            need = int(_floats(path, fields, "CompressedDataSize")[0])
            if available < need:
                raise ScanReadError(f"{data_path}: truncated compressed data: {available} bytes, "
                                    f"header says {need}")
        return
    what = (f"(DimSize {dims.tolist()} x {etype} x {channels} channel(s)"
            + (f" after HeaderSize {skip}" if skip > 0 else "") + ")")
    if available < expected:
        raise ScanReadError(
            f"{data_path}: truncated pixel data: {available} bytes, expected {expected} {what}")
    if available > expected and skip != -1:
        raise ScanReadError(
            f"{data_path}: {available} bytes of pixel data, {available - expected} more than "
            f"the header describes {what}; the header does not match the data")


def check_nifti(path: str) -> None:
    """Validates a NIfTI-1/2 header (dimensions and pixdim) before reading.

    Raises:
      ScanReadError: naming the file and the problem.
    """
    if not os.path.isfile(path):
        raise ScanReadError(f"{path}: no such file")
    opener = gzip.open if path.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(540)
    except (OSError, EOFError) as e:
        raise ScanReadError(f"{path}: cannot read NIfTI header: {e}")
    if len(head) < 348:
        raise ScanReadError(f"{path}: truncated NIfTI header ({len(head)} bytes)")
    for endian in "<>":
        size = struct.unpack(endian + "i", head[:4])[0]
        if size == 348:
            dim = struct.unpack(endian + "8h", head[40:56])
            pixdim = struct.unpack(endian + "8f", head[76:108])
            break
        if size == 540 and len(head) >= 540:
            dim = struct.unpack(endian + "8q", head[16:80])
            pixdim = struct.unpack(endian + "8d", head[104:168])
            break
    else:
        raise ScanReadError(f"{path}: not a NIfTI file (bad sizeof_hdr)")
    ndim = dim[0]
    extra = [d for d in dim[4:1 + ndim] if d != 1] if ndim > 3 else []
    if ndim < 3 or extra:
        raise ScanReadError(f"{path}: expected a 3-D image, NIfTI dim = {list(dim[:1 + ndim])}")
    if min(dim[1:4]) <= 0:
        raise ScanReadError(f"{path}: NIfTI dim must be positive, got {list(dim[1:4])}")
    _check_spacing(path, pixdim[1:4], "pixdim")
    if opener is open:  # uncompressed: the voxel data must fill the file exactly
        if size == 348:
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
        else:
            bitpix = struct.unpack(endian + "h", head[14:16])[0]
            offset = struct.unpack(endian + "q", head[168:176])[0]
        expected = offset + int(np.prod(dim[1:4], dtype=np.int64)) * bitpix // 8
        have = os.path.getsize(path)
        if have < expected:
            raise ScanReadError(f"{path}: truncated NIfTI data: {have} bytes, expected "
                                f"{expected} (dim {list(dim[1:4])} x {bitpix} bits from "
                                f"vox_offset {offset})")
        if have > expected:
            raise ScanReadError(f"{path}: {have - expected} bytes more than the header "
                                f"describes (dim {list(dim[1:4])} x {bitpix} bits from "
                                f"vox_offset {offset}); the header does not match the data")


# ---------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------

def _to_array(image: sitk.Image, path: str) -> np.ndarray:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ScanReadError(f"{path}: expected a scalar image, got "
                            f"{image.GetNumberOfComponentsPerPixel()} components per voxel")
    array = sitk.GetArrayFromImage(image)
    if np.issubdtype(array.dtype, np.floating):
        bad = ~np.isfinite(array)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ScanReadError(f"{path}: {int(bad.sum())} NaN/inf voxel(s), first at (z, y, x) "
                                f"= {first}")
        return array.astype(np.float32, copy=False)
    if array.dtype == np.int16:
        return array
    if array.size and (array.min() < _INT16_INFO.min or array.max() > _INT16_INFO.max):
        return array.astype(np.float32)
    return array.astype(np.int16)


def _from_image(image: sitk.Image, path: str) -> Scan:
    if image.GetDimension() != 3:
        raise ScanReadError(f"{path}: expected a 3-D image, got {image.GetDimension()}-D")
    _check_spacing(path, image.GetSpacing(), "spacing")
    try:
        geometry = Geometry.from_sitk(image)
    except ValueError as e:
        raise ScanReadError(f"{path}: bad geometry: {e}")
    return Scan(_to_array(image, path), geometry, path)


def list_dicom_series(directory: str) -> list[str]:
    """Series instance UIDs of the DICOM series in ``directory`` (not recursive)."""
    # ITK warns "No Series were found" on stderr for a folder of .mhd files: here that is
    # an answer (an empty list), not something to show the user.
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(directory))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def dicom_series_sizes(directory: str) -> dict[str, int]:
    """{series instance UID: number of slice files} of the DICOM series in ``directory``
    (not recursive), largest first (ties: SimpleITK's order)."""
    sizes = {u: len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(directory, u))
             for u in list_dicom_series(directory)}
    return dict(sorted(sizes.items(), key=lambda kv: -kv[1]))


def _check_slice_positions(directory: str, series_uid: str, files) -> None:
    """One DICOM series is a stack of equally spaced slices: positions along the slice
    normal (ImagePositionPatient . normal of ImageOrientationPatient) differ by one
    spacing, none repeated, none missing (a gap would be read as contiguous anatomy)."""
    pos, normal = [], None
    for f in files:
        r = sitk.ImageFileReader()
        r.SetFileName(f)
        try:
            r.ReadImageInformation()
            ipp = [float(v) for v in r.GetMetaData("0020|0032").split("\\")]
            iop = [float(v) for v in r.GetMetaData("0020|0037").split("\\")]
        except (RuntimeError, ValueError):
            return  # no position tags: SimpleITK orders the slices by file order alone
        if normal is None:
            normal = np.cross(iop[:3], iop[3:6])
        pos.append(float(np.dot(ipp, normal)))
    z = np.sort(np.asarray(pos))
    steps = np.diff(z)
    if np.any(steps < 1e-3):
        raise ScanReadError(f"{directory}: series {series_uid} has {int(np.sum(steps < 1e-3))} "
                            "slice(s) at a repeated position")
    step = float(np.median(steps))
    bad = np.flatnonzero(np.abs(steps - step) > 0.05 * step + 0.01)
    if bad.size:
        i = int(bad[0])
        raise ScanReadError(
            f"{directory}: series {series_uid} is not equally spaced: slices at "
            f"{z[i]:.2f} and {z[i + 1]:.2f} mm are {steps[i]:.2f} mm apart, the others "
            f"{step:.2f} mm ({bad.size} such gap(s); a missing slice?)")


def _read_dicom(directory: str, series_uid: str | None) -> Scan:
    series = list_dicom_series(directory)
    if not series:
        raise ScanReadError(f"{directory}: no DICOM series found")
    if series_uid is None:
        if len(series) > 1:
            raise ScanReadError(f"{directory}: {len(series)} DICOM series found, pass "
                                f"series_uid= one of {series}")
        series_uid = series[0]
    elif series_uid not in series:
        raise ScanReadError(f"{directory}: no DICOM series {series_uid!r}; found {series}")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(directory, series_uid)
    if len(files) < 2:
        raise ScanReadError(f"{directory}: series {series_uid} has {len(files)} slice(s); "
                            "a 3-D scan needs at least 2")
    _check_slice_positions(directory, series_uid, files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise ScanReadError(f"{directory}: SimpleITK cannot read series {series_uid}: "
                            f"{str(e).strip().splitlines()[-1]}")
    return _from_image(image, directory)


def read_scan(path: str | os.PathLike, *, series_uid: str | None = None) -> Scan:
    """Reads a CT scan.

    Args:
      path: a .mhd (with its .raw), .mha, .nii or .nii.gz file, or a directory holding
        one DICOM series.
      series_uid: which series to read when a DICOM directory holds several.

    Returns:
      :class:`Scan` with the (z, y, x) array (int16 for integer data that fit, else
      float32) and its geometry.

    Raises:
      ScanReadError: missing file, header pointing to a missing or truncated data file,
        NaN voxels, zero/negative spacing, non-3-D image, unreadable data; the message
        names the file.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return _read_dicom(path, series_uid)
    if not os.path.exists(path):
        raise ScanReadError(f"{path}: no such file")
    suffix = scan_suffix(path)
    if suffix in METAIMAGE_SUFFIXES:
        check_metaimage(path)
    elif suffix in NIFTI_SUFFIXES:
        check_nifti(path)
    else:
        raise ScanReadError(f"{path}: unsupported scan format {suffix!r}; expected one of "
                            f"{list(SUPPORTED_SUFFIXES)} or a DICOM directory")
    try:
        image = sitk.ReadImage(path)
    except RuntimeError as e:
        raise ScanReadError(f"{path}: SimpleITK cannot read it: "
                            f"{str(e).strip().splitlines()[-1]}")
    return _from_image(image, path)


# ---------------------------------------------------------------------------
# Writing.
# ---------------------------------------------------------------------------

def write_scan(path: str | os.PathLike, array_zyx: np.ndarray, geometry: Geometry,
               compress: bool = False) -> None:
    """Writes a volume atomically (.mhd writes the .mhd header and its .raw/.zraw data).

    All files are first written into a temporary folder next to ``path`` and then
    renamed into place, data file(s) before the header, so a reader never finds a
    header whose data are incomplete.

    Args:
      path: destination .mhd, .mha, .nii or .nii.gz file.
      array_zyx: (z, y, x) array (any numeric dtype SimpleITK accepts; int16 for HU).
      geometry: placement of the grid.
      compress: compress the pixel data (.zraw for .mhd; gzip for .nii is set by the
        suffix).
    """
    path = os.fspath(path)
    array_zyx = np.asarray(array_zyx)
    if array_zyx.ndim != 3:
        raise ValueError(f"{path}: expected a (z, y, x) array, got shape {array_zyx.shape}")
    if scan_suffix(path) not in SUPPORTED_SUFFIXES:
        raise ValueError(f"{path}: unsupported suffix; expected one of {list(SUPPORTED_SUFFIXES)}")
    if array_zyx.dtype == np.bool_:
        array_zyx = array_zyx.astype(np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx))
    geometry.apply_to_sitk(image)
    if fileio.is_url(path):  # written here, then each file uploaded
        fs, key = fileio.url_filesystem(path)
        directory, name = os.path.dirname(key), os.path.basename(key)
        tmp_dir = tempfile.mkdtemp(prefix="lungjax-upload-")
        place = fs.put_file
    else:
        path = fileio.local_path(path)
        directory, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
        os.makedirs(directory, exist_ok=True)
        tmp_dir = tempfile.mkdtemp(dir=directory, prefix=".tmp-write-")
        place = os.replace
    try:
        sitk.WriteImage(image, os.path.join(tmp_dir, name), useCompression=compress)
        produced = sorted(os.listdir(tmp_dir), key=lambda n: n == name)  # header last
        for n in produced:
            place(os.path.join(tmp_dir, n), os.path.join(directory, n))
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def write_dicom_series(folder: str | os.PathLike, array_zyx: np.ndarray, geometry: Geometry,
                       *, slices: Sequence[int] | None = None,
                       series_uid: str = "1.2.826.0.1.3680043.2.1125.1") -> None:
    """Writes an axial CT series, one DICOM file per slice (``<k>.dcm``), into ``folder``.

    Tags set: modality CT, the series UID, ImageOrientationPatient (identity),
    ImagePositionPatient (slice k at ``origin + k * spacing_z`` along z), InstanceNumber
    and PixelSpacing. The folder is written under a temporary name and renamed, so a
    reader never sees half a series.

    Args:
      folder: the series folder (must not exist).
      array_zyx: (z, y, x) array, written as int16.
      geometry: its grid; an axis-aligned direction only.
      slices: which slices to write (default all; a subset makes a series with gaps).
      series_uid: SeriesInstanceUID of every file.

    Raises:
      ValueError: an oblique or flipped direction, or a non-3-D array.
    """
    folder = os.fspath(folder)
    array_zyx = np.asarray(array_zyx)
    if array_zyx.ndim != 3:
        raise ValueError(f"{folder}: expected a (z, y, x) array, got shape {array_zyx.shape}")
    if not np.allclose(geometry.direction, np.eye(3)):
        raise ValueError(f"{folder}: only an identity direction is written as DICOM here")
    sx, sy, sz = (float(v) for v in geometry.spacing)
    ox, oy, oz = (float(v) for v in geometry.origin)
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(dir=parent, prefix=".tmp-dicom-")
    try:
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        for k in range(array_zyx.shape[0]) if slices is None else slices:
            sl = sitk.GetImageFromArray(array_zyx[k].astype(np.int16))
            sl.SetSpacing((sx, sy))
            for tag, value in (("0008|0060", "CT"), ("0020|000e", series_uid),
                               ("0020|0037", "1\\0\\0\\0\\1\\0"),
                               ("0020|0032", f"{ox}\\{oy}\\{oz + sz * k}"),
                               ("0020|0013", str(k + 1)), ("0028|0030", f"{sy}\\{sx}")):
                sl.SetMetaData(tag, value)
            writer.SetFileName(os.path.join(tmp_dir, f"{k:04d}.dcm"))
            writer.Execute(sl)
        os.rename(tmp_dir, folder)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
