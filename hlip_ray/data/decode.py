"""Decode one manifest scan into Volumes, on CPU workers.

Storage-agnostic: every function takes bytes that were already read. Bad input never raises: it comes
back as a :class:`Rejection` (a series or scan refused) or a :class:`Note` (a file left out of a scan
that was kept: a stray non-DICOM file, a duplicate slice), whose ``detail`` holds technical facts only
(file name, transfer syntax, shapes, counts, exception class). Exception messages and pydicom's
warnings are never passed on, because they may quote element values such as the patient's name.

DICOM is recognised by content, whatever a file is named: a Part 10 file (``DICM`` at byte 128), or a
bare dataset without the preamble (older exports) that pydicom reads and that names a SOP class or a
series.

Headers are read within a budget (``HEADER_BYTES``, ``read_header``), so that a huge file (a 2 GiB sparse
file named ``x.dcm``) costs what its head does: a file larger than the budget is judged by its head
first (``needs_whole_file``), and is read whole only when it is DICOM and no larger than
``MAX_DICOM_FILE_BYTES``.
"""

from __future__ import annotations

import functools
import gzip
import logging
import warnings
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO

import nibabel
import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_partial
from pydicom.pixels import get_decoder, pixel_array
from pydicom.tag import Tag
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from hlip_ray.data.records import Decoded, Note, Rejection, Volume

SECONDARY_CAPTURE = frozenset({"1.2.840.10008.5.1.4.1.1.7", *(f"1.2.840.10008.5.1.4.1.1.7.{i}" for i in range(1, 5))})
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
UNDEFINED_LENGTH = 0xFFFFFFFF
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory: an index of files, never an image
# Attributes that tell two acquisitions at one position apart (echoes, time points, b-values, repeats):
# slices differing in any of them are never duplicates, even with identical pixels (blank edge slices).
ACQUISITION_KEYS = ("EchoNumbers", "EchoTime", "TemporalPositionIdentifier", "TriggerTime", "DiffusionBValue",
                    "AcquisitionNumber")
# The budget for a DICOM header: what is read of a file to learn whether it is DICOM and, for the manifest, its
# PatientID and Modality. The elements up to SeriesNumber (groups 0002-0020: file meta, SOP, study, patient,
# series) take a few KB even in an enhanced multi-frame object, whose per-frame groups (5200) come after
# them: 4 MiB leaves a thousand times that, yet a head costs one request and never more than 4 MiB of memory.
# Files up to this size are read whole at once (their head would be all of them anyway).
HEADER_BYTES = 4 * 1024**2
# The largest DICOM file decoded. Decoding holds the file, its pixel data read from it and the volume of stored
# values at once (about 3 times the file), so 1 GiB needs some 3 GiB on one CPU worker; it holds 2000 frames of
# 512 x 512 16-bit pixels, a thin-slice whole-body enhanced CT, the largest CT/MR object we expect. A larger file
# is refused (``too_large``) from its head, never read.
MAX_DICOM_FILE_BYTES = 1024**3
# A parsed file leaves values larger than this (its pixel data) in the file's bytes: they are read from there
# when its frames are decoded into the volume, one file at a time, so a series' pixel data is never held twice.
DEFER_BYTES = 64 * 1024
# The elements a header is read for: the manifest's (PatientID, Modality), and what tells a file's series
# and instance when only its head is read. They all lie before _HEADER_END, where reading stops.
HEADER_TAGS = ("SOPClassUID", "SOPInstanceUID", "Modality", "PatientID", "SeriesInstanceUID", "SeriesNumber")
_HEADER_END = 0x00200011  # SeriesNumber, the last of HEADER_TAGS in tag order
_DIRECTORY_GROUP = 0x0004  # the directory records of a DICOMDIR
NO_ELEMENTS = "zeros after the DICM magic"  # a Part 10 file with no element: pydicom would read zeros for ever


class _Reject(Exception):
    """Internal: a file or series that cannot become a volume; turned into a Rejection at the top."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


@dataclass
class _File:
    """One file of a scan, parsed when it is DICOM."""

    uri: str
    name: str  # the file's path below the scan's folder, for details
    ds: pydicom.Dataset | None  # None when the file is not DICOM or does not parse
    truncated: bool  # cut short: its header may still name its series
    skip: str = ""  # why the file is not DICOM at all ("zero bytes", "a DICOMDIR", ...); "" when it is
    size: int = 0  # a DICOM file over MAX_DICOM_FILE_BYTES, known by its head (``ds``: HEADER_TAGS): its size
    data: bytes = b""  # the file's bytes, which a deferred value (DEFER_BYTES) is still read from


@dataclass
class _Slice:
    """One frame of a file with its geometry (DICOM patient coordinates, LPS), its pixels not yet decoded."""

    frame: int  # its index among the frames of its file
    frames: int  # the frames of its file
    rescale: tuple[float, float]  # (RescaleSlope, RescaleIntercept): stored value -> HU for CT
    position: np.ndarray | None  # [3] mm, centre of the first pixel
    orientation: np.ndarray | None  # [2, 3]: row cosines (direction of W), column cosines (direction of H)
    pixel_spacing: tuple[float, float]  # (H, W) mm
    thickness: float  # mm along the normal, used only when positions are unknown
    order: tuple[int, int]  # (InstanceNumber, frame index): the order when positions are unknown
    source: _File  # the file it came from
    acquisition: tuple  # the ACQUISITION_KEYS values ("" where absent)


# --------------------------------------------------------------------------------------------- DICOM


@dataclass(frozen=True)
class Header:
    """What a file's first bytes say (``read_header``). ``problem`` is "" for a DICOM header read in full up
    to ``HEADER_TAGS``, else why not: "zero bytes", "not DICOM", "a DICOMDIR", ``NO_ELEMENTS``, "unreadable
    header" (a Part 10 file that does not parse), or a header that does not end within the bytes read.
    ``dicom`` says whether the file is DICOM by content (module docstring; a DICOMDIR is not). The PatientID
    is for the manifest's patient-level split only: never store, return in a record, or log it (it is left
    out of the repr)."""

    dicom: bool
    problem: str = ""
    modality: str | None = None
    patient_id: str | None = field(default=None, repr=False)
    dataset: pydicom.Dataset | None = field(default=None, repr=False, compare=False)  # HEADER_TAGS read


def read_header(head: bytes, whole: bool) -> Header:
    """The header of a file from its first bytes ``head`` (``whole``: all of it), read no further than
    ``HEADER_TAGS`` (pixel data never). When ``head`` is not the whole file, the header is complete only if
    reading got past ``HEADER_TAGS`` within it; otherwise its ``problem`` says the header does not end within
    ``len(head)`` bytes. Zeros (a sparse or preallocated file) would read as millions of empty elements: they
    are dropped from the end of ``head``, and a tag that repeats its predecessor (a dataset's tags ascend)
    ends the read."""
    if not head:
        return Header(False, "zero bytes")
    part10 = _is_part10(head)
    start = 132 if part10 else 0
    # Trailing zeros hold no element, and pydicom would read each 8 of them as one: all but 12 are dropped
    # (12 complete the header of an element whose length ends in zeros).
    data = head[: len(head.rstrip(b"\x00")) + 12]
    if len(data) <= start or head[start : start + 8] == bytes(8):  # a null tag of length 0 starts no dataset
        return Header(True, NO_ELEMENTS) if part10 else Header(False, "not DICOM")
    seen = {"previous": -1, "past": False, "directory": False}

    def stop(tag: int, vr: str | None, length: int) -> bool:
        if tag > _HEADER_END or tag >> 16 == _DIRECTORY_GROUP:
            seen["past"], seen["directory"] = True, tag >> 16 == _DIRECTORY_GROUP
            return True
        repeated, seen["previous"] = tag == seen["previous"], tag
        return repeated

    try:
        with _quiet_pydicom():
            ds = read_partial(BytesIO(data), stop_when=stop, force=not part10,
                              specific_tags=[Tag(keyword) for keyword in HEADER_TAGS])
            if seen["directory"] or _is_dicomdir(ds):
                return Header(False, "a DICOMDIR")
            if not part10 and "SOPClassUID" not in ds and "SeriesInstanceUID" not in ds:
                return Header(False, "not DICOM")
            if not (whole or seen["past"]):
                return Header(True, f"header does not end within its first {_size(len(head))} (HEADER_BYTES)",
                              dataset=ds)
            patient, modality = ds.get("PatientID"), ds.get("Modality")
    except Exception:  # in a head, an element cut at its end may be why
        where = "" if whole else f" within its first {_size(len(head))} (HEADER_BYTES)"
        return Header(True, f"unreadable header{where}") if part10 else Header(False, "not DICOM")
    return Header(True, "", str(modality) if modality else None, str(patient) if patient else None, ds)


def needs_whole_file(head: bytes, size: int) -> bool:
    """Whether a file of ``size`` bytes whose first bytes are ``head`` (``HEADER_BYTES`` of it) is read whole
    for decoding: when it is DICOM by its head and no larger than ``MAX_DICOM_FILE_BYTES``. Otherwise its
    head is all ``decode_dicom_files`` needs (``heads``) to skip it (not DICOM) or refuse it (too large)."""
    header = read_header(head, whole=len(head) >= size)
    return size <= MAX_DICOM_FILE_BYTES and header.dicom and header.problem != NO_ELEMENTS


def decode_dicom_files(files: Sequence[tuple[str, bytes]], scan_uri: str, min_slices: int = 1,
                       heads: Mapping[str, int] | None = None) -> Decoded:
    """Decode the DICOM files of one scan (a folder or prefix) into one Volume per series.

    Files are grouped by SeriesInstanceUID; series are labelled "series-1", "series-2", ... in
    (SeriesNumber, SeriesInstanceUID) order. Each Volume has ``pixels`` ``[D, H, W]``: D sorted along the
    slice normal (InstanceNumber when positions are missing), H = rows, W = columns. They are the stored
    values (int16 for most CT) with the series' RescaleSlope/RescaleIntercept as the Volume's ``rescale``
    (``Volume.values()``: HU for CT), or float32 rescaled values with rescale (1, 0) when slices differ in
    it. Each file's frames are decoded straight into the volume and the file's parsed copy released, so a
    series' pixels are held once, in their stored type. A series whose positions repeat evenly (echoes,
    b-values, time points in one series) becomes one Volume per repetition, labelled "series-1.1",
    "series-1.2", ...

    Left out of the scan, each with a :class:`Note`, and never fatal to it:

    - ``skipped_file``: a file that is not DICOM (no ``DICM`` magic and not a dataset pydicom reads: a
      ``notes.txt``, a thumbnail, ``.DS_Store``), a zero-byte file, a DICOMDIR;
    - ``duplicate_slice``: a second file with a SOPInstanceUID already seen (an intact copy is kept over
      a truncated one), or a slice at the same ImagePositionPatient with identical pixels and
      acquisition (``ACQUISITION_KEYS``) as one kept, from another file (a series exported twice).

    A series is refused as a whole, with a :class:`Rejection`, when any of its files is unusable, when it
    is a ``localizer`` (ImageType LOCALIZER, or orientations that differ between slices), when a position
    holds different slices but positions do not repeat evenly (``conflicting_slices``), or when a volume
    would have fewer than ``min_slices`` slices (``too_few_slices``: never stretched to the grid; 1 lets
    single images through). A Part 10 file (``DICM`` magic) that does not parse, or a truncated file
    whose header was cut before its SeriesInstanceUID, cannot be attributed to a series: it refuses the
    whole scan as ``corrupt`` (unless its SOPInstanceUID shows it is a copy of an intact file).

    ``heads`` maps the files of ``files`` whose bytes are only their head (their first ``HEADER_BYTES``,
    where ``needs_whole_file`` said no) to their size. Such a file is judged by its head: one that is not
    DICOM is skipped (``skipped_file``) as above; a DICOM file over ``MAX_DICOM_FILE_BYTES`` refuses its
    series (``too_large``, naming the file), or the scan when its head does not name its series.
    """
    heads = heads or {}
    if not files:
        return _rejected(scan_uri, "missing_object", "no files")
    decoded = Decoded()
    with _quiet_pydicom():
        prefix, parsed = scan_uri.rstrip("/") + "/", []
        for uri, data in files:  # named by their path below the scan's folder
            name = uri[len(prefix) :] if uri.startswith(prefix) else uri.rstrip("/").rsplit("/", 1)[-1]
            parsed.append(_read_head(uri, name, data, heads[uri]) if uri in heads else _read(uri, name, data))
        series: dict[str, list[_File]] = defaultdict(list)
        kept_instances: dict[str, str] = {}  # SOPInstanceUID -> the name of the file kept
        for file in sorted(parsed, key=lambda file: file.truncated):  # intact copies first: they are kept
            if file.skip:
                decoded.notes.append(Note(file.uri, "skipped_file", f"{file.name}: {file.skip}"))
                continue
            instance = _instance_uid(file)
            if instance and instance in kept_instances:
                detail = f"{file.name}: same SOPInstanceUID as {kept_instances[instance]}"
                decoded.notes.append(Note(file.uri, "duplicate_slice", detail))
                continue
            if file.ds is None or (file.truncated and "SeriesInstanceUID" not in file.ds):
                detail = f"{file.name}: {'truncated' if file.truncated else 'not a readable DICOM file'}"
                decoded.rejections.append(Rejection(scan_uri, "corrupt", f"{detail}; its series is unknown, "
                                                                          "scan rejected"))
                return decoded
            if file.size and "SeriesInstanceUID" not in file.ds:
                detail = f"{_too_large(file)}; its series is unknown, scan rejected"
                decoded.rejections.append(Rejection(scan_uri, "too_large", detail))
                return decoded
            if instance:
                kept_instances[instance] = file.name
            series[str(_get(file.ds, "SeriesInstanceUID", ""))].append(file)
        if not series:
            detail = f"none of its {len(files)} file(s) is DICOM"
            decoded.rejections.append(Rejection(scan_uri, "unsupported_format", detail))
            return decoded

        for index, uid in enumerate(sorted(series, key=lambda uid: (_series_number(series[uid]), uid)), start=1):
            label = f"series-{index}"
            try:
                with _as_corrupt("geometry"):
                    decoded.volumes += _series_volumes(series[uid], scan_uri, label, min_slices, decoded.notes)
            except _Reject as reject:
                decoded.rejections.append(Rejection(scan_uri, reject.reason, f"{label}: {reject.detail}"))
        return decoded


def dicom_header(data: bytes) -> tuple[str | None, str | None]:
    """``(PatientID, Modality)`` from a whole file's DICOM header (``read_header``); ``(None, None)`` when
    ``data`` is not DICOM (module docstring), does not parse, or is a DICOMDIR, which is an index of files
    and names no modality of its own.

    The PatientID is for patient-level split hashing in the manifest builder only: it identifies a
    person, so use it transiently and never store, return in a record, or log it.
    """
    header = read_header(data, whole=True)
    return (None, None) if header.problem else (header.patient_id, header.modality)


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


_TEXT_VALUES = {"DS": float, "IS": int, "UI": str, "CS": str}


def _get(ds: pydicom.Dataset, keyword: str, default=None):
    """``ds.get(keyword, default)`` for the header values read from every slice, parsed straight from the
    element's bytes while pydicom has not converted it: numbers (DS, IS, US) as float / int, UI and CS as
    str, several values as a list. pydicom's conversion (its value classes and their validation) cost more
    per slice than reading the slice's pixels in place. Any other VR, an empty value or one that does not
    parse, or an element already converted, is pydicom's."""
    tag = _tag(keyword)
    element = ds.get_item(tag, keep_deferred=True)
    if element is None:
        return default
    if isinstance(element, RawDataElement) and element.value:
        vr = element.VR or dictionary_VR(tag)
        if vr == "US" and len(element.value) == 2:
            return int.from_bytes(element.value, "little" if element.is_little_endian else "big")
        if vr in _TEXT_VALUES:
            try:
                values = [_TEXT_VALUES[vr](part.strip(" \x00")) for part in element.value.decode("ascii").split("\\")]
            except ValueError:  # empty, non-ASCII or not a number: as pydicom reads it
                values = []
            if values and all(value != "" for value in values):
                return values[0] if len(values) == 1 else values
    return ds.get(keyword, default)


@functools.cache
def _tag(keyword: str) -> int:
    return tag_for_keyword(keyword)


def _instance_uid(file: _File) -> str:
    """The file's SOPInstanceUID ("" when unknown); of a truncated file, the file meta's copy, since the
    dataset's may be the value cut short."""
    if file.ds is None:
        return ""
    meta = getattr(file.ds, "file_meta", None) or {}
    if file.truncated and meta.get("MediaStorageSOPInstanceUID"):
        return str(meta["MediaStorageSOPInstanceUID"].value)
    return str(_get(file.ds, "SOPInstanceUID", ""))


def _is_part10(data: bytes) -> bool:
    return data[128:132] == b"DICM"


def _is_dicomdir(ds: pydicom.Dataset) -> bool:
    meta = getattr(ds, "file_meta", None) or {}
    return meta.get("MediaStorageSOPClassUID") == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds


def _bare_dataset(data: bytes, **options) -> pydicom.Dataset | None:
    """A dataset without the Part 10 preamble and file meta (older exports), or None when ``data`` is not
    one: pydicom's forced read takes any bytes for a dataset, so it must name a SOP class or a series.
    The transfer syntax it lacks is the encoding the reader found."""
    if data[:8] == bytes(8):  # a null tag of length 0 starts no dataset: zeros (pydicom would read them all)
        return None
    try:
        ds = pydicom.dcmread(BytesIO(data), force=True, **options)
        if "SOPClassUID" not in ds and "SeriesInstanceUID" not in ds:
            return None
        if "TransferSyntaxUID" not in (getattr(ds, "file_meta", None) or {}):
            implicit, little = ds.original_encoding
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    except Exception:
        return None
    return ds


def _read(uri: str, name: str, data: bytes) -> _File:
    """Parse one file of a scan, pixels still encoded. ``skip`` says why a file is not DICOM at all;
    ``ds`` is None (and ``skip`` empty) for a Part 10 file that does not parse."""
    if not data:
        return _File(uri, name, None, False, "zero bytes")
    if name.rsplit("/", 1)[-1].upper() == "DICOMDIR":
        return _File(uri, name, None, False, "a DICOMDIR")
    with warnings.catch_warnings(record=True) as caught:  # recorded, never shown: they may quote values
        warnings.simplefilter("always")
        if not _is_part10(data):
            ds = _bare_dataset(data, defer_size=DEFER_BYTES)
            if ds is None:
                return _File(uri, name, None, False, "not DICOM")
        else:
            try:
                ds = pydicom.dcmread(BytesIO(data), defer_size=DEFER_BYTES)
            except Exception:
                return _File(uri, name, None, False)
    if _is_dicomdir(ds):
        return _File(uri, name, None, False, "a DICOMDIR")
    # pydicom reads a value cut short by the end of the file without complaint: check the last one.
    last = ds.get_item(next(reversed(ds.keys())), keep_deferred=True) if len(ds) else None
    return _File(uri, name, ds, _cut_short(last, len(data))
                 or any("end of file" in str(warning.message).lower() for warning in caught), data=data)


def _cut_short(element, size: int) -> bool:
    """Whether ``element``, the last one read of a file of ``size`` bytes, is cut short by the file's end; a
    deferred value (``DEFER_BYTES``: not read yet, ``value`` None) by where it would end."""
    if not isinstance(element, RawDataElement) or element.length == UNDEFINED_LENGTH:
        return False
    if element.value is None and element.length:
        return element.value_tell + element.length > size
    return len(element.value or b"") < element.length


def _read_head(uri: str, name: str, head: bytes, size: int) -> _File:
    """A file of ``size`` bytes known by its ``head`` only (``decode_dicom_files``' ``heads``): skipped when
    not DICOM, refused (``size`` set) when over ``MAX_DICOM_FILE_BYTES``, else unreadable (``ds`` None)."""
    if name.rsplit("/", 1)[-1].upper() == "DICOMDIR":
        return _File(uri, name, None, False, "a DICOMDIR")
    header = read_header(head, whole=False)
    if not header.dicom:
        why = header.problem if header.problem == "a DICOMDIR" else "not DICOM"
        return _File(uri, name, None, False, f"{why} ({_size(size)}, judged by its first {_size(len(head))})")
    if size > MAX_DICOM_FILE_BYTES:
        return _File(uri, name, header.dataset if header.dataset is not None else pydicom.Dataset(), False,
                     size=size)
    return _File(uri, name, None, False)  # DICOM by its magic, but no element follows it


def _too_large(file: _File) -> str:
    """The detail of a file refused for its size."""
    return (f"{file.name}: {_size(file.size)}, over the {_size(MAX_DICOM_FILE_BYTES)} a DICOM file may have "
            "(MAX_DICOM_FILE_BYTES)")


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


def _series_volumes(files: list[_File], scan_uri: str, label: str, min_slices: int,
                    notes: list[Note]) -> list[Volume]:
    """One series' volumes (``decode_dicom_files``); the duplicate slices it drops go to ``notes``."""
    oversized = [file for file in files if file.size]
    if oversized:
        more = f" (and {len(oversized) - 1} more such file(s))" if len(oversized) > 1 else ""
        raise _Reject("too_large", _too_large(oversized[0]) + more)
    shapes = set()
    for file in files:
        if file.truncated:
            raise _Reject("corrupt", f"{file.name}: truncated")
        with _as_corrupt(f"{file.name}: header"):
            _screen(file.name, file.ds)
            shapes.add((int(_get(file.ds, "Rows")), int(_get(file.ds, "Columns"))))
    if len(shapes) > 1:
        raise _Reject("inconsistent_slice_shapes", f"rows x columns differ: {sorted(shapes)}")
    slices = []
    for file in files:
        with _as_corrupt(f"{file.name}: pixel data"):
            slices += _slices(file.ds, file)
    found: list[Note] = []  # the duplicates dropped, noted unless pixel data does not decode (as if decoded first)
    try:
        stacks = _stacks(slices, label, found)
        if len(stacks[0]) < min_slices:
            raise _Reject("too_few_slices", f"{len(stacks[0])} slice(s) per volume after dropping duplicates, "
                                            f"fewer than min_slices {min_slices}")
    except _Reject as reject:
        if reject.reason != "corrupt":  # pixel data that does not decode refuses a series first
            _check_pixels(files)
            notes += found
        raise
    modality = str(files[0].ds.get("Modality", "")) or "OT"
    volumes = _fill(stacks, files)
    notes += found
    labels = [label] if len(stacks) == 1 else [f"{label}.{i}" for i in range(1, len(stacks) + 1)]
    return [_volume(stack, modality, scan_uri, series, pixels, rescale)
            for stack, series, (pixels, rescale) in zip(stacks, labels, volumes)]


def _decode(file: _File, frame: int, frames: int) -> np.ndarray:
    """Frame ``frame`` (of ``frames``) of a file's pixel data, decoded: stored values ``[rows, columns]``."""
    with _as_corrupt(f"{file.name}: pixel data"):
        ds = file.ds
        rows, columns = int(_get(ds, "Rows")), int(_get(ds, "Columns"))
        native = _native_frame(file, frame, rows * columns)
        if native is not None:
            return native.reshape(rows, columns)
        options = {"index": frame} if frames > 1 else {}
        plugin = _fastest_plugin(ds.file_meta.get("TransferSyntaxUID"))
        if plugin:
            options["decoding_plugin"] = plugin
        return pixel_array(ds, **options).reshape(rows, columns)


# Where pydicom has several plugins for a transfer syntax and its first is not the fastest: measured on
# 512x512 CT slices, pyjpegls (CharLS) decodes JPEG-LS in 4.9 ms, pylibjpeg-libjpeg in 18.9 ms.
FASTEST_PLUGINS = {JPEGLSLossless: "pyjpegls", JPEGLSNearLossless: "pyjpegls"}


def _fastest_plugin(syntax) -> str:
    """The plugin ``FASTEST_PLUGINS`` names for ``syntax`` when it is installed, else "" (pydicom's order)."""
    plugin = FASTEST_PLUGINS.get(syntax, "")
    return plugin if plugin and plugin in get_decoder(syntax).available_plugins else ""


_NATIVE_DTYPES = {(8, 0): "u1", (8, 1): "i1", (16, 0): "<u2", (16, 1): "<i2"}


def _native_frame(file: _File, frame: int, pixels: int) -> np.ndarray | None:
    """A frame of uncompressed little-endian grey pixels of 8 or 16 bits, read in place from the file's bytes
    where its pixel data was left (``DEFER_BYTES``; or from the value read with a small image's header), as
    pydicom decodes it (unused high bits cleared, or filled with the sign, by the same shifts); None for any
    other pixel data, which pydicom decodes. A read-only view when no bits are unused. (pydicom re-reads a
    deferred value and checks its options per call: three to six times the cost of this.)"""
    ds = file.ds
    if ds.file_meta.get("TransferSyntaxUID") not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        return None
    element = ds.get_item(0x7FE00010, keep_deferred=True)  # PixelData
    allocated, stored = int(_get(ds, "BitsAllocated", 0)), int(_get(ds, "BitsStored", 0))
    dtype = _NATIVE_DTYPES.get((allocated, int(_get(ds, "PixelRepresentation", 0))))
    if not isinstance(element, RawDataElement) or dtype is None or not 0 < stored <= allocated:
        return None
    # Left in the file's bytes (deferred), or read with the header (a small image) and not converted yet.
    data, start = (file.data, element.value_tell) if element.value is None else (element.value, 0)
    size = np.dtype(dtype).itemsize * pixels
    if (frame + 1) * size > min(element.length, len(data) - start):
        raise ValueError("pixel data shorter than its frames")
    array = np.frombuffer(data, dtype, pixels, start + frame * size)
    if stored < allocated:
        array = np.right_shift(np.left_shift(array, allocated - stored), allocated - stored)
    return array


def _check_pixels(files: list[_File]) -> None:
    """Decode every frame of ``files``, keeping none: raises "corrupt" for pixel data that does not decode."""
    for file in files:
        frames = int(_get(file.ds, "NumberOfFrames") or 1)
        for frame in range(frames):
            _decode(file, frame, frames)


def _rescaled(stored: np.ndarray, rescale: tuple[float, float]) -> np.ndarray:
    """Stored values -> float32 rescaled values (HU for CT), computed in float64 and rounded once."""
    slope, intercept = rescale
    return (stored * slope + intercept).astype(np.float32)


def _fill(stacks: list[list[_Slice]], files: list[_File]) -> list[tuple[np.ndarray, tuple[float, float]]]:
    """Each stack's ``(pixels [D, H, W], rescale)``, its frames decoded file by file straight into place; a
    file's dataset (with its pixel data) is released once its frames are in. ``pixels`` holds the stored values
    (their dtype, widened only if files disagree) when the stack's slices share one rescale, else float32
    rescaled values with rescale (1, 0)."""
    places: dict[int, list[tuple[int, int]]] = defaultdict(list)  # id(file) -> (stack, depth) of its frames
    for index, stack in enumerate(stacks):
        for depth, s in enumerate(stack):
            places[id(s.source)].append((index, depth))
    shared = [stack[0].rescale if all(s.rescale == stack[0].rescale for s in stack) else None for stack in stacks]
    volumes: list[np.ndarray | None] = [None] * len(stacks)
    for file in files:
        for index, depth in places.get(id(file), ()):
            s = stacks[index][depth]
            pixels = _decode(file, s.frame, s.frames)
            if shared[index] is None:
                pixels = _rescaled(pixels, s.rescale)
            volume = volumes[index]
            if volume is None:
                volume = np.empty((len(stacks[index]), *pixels.shape), pixels.dtype)
            elif not np.can_cast(pixels.dtype, volume.dtype):
                volume = volume.astype(np.promote_types(volume.dtype, pixels.dtype))
            volume[depth] = pixels
            volumes[index] = volume
        file.ds, file.data = None, b""
    return [(volume, rescale or (1.0, 0.0)) for volume, rescale in zip(volumes, shared)]


def _screen(name: str, ds: pydicom.Dataset) -> None:
    """Reject, before decoding any pixels, a file that cannot be one slice of a grey-level volume."""
    def sop_name() -> str:  # for a detail: named by pydicom ("CT Image Storage")
        sop_class = ds.get("SOPClassUID")
        return str(getattr(sop_class, "name", sop_class))

    if not any(keyword in ds for keyword in PIXEL_KEYWORDS):
        if "Rows" in ds or "Image Storage" in sop_name():  # an image cut short at an element boundary
            raise _Reject("corrupt", f"{name}: {sop_name()} without pixel data (truncated?)")
        raise _Reject("not_an_image", f"{name}: no pixel data ({sop_name()})")
    if _get(ds, "SOPClassUID") in SECONDARY_CAPTURE:
        raise _Reject("secondary_capture", f"{name}: {sop_name()}")
    if str(_get(ds, "BurnedInAnnotation", "")).strip().upper() == "YES":
        raise _Reject("burned_in_annotation", f"{name}: BurnedInAnnotation YES")
    image_type = _get(ds, "ImageType") or []
    if "LOCALIZER" in {str(value).strip().upper() for value in ([image_type] if isinstance(image_type, str)
                                                                 else image_type)}:
        raise _Reject("localizer", f"{name}: ImageType LOCALIZER")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        raise _Reject("corrupt", f"{name}: no transfer syntax in the file meta")
    try:
        decodable = get_decoder(syntax).is_available
    except NotImplementedError:
        decodable = False
    if not decodable:
        raise _Reject("unsupported_transfer_syntax", f"{name}: {syntax.name}")
    photometric = str(_get(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if int(_get(ds, "SamplesPerPixel", 1)) != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise _Reject("unsupported_format", f"{name}: {photometric} with {ds.get('SamplesPerPixel', 1)} samples")


def _slices(ds: pydicom.Dataset, source: _File) -> list[_Slice]:
    """The frames of one (single- or multi-frame) object (the file ``source``), each with its position and
    rescale; pixels are decoded later (``_fill``)."""
    frames = int(_get(ds, "NumberOfFrames") or 1)
    shared = _get(ds, "SharedFunctionalGroupsSequence")
    per_frame = _get(ds, "PerFrameFunctionalGroupsSequence")

    def attribute(frame: int, sequence: str, keyword: str, default=None):
        """A functional-group attribute: the frame's group, then the shared group, then the top level."""
        for groups in (per_frame[frame] if per_frame else None, shared[0] if shared else None):
            if groups is not None and sequence in groups and keyword in groups[sequence][0]:
                return groups[sequence][0][keyword].value
        return _get(ds, keyword, default)

    instance = int(_get(ds, "InstanceNumber") or 0)
    acquisition = tuple(_get(ds, keyword, "") for keyword in ACQUISITION_KEYS)  # compared by value
    thickness = float(
        attribute(0, "PixelMeasuresSequence", "SpacingBetweenSlices")
        or attribute(0, "PixelMeasuresSequence", "SliceThickness")
        or 1.0
    )
    # Multi-frame objects without per-frame positions stack their frames from the first position.
    stacked = frames > 1 and not (per_frame and "PlanePositionSequence" in per_frame[0])
    offsets = np.asarray(_get(ds, "GridFrameOffsetVector") or np.arange(frames) * thickness, dtype=float)
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
                frame=frame,
                frames=frames,
                rescale=(slope, intercept),
                position=position,
                orientation=orientation,
                pixel_spacing=(float(spacing[0]), float(spacing[1])),
                thickness=thickness,
                order=(instance, frame),
                source=source,
                acquisition=acquisition,
            )
        )
    return slices


def _stacks(slices: list[_Slice], label: str, notes: list[Note]) -> list[list[_Slice]]:
    """Order the slices of a series into one stack, or several when every position repeats equally often.

    Duplicates (``_duplicate``) are dropped first, each dropping file noted once in ``notes``.
    """
    if any(s.position is None or s.orientation is None for s in slices):
        for s in slices:  # positions are used for all slices or for none
            s.position = None
        return [sorted(slices, key=lambda s: s.order)]
    if any(not np.allclose(s.orientation, slices[0].orientation, atol=1e-3) for s in slices):
        raise _Reject("localizer", "slice orientations differ within the series")
    normal = np.cross(*slices[0].orientation)
    at_position: dict[float, list[_Slice]] = defaultdict(list)
    for s in slices:
        at_position[round(float(s.position @ normal), 2)].append(s)
    dropped: dict[str, list] = {}  # file uri -> [the file, slices dropped, the file holding their twins]
    for key, group in at_position.items():
        kept: list[_Slice] = []
        for s in sorted(group, key=lambda s: s.order):
            twin = next((k for k in kept if _duplicate(s, k)), None)
            if twin is None:
                kept.append(s)
            else:
                dropped.setdefault(s.source.uri, [s.source, 0, twin.source])[1] += 1
        at_position[key] = kept
    for file, count, twin in dropped.values():
        notes.append(Note(file.uri, "duplicate_slice", f"{label}: {file.name}: {count} slice(s) with the "
                                                       f"position and pixels of {twin.name}"))
    repeats = {len(group) for group in at_position.values()}
    if len(repeats) > 1:
        raise _Reject("conflicting_slices", f"different slices at one position: positions hold "
                                            f"{sorted(repeats)} slices after dropping duplicates")
    groups = [sorted(at_position[key], key=lambda s: s.order) for key in sorted(at_position)]
    return [[group[i] for group in groups] for i in range(repeats.pop())]


def _duplicate(s: _Slice, kept: _Slice) -> bool:
    """Whether ``s`` is a copy of ``kept``: another file's slice at the same position, with the same
    acquisition attributes and identical rescaled pixels (frames of one object are never copies of each
    other). Pixels are decoded for this only when all else matches."""
    return (s.source is not kept.source and s.acquisition == kept.acquisition
            and np.allclose(s.position, kept.position, atol=1e-3)
            and np.array_equal(_rescaled(_decode(s.source, s.frame, s.frames), s.rescale),
                               _rescaled(_decode(kept.source, kept.frame, kept.frames), kept.rescale)))


def _volume(stack: list[_Slice], modality: str, uri: str, series: str, pixels: np.ndarray,
            rescale: tuple[float, float]) -> Volume:
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
        pixels=pixels,
        affine=LPS_TO_RAS @ affine,
        modality=modality,
        uri=uri,
        series=series,
        spacing=(slice_spacing, spacing_h, spacing_w),
        rescale=rescale,
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


def _size(nbytes: int) -> str:
    """A file size for a detail or a log line: "4 MiB", "2048 MiB", "300 bytes"."""
    return f"{nbytes / 2**20:.6g} MiB" if nbytes >= 2**20 else f"{nbytes} bytes"


def _rejected(uri: str, reason: str, detail: str) -> Decoded:
    return Decoded(rejections=[Rejection(uri, reason, detail)])
