"""Decode one manifest scan into Volumes, on CPU workers.

Storage-agnostic: every function takes bytes that were already read. Bad input never raises: it comes
back as a :class:`Rejection` whose ``detail`` holds technical facts only (file name, transfer syntax,
shapes, exception class). Exception messages and pydicom's warnings are never passed on, because they
may quote element values such as the patient's name.
"""

from __future__ import annotations

import gzip
import logging
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO

import nibabel
import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.pixels import get_decoder

from hlip_ray.data.records import Decoded, Rejection, Volume

SECONDARY_CAPTURE = frozenset({"1.2.840.10008.5.1.4.1.1.7", *(f"1.2.840.10008.5.1.4.1.1.7.{i}" for i in range(1, 5))})
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
UNDEFINED_LENGTH = 0xFFFFFFFF


class _Reject(Exception):
    """Internal: a file or series that cannot become a volume; turned into a Rejection at the top."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


@dataclass
class _File:
    """One parsed DICOM file."""

    name: str  # the file name, for rejection details
    ds: pydicom.Dataset | None  # None when the file does not parse
    truncated: bool  # cut short: its header may still name its series


@dataclass
class _Slice:
    """One decoded frame with its geometry (DICOM patient coordinates, LPS)."""

    pixels: np.ndarray  # float32 [H, W], rescaled (HU for CT)
    position: np.ndarray | None  # [3] mm, centre of the first pixel
    orientation: np.ndarray | None  # [2, 3]: row cosines (direction of W), column cosines (direction of H)
    pixel_spacing: tuple[float, float]  # (H, W) mm
    thickness: float  # mm along the normal, used only when positions are unknown
    order: tuple[int, int]  # (InstanceNumber, frame index): the order when positions are unknown


# --------------------------------------------------------------------------------------------- DICOM


def decode_dicom_files(files: Sequence[tuple[str, bytes]], scan_uri: str) -> Decoded:
    """Decode the DICOM files of one scan (a folder or prefix) into one Volume per series.

    Files are grouped by SeriesInstanceUID; series are labelled "series-1", "series-2", ... in
    (SeriesNumber, SeriesInstanceUID) order. Each Volume has float32 ``pixels`` ``[D, H, W]``: D sorted
    along the slice normal (InstanceNumber when positions are missing), H = rows, W = columns, rescaled
    by RescaleSlope/RescaleIntercept. A series whose positions repeat evenly (echoes, b-values, time
    points in one series) becomes one Volume per repetition, labelled "series-1.1", "series-1.2", ...

    A series with any unusable file is rejected as a whole. A file whose header does not parse cannot
    be attributed to a series, so it rejects the whole scan.
    """
    if not files:
        return _rejected(scan_uri, "missing_object", "no files")
    with _quiet_pydicom():
        series: dict[str, list[_File]] = defaultdict(list)
        for uri, data in files:
            file = _read(uri.rstrip("/").rsplit("/", 1)[-1], data)
            if file.ds is None or (file.truncated and "SeriesInstanceUID" not in file.ds):
                detail = f"{file.name}: {'truncated' if file.truncated else 'not a readable DICOM file'}"
                return _rejected(scan_uri, "corrupt", f"{detail}; its series is unknown, scan rejected")
            series[str(file.ds.get("SeriesInstanceUID", ""))].append(file)

        decoded = Decoded()
        for index, uid in enumerate(sorted(series, key=lambda uid: (_series_number(series[uid]), uid)), start=1):
            label = f"series-{index}"
            try:
                with _as_corrupt("geometry"):
                    decoded.volumes += _series_volumes(series[uid], scan_uri, label)
            except _Reject as reject:
                decoded.rejections.append(Rejection(scan_uri, reject.reason, f"{label}: {reject.detail}"))
        return decoded


def dicom_header(data: bytes) -> tuple[str | None, str | None]:
    """``(PatientID, Modality)`` from a DICOM header (``data`` may be only the file's first bytes).

    The PatientID is for patient-level split hashing in the manifest builder only: it identifies a
    person, so use it transiently and never store, return in a record, or log it.
    """
    try:
        with _quiet_pydicom():
            ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=["PatientID", "Modality"])
            patient, modality = ds.get("PatientID"), ds.get("Modality")
    except Exception:
        return None, None
    return (str(patient) if patient else None), (str(modality) if modality else None)


@contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings and log lines while inside: they may quote element values (a name)."""
    logger = logging.getLogger("pydicom")
    disabled, logger.disabled = logger.disabled, True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.disabled = disabled


def _read(name: str, data: bytes) -> _File:
    """Parse a DICOM Part 10 file, pixels still encoded; ``ds`` is None when it does not parse."""
    with warnings.catch_warnings(record=True) as caught:  # recorded, never shown: they may quote values
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(BytesIO(data))
        except Exception:
            return _File(name, None, False)
    # pydicom reads a value cut short by the end of the file without complaint: check the last one.
    last = ds.get_item(next(reversed(ds.keys()))) if len(ds) else None
    cut = isinstance(last, RawDataElement) and last.length != UNDEFINED_LENGTH and len(last.value or b"") < last.length
    return _File(name, ds, cut or any("end of file" in str(warning.message).lower() for warning in caught))


@contextmanager
def _as_corrupt(what: str) -> Iterator[None]:
    """Turn any unexpected exception into a "corrupt" rejection naming ``what`` and the exception class."""
    try:
        yield
    except _Reject:
        raise
    except Exception as exc:
        raise _Reject("corrupt", f"{what} unusable ({type(exc).__name__})") from None


def _series_number(files: list[_File]) -> float:
    try:
        return float(files[0].ds.get("SeriesNumber"))
    except (TypeError, ValueError):
        return float("inf")


def _series_volumes(files: list[_File], scan_uri: str, label: str) -> list[Volume]:
    shapes = set()
    for file in files:
        if file.truncated:
            raise _Reject("corrupt", f"{file.name}: truncated")
        with _as_corrupt(f"{file.name}: header"):
            _screen(file.name, file.ds)
            shapes.add((int(file.ds.Rows), int(file.ds.Columns)))
    if len(shapes) > 1:
        raise _Reject("inconsistent_slice_shapes", f"rows x columns differ: {sorted(shapes)}")
    slices = []
    for file in files:
        with _as_corrupt(f"{file.name}: pixel data"):
            slices += _slices(file.ds)
    stacks = _stacks(slices)
    modality = str(files[0].ds.get("Modality", "")) or "OT"
    labels = [label] if len(stacks) == 1 else [f"{label}.{i}" for i in range(1, len(stacks) + 1)]
    return [_volume(stack, modality, scan_uri, series) for stack, series in zip(stacks, labels)]


def _screen(name: str, ds: pydicom.Dataset) -> None:
    """Reject, before decoding any pixels, a file that cannot be one slice of a grey-level volume."""
    sop_class = ds.get("SOPClassUID")
    sop_name = str(getattr(sop_class, "name", sop_class))
    if not any(keyword in ds for keyword in PIXEL_KEYWORDS):
        if "Rows" in ds or "Image Storage" in sop_name:  # an image cut short at an element boundary
            raise _Reject("corrupt", f"{name}: {sop_name} without pixel data (truncated?)")
        raise _Reject("not_an_image", f"{name}: no pixel data ({sop_name})")
    if sop_class in SECONDARY_CAPTURE:
        raise _Reject("secondary_capture", f"{name}: {sop_name}")
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        raise _Reject("burned_in_annotation", f"{name}: BurnedInAnnotation YES")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        raise _Reject("corrupt", f"{name}: no transfer syntax in the file meta")
    try:
        decodable = get_decoder(syntax).is_available
    except NotImplementedError:
        decodable = False
    if not decodable:
        raise _Reject("unsupported_transfer_syntax", f"{name}: {syntax.name}")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if int(ds.get("SamplesPerPixel", 1)) != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise _Reject("unsupported_format", f"{name}: {photometric} with {ds.get('SamplesPerPixel', 1)} samples")


def _slices(ds: pydicom.Dataset) -> list[_Slice]:
    """The frames of one (single- or multi-frame) object, each rescaled, with its position."""
    frames = int(ds.get("NumberOfFrames") or 1)
    pixels = ds.pixel_array.reshape(frames, int(ds.Rows), int(ds.Columns))
    shared = ds.get("SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")

    def attribute(frame: int, sequence: str, keyword: str, default=None):
        """A functional-group attribute: the frame's group, then the shared group, then the top level."""
        for groups in (per_frame[frame] if per_frame else None, shared[0] if shared else None):
            if groups is not None and sequence in groups and keyword in groups[sequence][0]:
                return groups[sequence][0][keyword].value
        return ds.get(keyword, default)

    instance = int(ds.get("InstanceNumber") or 0)
    thickness = float(
        attribute(0, "PixelMeasuresSequence", "SpacingBetweenSlices")
        or attribute(0, "PixelMeasuresSequence", "SliceThickness")
        or 1.0
    )
    # Multi-frame objects without per-frame positions stack their frames from the first position.
    stacked = frames > 1 and not (per_frame and "PlanePositionSequence" in per_frame[0])
    offsets = np.asarray(ds.get("GridFrameOffsetVector") or np.arange(frames) * thickness, dtype=float)
    slices = []
    for frame in range(frames):
        position = attribute(frame, "PlanePositionSequence", "ImagePositionPatient")
        orientation = attribute(frame, "PlaneOrientationSequence", "ImageOrientationPatient")
        position = None if position is None else np.asarray(position, dtype=float)
        orientation = None if orientation is None else np.asarray(orientation, dtype=float).reshape(2, 3)
        if stacked and position is not None and orientation is not None:
            position = position + (offsets[frame] - offsets[0]) * np.cross(*orientation)
        slope = float(attribute(frame, "PixelValueTransformationSequence", "RescaleSlope", 1.0))
        intercept = float(attribute(frame, "PixelValueTransformationSequence", "RescaleIntercept", 0.0))
        spacing = attribute(frame, "PixelMeasuresSequence", "PixelSpacing") or (1.0, 1.0)
        slices.append(
            _Slice(
                pixels=(pixels[frame] * slope + intercept).astype(np.float32),
                position=position,
                orientation=orientation,
                pixel_spacing=(float(spacing[0]), float(spacing[1])),
                thickness=thickness,
                order=(instance, frame),
            )
        )
    return slices


def _stacks(slices: list[_Slice]) -> list[list[_Slice]]:
    """Order the slices of a series into one stack, or several when every position repeats equally often."""
    if any(s.position is None or s.orientation is None for s in slices):
        for s in slices:  # positions are used for all slices or for none
            s.position = None
        return [sorted(slices, key=lambda s: s.order)]
    if any(not np.allclose(s.orientation, slices[0].orientation, atol=1e-3) for s in slices):
        raise _Reject("inconsistent_slice_shapes", "slice orientations differ within the series")
    normal = np.cross(*slices[0].orientation)
    at_position: dict[float, list[_Slice]] = defaultdict(list)
    for s in slices:
        at_position[round(float(s.position @ normal), 2)].append(s)
    repeats = {len(group) for group in at_position.values()}
    if len(repeats) > 1:
        raise _Reject("inconsistent_slice_shapes", f"slice positions repeat unevenly ({sorted(repeats)} times)")
    groups = [sorted(at_position[key], key=lambda s: s.order) for key in sorted(at_position)]
    return [[group[i] for group in groups] for i in range(repeats.pop())]


def _volume(stack: list[_Slice], modality: str, uri: str, series: str) -> Volume:
    first = stack[0]
    rows, columns = first.orientation if first.orientation is not None else np.eye(3)[:2]
    normal = np.cross(rows, columns)
    if first.position is not None and len(stack) > 1:
        step = (stack[-1].position - first.position) / (len(stack) - 1)  # keeps a gantry tilt as a shear
        slice_spacing = abs(float(step @ normal))
    else:
        step, slice_spacing = normal * first.thickness, first.thickness
    spacing_h, spacing_w = first.pixel_spacing
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = step, columns * spacing_h, rows * spacing_w
    affine[:3, 3] = first.position if first.position is not None else 0.0
    return Volume(
        pixels=np.stack([s.pixels for s in stack]),
        affine=LPS_TO_RAS @ affine,
        modality=modality,
        uri=uri,
        series=series,
        spacing=(slice_spacing, spacing_h, spacing_w),
    )


# --------------------------------------------------------------------------------------------- NIfTI


def decode_nifti(uri: str, data: bytes, four_d: str = "scans", modality: str = "MR") -> Decoded:
    """Decode a ``.nii`` or ``.nii.gz`` (NIfTI-1 or -2) into Volumes of float32 ``pixels`` ``[D, H, W]``.

    ``[D, H, W]`` are the file's (k, j, i) voxel axes, and the affine's columns are permuted to match,
    so it still maps (d, h, w) to RAS mm. A 4D file gives one Volume per volume along its 4th axis
    (``four_d="scans"``, labelled "volume-1", ...) or only its first (``four_d="first"``). NIfTI does
    not record the modality: the manifest's ``modality`` is used.
    """
    if four_d not in ("scans", "first"):
        raise ValueError(f"four_d must be 'scans' or 'first', not {four_d!r}")
    name = uri.rsplit("/", 1)[-1]
    try:
        image = _nifti_image(data)
        shape = tuple(image.shape) + (1,) * (3 - len(image.shape))  # a 2D image is one slice
        while len(shape) > 4 and shape[-1] == 1:
            shape = shape[:-1]
        if 0 in shape:
            return _rejected(uri, "empty_axis", f"{name}: shape {shape}")
        if len(shape) > 4:
            return _rejected(uri, "unsupported_format", f"{name}: {len(shape)}D shape {shape}")
        array = np.asarray(image.get_fdata(dtype=np.float32)).reshape(shape + (1,) * (4 - len(shape)))
    except Exception as exc:
        return _rejected(uri, "corrupt", f"{name}: not a readable NIfTI file ({type(exc).__name__})")
    if four_d == "first":
        array = array[..., :1]
    if not np.isfinite(array).all():
        return _rejected(uri, "non_finite_values", f"{name}: NaN or Inf voxels in shape {shape}")
    affine = image.affine[:, [2, 1, 0, 3]]
    zooms = (tuple(float(z) for z in image.header.get_zooms()) + (1.0, 1.0, 1.0))[:3]
    volumes = [
        Volume(
            pixels=np.ascontiguousarray(array[..., t].transpose(2, 1, 0)),
            affine=affine.copy(),
            modality=modality,
            uri=uri,
            series=f"volume-{t + 1}" if len(shape) == 4 else "",
            spacing=(zooms[2], zooms[1], zooms[0]),
        )
        for t in range(array.shape[3])
    ]
    return Decoded(volumes=volumes)


def _nifti_image(data: bytes) -> nibabel.Nifti1Image:
    """A single-file NIfTI image from (possibly gzipped) bytes; the header size tells NIfTI-1 from -2."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    header_size = {int.from_bytes(data[:4], order) for order in ("little", "big")}
    image_class = nibabel.Nifti2Image if 540 in header_size else nibabel.Nifti1Image
    return image_class.from_bytes(data)


def _rejected(uri: str, reason: str, detail: str) -> Decoded:
    return Decoded(rejections=[Rejection(uri, reason, detail)])
