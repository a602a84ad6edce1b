"""Decoding DICOM/NIfTI into Volumes, rejections, and HLIP's volume preprocessing."""

from __future__ import annotations

import gzip
import logging
import random
import warnings
from io import BytesIO
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML, ExplicitVRLittleEndian, generate_uid

from hlip_ray.data.decode import (
    HEADER_BYTES,
    MAX_DICOM_FILE_BYTES,
    NO_ELEMENTS,
    decode_dicom_files,
    decode_nifti,
    dicom_header,
    needs_whole_file,
    read_header,
)
from hlip_ray.data.manifest import ScanRef
from hlip_ray.data.records import Decoded, Volume
from hlip_ray.data.sources import decode_scan, read_scan
from hlip_ray.data.storage import Storage
from hlip_ray.data.volume import preprocess_volume
from tests.helpers import measured

NIFTI_DATA = Path(nibabel.__file__).parent / "tests" / "data"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SERIES_UID = "1.2.826.0.1.3680043.8.498.1"
AXIAL, SAGITTAL = (1, 0, 0, 0, 1, 0), (0, 1, 0, 0, 0, -1)
OBLIQUE = (1, 0, 0, 0, np.cos(0.5), -np.sin(0.5))  # tilted 0.5 rad about x


# ----------------------------------------------------------------------------------- DICOM builders


def _dicom(pixels: np.ndarray, syntax=ExplicitVRLittleEndian, **attributes) -> bytes:
    """A CT Part 10 file with int16 ``pixels`` ``[rows, columns]`` (or ``[frames, rows, columns]``).

    ``attributes`` set DICOM keywords; a value of None deletes the attribute.
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.2", generate_uid(), "CT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = SERIES_UID + ".0", SERIES_UID, 1
    ds.PatientName, ds.PatientID, ds.InstanceNumber = "ANONYMOUS", "ANON", 1
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, 0.0], list(AXIAL)
    ds.PixelSpacing, ds.SliceThickness = [0.5, 0.75], 2.5
    ds.RescaleSlope, ds.RescaleIntercept = 2, -1024
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = pixels.astype("<i2").tobytes()
    if syntax.is_compressed:  # only for undecodable syntaxes: the fragment is not really encoded
        ds.PixelData = encapsulate([ds.PixelData])
        ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _series(orientation=AXIAL, steps=(3, 0, 5, 1, 4, 2), **attributes) -> list[tuple[str, bytes]]:
    """A shuffled series: file i has pixels = i and lies ``steps[i]`` * 2.5 mm along the slice normal."""
    rows, columns = np.reshape(orientation, (2, 3))
    origin, normal = np.array([10.0, -20.0, 30.0]), np.cross(rows, columns)
    files = [
        (
            f"s3://bucket/scan/slice-{i}.dcm",
            _dicom(
                np.full((4, 5), i),
                **{
                    "ImagePositionPatient": list(origin + 2.5 * step * normal),
                    "ImageOrientationPatient": list(orientation),
                    "InstanceNumber": i + 1,
                    **attributes,
                },
            ),
        )
        for i, step in enumerate(steps)
    ]
    random.Random(0).shuffle(files)
    return files


def _only_volume(decoded: Decoded) -> Volume:
    assert decoded.rejections == [] and len(decoded.volumes) == 1, decoded.rejections
    return decoded.volumes[0]


def _reasons(decoded: Decoded) -> list[str]:
    assert decoded.volumes == []
    return [rejection.reason for rejection in decoded.rejections]


def _testdata(name: str) -> tuple[str, bytes]:
    return (f"s3://bucket/{name}", Path(get_testdata_file(name)).read_bytes())


# ------------------------------------------------------------------------------- real DICOM files


def test_ct_small_is_in_hounsfield_units_with_an_ras_affine():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    volume = _only_volume(decode_dicom_files([_testdata("CT_small.dcm")], "s3://bucket/ct"))
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert volume.pixels.shape == (1, 128, 128) and volume.pixels.dtype == np.float32
    np.testing.assert_array_equal(volume.pixels[0], expected.astype(np.float32))
    assert volume.modality == "CT" and volume.uri == "s3://bucket/ct" and volume.series == "series-1"
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    np.testing.assert_allclose(volume.affine @ [0, 0, 0, 1], [-x, -y, z, 1])
    assert volume.spacing[1:] == tuple(float(v) for v in ds.PixelSpacing)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_compressed_twin_equals_uncompressed_original(name):
    original = _only_volume(decode_dicom_files([_testdata("MR_small.dcm")], "s3://bucket/mr"))
    twin = _only_volume(decode_dicom_files([_testdata(name)], "s3://bucket/mr"))
    assert original.pixels.shape == (1, 64, 64) and original.modality == "MR"
    np.testing.assert_array_equal(twin.pixels, original.pixels)
    np.testing.assert_array_equal(twin.affine, original.affine)


def test_jpeg_extended_decodes_through_the_plugin():
    ds = pydicom.dcmread(get_testdata_file("JPGExtended.dcm"))  # a secondary capture: relabel it as an NM image
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.20"
    buffer = BytesIO()
    ds.save_as(buffer)
    volume = _only_volume(decode_dicom_files([("s3://bucket/nm.dcm", buffer.getvalue())], "s3://bucket/nm"))
    np.testing.assert_array_equal(volume.pixels[0], pydicom.dcmread(get_testdata_file("JPGExtended.dcm")).pixel_array)


def test_multi_frame_frames_become_slices():
    ds = pydicom.dcmread(get_testdata_file("rtdose.dcm"))
    volume = _only_volume(decode_dicom_files([_testdata("rtdose.dcm")], "s3://bucket/dose"))
    assert int(ds.NumberOfFrames) == 15 and volume.pixels.shape == (15, 10, 10)
    np.testing.assert_array_equal(volume.pixels, ds.pixel_array)
    assert volume.spacing == (5.0, 10.0, 10.0)  # GridFrameOffsetVector steps 5 mm
    rle = _only_volume(decode_dicom_files([_testdata("rtdose_rle.dcm")], "s3://bucket/dose"))
    np.testing.assert_array_equal(rle.pixels, volume.pixels)


def test_enhanced_multi_frame_is_ordered_by_per_frame_positions():
    z = [4.0, 0.0, 2.0]  # frames stored out of order
    per_frame = [Dataset() for _ in z]
    for group, position in zip(per_frame, z):
        group.PlanePositionSequence = [Dataset()]
        group.PlanePositionSequence[0].ImagePositionPatient = [0.0, 0.0, position]
    shared = Dataset()
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = [Dataset()], [Dataset()]
    shared.PixelValueTransformationSequence = [Dataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = list(AXIAL)
    shared.PixelMeasuresSequence[0].PixelSpacing = [0.8, 0.8]
    shared.PixelValueTransformationSequence[0].RescaleSlope = 1
    shared.PixelValueTransformationSequence[0].RescaleIntercept = -1000
    data = _dicom(
        np.stack([np.full((4, 4), i) for i in range(3)]),
        SOPClassUID="1.2.840.10008.5.1.4.1.1.2.1",
        NumberOfFrames=3,
        PerFrameFunctionalGroupsSequence=per_frame,
        SharedFunctionalGroupsSequence=[shared],
        ImagePositionPatient=None,
        ImageOrientationPatient=None,
        PixelSpacing=None,
        RescaleSlope=None,
        RescaleIntercept=None,
    )
    volume = _only_volume(decode_dicom_files([("s3://bucket/enhanced.dcm", data)], "s3://bucket/enhanced"))
    np.testing.assert_array_equal(volume.pixels[:, 0, 0], [1 - 1000, 2 - 1000, 0 - 1000])
    assert volume.spacing == (2.0, 0.8, 0.8)


# --------------------------------------------------------------------------------------- slice order


@pytest.mark.parametrize("orientation", [AXIAL, SAGITTAL, OBLIQUE], ids=["axial", "sagittal", "oblique"])
def test_shuffled_series_is_ordered_along_the_normal(orientation):
    steps = (3, 0, 5, 1, 4, 2)
    volume = _only_volume(decode_dicom_files(_series(orientation, steps), "s3://bucket/scan"))
    order = np.argsort(steps)  # file index at each depth
    np.testing.assert_array_equal(volume.pixels[:, 0, 0], 2 * order - 1024)  # slope 2, intercept -1024
    assert volume.pixels.shape == (6, 4, 5)
    np.testing.assert_allclose(volume.spacing, (2.5, 0.5, 0.75))
    rows, columns = np.reshape(orientation, (2, 3))
    first = np.array([10.0, -20.0, 30.0])  # steps start at 0
    for d, h, w in [(0, 0, 0), (5, 3, 4), (2, 1, 0)]:
        lps = first + 2.5 * d * np.cross(rows, columns) + 0.5 * h * columns + 0.75 * w * rows
        np.testing.assert_allclose(volume.affine @ [d, h, w, 1], LPS_TO_RAS @ [*lps, 1], atol=1e-9)


def test_instance_number_orders_slices_without_positions():
    files = _series(ImagePositionPatient=None, ImageOrientationPatient=None)
    volume = _only_volume(decode_dicom_files(files, "s3://bucket/scan"))
    np.testing.assert_array_equal(volume.pixels[:, 0, 0], 2 * np.arange(6) - 1024)  # InstanceNumber = i + 1


def test_each_series_of_a_folder_is_a_volume():
    second = [
        (
            f"s3://bucket/scan/b{z}.dcm",
            _dicom(np.full((3, 3), 7), SeriesInstanceUID="1.2.3", SeriesNumber=2, ImagePositionPatient=[0, 0, z]),
        )
        for z in range(2)
    ]
    decoded = decode_dicom_files(second + _series(), "s3://bucket/scan")
    assert decoded.rejections == [] and [v.series for v in decoded.volumes] == ["series-1", "series-2"]
    assert [v.pixels.shape for v in decoded.volumes] == [(6, 4, 5), (2, 3, 3)]


def test_repeated_positions_split_into_one_volume_per_repetition():
    files = _series(steps=(0, 1, 2, 0, 1, 2))  # e.g. two echoes; instance numbers put echo 1 first
    decoded = decode_dicom_files(files, "s3://bucket/scan")
    assert [v.series for v in decoded.volumes] == ["series-1.1", "series-1.2"]
    np.testing.assert_array_equal(decoded.volumes[0].pixels[:, 0, 0], 2 * np.array([0, 1, 2]) - 1024)
    np.testing.assert_array_equal(decoded.volumes[1].pixels[:, 0, 0], 2 * np.array([3, 4, 5]) - 1024)


def test_copies_are_dropped_and_noted_but_blank_echoes_are_not():
    files = _series(steps=(0, 1, 2))
    name, data = files[0]
    copy = pydicom.dcmread(BytesIO(data))  # the same slice exported again under a new SOPInstanceUID
    copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buffer = BytesIO()
    copy.save_as(buffer)
    decoded = decode_dicom_files(files + [(name, data), ("s3://bucket/scan/again.dcm", buffer.getvalue())],
                                 "s3://bucket/scan")
    assert decoded.rejections == [] and decoded.volumes[0].pixels.shape == (3, 4, 5)
    assert sorted(note.reason for note in decoded.notes) == ["duplicate_slice", "duplicate_slice"]
    echoes = [(f"s3://bucket/scan/e{echo}-{z}.dcm", _dicom(np.zeros((4, 5)), ImagePositionPatient=[0, 0, z],
                                                           EchoNumbers=echo, InstanceNumber=10 * echo + z))
              for echo in (1, 2) for z in range(3)]  # identical (blank) pixels at every position
    decoded = decode_dicom_files(echoes, "s3://bucket/scan")
    assert [v.series for v in decoded.volumes] == ["series-1.1", "series-1.2"] and decoded.notes == []


def test_a_truncated_copy_of_an_intact_file_is_a_duplicate():
    files = _series()
    name, data = files[2]
    decoded = decode_dicom_files([("s3://bucket/scan/cut.dcm", data[:400])] + files, "s3://bucket/scan")
    assert _only_volume(decoded).pixels.shape == (6, 4, 5)
    assert [(note.reason, note.uri) for note in decoded.notes] == [("duplicate_slice", "s3://bucket/scan/cut.dcm")]


def test_uneven_repeats_conflict_and_short_series_are_too_few():
    assert _reasons(decode_dicom_files(_series(steps=(0, 1, 2, 0)), "s3://bucket/scan")) == ["conflicting_slices"]
    assert _reasons(decode_dicom_files(_series(), "s3://bucket/scan", min_slices=7)) == ["too_few_slices"]
    assert len(decode_dicom_files(_series(), "s3://bucket/scan", min_slices=6).volumes) == 1
    echoes = decode_dicom_files(_series(steps=(0, 1, 2, 0, 1, 2)), "s3://bucket/scan", min_slices=4)
    assert _reasons(echoes) == ["too_few_slices"]  # counted per echo: 3 slices each
    assert _reasons(decode_dicom_files([_testdata("CT_small.dcm")], "s3://x", min_slices=2)) == ["too_few_slices"]


def test_localizers_are_refused():
    scout = _series(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    assert _reasons(decode_dicom_files(scout, "s3://bucket/scan")) == ["localizer"]
    planes = _series()[:3] + _series(SAGITTAL)[3:]
    assert _reasons(decode_dicom_files(planes, "s3://bucket/scan")) == ["localizer"]


def test_dicom_is_found_by_content_whatever_the_file_is_called():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.file_meta, ds.preamble  # a bare dataset, as older exports write: no preamble, no DICM magic
    buffer = BytesIO()
    ds.save_as(buffer, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert buffer.getvalue()[128:132] != b"DICM"
    bare = _only_volume(decode_dicom_files([("s3://bucket/1.2.3.4", buffer.getvalue())], "s3://bucket"))
    original = _only_volume(decode_dicom_files([_testdata("CT_small.dcm")], "s3://bucket"))
    np.testing.assert_array_equal(bare.pixels, original.pixels)
    assert dicom_header(buffer.getvalue())[1] == "CT"
    stray = [("s3://bucket/scan/notes.txt", b"not an image"), ("s3://bucket/scan/x.dcm", b""),
             ("s3://bucket/scan/DICOMDIR", Path(get_testdata_file("DICOMDIR")).read_bytes())]
    decoded = decode_dicom_files(_series() + stray, "s3://bucket/scan")
    assert len(decoded.volumes) == 1 and decoded.rejections == []
    assert sorted(note.detail for note in decoded.notes) == ["DICOMDIR: a DICOMDIR", "notes.txt: not DICOM",
                                                             "x.dcm: zero bytes"]
    assert dicom_header(Path(get_testdata_file("DICOMDIR")).read_bytes()) == (None, None)


# ---------------------------------------------------------------------------------- bad DICOM input


@pytest.mark.parametrize("name", ["rtplan.dcm", "test-SR.dcm"])
def test_object_without_pixels_is_not_an_image(name):
    assert _reasons(decode_dicom_files([_testdata(name)], "s3://bucket/x")) == ["not_an_image"]


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm", "JPGExtended.dcm", "JPEG2000.dcm"])
def test_shipped_secondary_captures_are_rejected(name):
    assert _reasons(decode_dicom_files([_testdata(name)], "s3://bucket/x")) == ["secondary_capture"]


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9])
def test_truncated_file_is_corrupt(cut):
    name, data = _testdata("CT_small.dcm")
    assert _reasons(decode_dicom_files([(name, data[: int(len(data) * cut)])], "s3://bucket/x")) == ["corrupt"]


def test_a_truncated_slice_rejects_its_whole_series():
    files = _series()
    name, data = files[2]
    files[2] = (name, data[:-7])
    decoded = decode_dicom_files(files, "s3://bucket/scan")
    assert _reasons(decoded) == ["corrupt"] and name.rsplit("/", 1)[1] in decoded.rejections[0].detail


@pytest.mark.parametrize(
    "files, reason",
    [
        ([("x/garbage.dcm", b"\x00" * 128 + b"DICM" + bytes(range(256)) * 4)], "corrupt"),
        ([("x/empty.dcm", b"")], "unsupported_format"),  # skipped as zero bytes: no DICOM file is left
        ([], "missing_object"),
        ([("x/mpeg.dcm", _dicom(np.zeros((4, 4)), syntax=MPEG2MPML))], "unsupported_transfer_syntax"),
        ([("x/sc.dcm", _dicom(np.zeros((4, 4)), SOPClassUID="1.2.840.10008.5.1.4.1.1.7.2"))], "secondary_capture"),
        ([("x/burned.dcm", _dicom(np.zeros((4, 4)), BurnedInAnnotation="YES"))], "burned_in_annotation"),
        ([("x/a.dcm", _dicom(np.zeros((4, 4)))), ("x/b.dcm", _dicom(np.zeros((4, 5))))], "inconsistent_slice_shapes"),
        ([("x/rgb.dcm", _dicom(np.zeros((4, 4)), PhotometricInterpretation="RGB"))], "unsupported_format"),
    ],
    ids=["garbage", "empty", "no-files", "mpeg2", "secondary-capture", "burned-in", "shapes", "colour"],
)
def test_bad_dicom_is_rejected(files, reason):
    assert _reasons(decode_dicom_files(files, "s3://bucket/x")) == [reason]


def test_bad_series_does_not_reject_a_good_one():
    burned = [
        ("s3://bucket/scan/burned.dcm", _dicom(np.zeros((3, 3)), SeriesInstanceUID="1.2.3", BurnedInAnnotation="YES"))
    ]
    decoded = decode_dicom_files(_series() + burned + [_testdata("rtplan.dcm")], "s3://bucket/scan")
    assert [v.pixels.shape for v in decoded.volumes] == [(6, 4, 5)]
    assert sorted(r.reason for r in decoded.rejections) == ["burned_in_annotation", "not_an_image"]


def test_patient_fields_never_leave_the_decoder(caplog):
    canary = {"PatientName": "CANARY^PATIENT", "PatientID": "CANARY-ID-123", "PatientBirthDate": "19010101"}
    good = _dicom(np.ones((4, 4)), **canary)
    invalid = _dicom(np.ones((4, 4)), NumberOfFrames="000000000001").replace(b"000000000001", b"CANARY-ID-12")
    assert dicom_header(good)[0] == "CANARY-ID-123" and dicom_header(b"junk") == (None, None)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [
            decode_dicom_files([("s3://bucket/a.dcm", good)], "s3://bucket/scan"),
            decode_dicom_files([("s3://bucket/a.dcm", good[:-5])], "s3://bucket/scan"),
            decode_dicom_files(
                [("s3://bucket/a.dcm", _dicom(np.ones((4, 4)), BurnedInAnnotation="YES", **canary))], "s3://x"
            ),
            # an invalid value is quoted by pydicom's warnings and exceptions: it must not get through either
            decode_dicom_files([("s3://bucket/a.dcm", invalid)], "s3://bucket/scan"),
        ]
    assert len(results[0].volumes) == 1 and all(len(r.rejections) == 1 for r in results[1:])
    text = repr(results) + caplog.text + " ".join(str(w.message) for w in caught)
    text += " ".join(f"{v.uri} {v.series} {v.modality}" for r in results for v in r.volumes)
    for value in ["CANARY", "19010101"]:
        assert value not in text


# ------------------------------------------------------------------------------- huge files, by their head


def _sparse(path: Path, size: int, head: bytes = b"") -> Path:
    """A file of ``size`` bytes that takes no disk: ``head``, then a hole (zeros)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(head)
        handle.truncate(size)
    return path


def _decode_folder(folder: Path) -> Decoded:
    """Read and decode a scan folder the way ``hlip-ray preprocess`` does, without Ray."""
    return decode_scan(read_scan(ScanRef(folder.name, str(folder), "dicom"), Storage()), "CT", "scans", 1)


@pytest.mark.timeout(120)
def test_a_2_gib_sparse_file_named_dcm_is_skipped_by_its_head_without_reading_it(tmp_path):
    scan = tmp_path / "ST1" / "CT"
    _sparse(scan / "x.dcm", 2 * 1024**3)  # `truncate -s 2G x.dcm`: read whole, it hung decoding
    (scan / "IM0001.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    decoded, seconds, peak = measured(lambda: _decode_folder(scan))
    assert len(decoded.volumes) == 1 and decoded.rejections == []
    assert [(note.uri, note.reason) for note in decoded.notes] == [(str(scan / "x.dcm"), "skipped_file")]
    assert decoded.notes[0].detail.startswith("x.dcm: not DICOM")
    assert peak < 64 * 1024**2 and seconds < 30, (peak, seconds)


@pytest.mark.timeout(120)
def test_a_dicom_file_over_the_size_cap_is_refused_from_its_head_naming_it(tmp_path):
    scan = tmp_path / "ST1" / "MIXED"
    (scan / "IM0001.dcm").parent.mkdir(parents=True)
    (scan / "IM0001.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    mr = Path(get_testdata_file("MR_small.dcm")).read_bytes()  # another series: its header, then a hole
    _sparse(scan / "huge.dcm", MAX_DICOM_FILE_BYTES + 1, head=mr)
    decoded, seconds, peak = measured(lambda: _decode_folder(scan))
    assert [volume.modality for volume in decoded.volumes] == ["CT"]  # the other series is kept
    assert [(r.uri, r.reason) for r in decoded.rejections] == [(str(scan), "too_large")]
    detail = decoded.rejections[0].detail
    assert "huge.dcm: 1024 MiB" in detail and "MAX_DICOM_FILE_BYTES" in detail
    assert peak < 64 * 1024**2 and seconds < 30, (peak, seconds)
    cut = _sparse(tmp_path / "ST2" / "CUT" / "huge.dcm", MAX_DICOM_FILE_BYTES + 1, head=mr[:200])
    decoded = _decode_folder(cut.parent)  # its head names no series: the scan is refused
    assert [(r.reason, "series is unknown" in r.detail) for r in decoded.rejections] == [("too_large", True)]


def test_a_large_dicom_file_is_read_whole_after_its_head_and_slices_in_one_read(tmp_path, monkeypatch):
    frames = HEADER_BYTES // (256 * 256 * 2) + 2  # int16 frames: just over the header budget
    scan = tmp_path / "ST1" / "CT"
    scan.mkdir(parents=True)
    (scan / "enhanced.dcm").write_bytes(_dicom(np.ones((frames, 256, 256)), NumberOfFrames=frames))
    (scan / "IM0001.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    reads = []
    for method in ("read_bytes", "read_head"):
        original = getattr(Storage, method)
        monkeypatch.setattr(Storage, method, lambda self, uri, *args, _original=original, _method=method:
                            reads.append((_method, Path(uri).name)) or _original(self, uri, *args))
    decoded = _decode_folder(scan)
    assert sorted(volume.pixels.shape for volume in decoded.volumes) == [(1, 128, 128), (frames, 256, 256)]
    assert sorted(reads) == [("read_bytes", "IM0001.dcm"), ("read_bytes", "enhanced.dcm"),
                             ("read_head", "enhanced.dcm")]  # the slice in one request, as before


def test_a_header_is_read_within_the_budget_and_one_that_does_not_end_there_is_refused():
    ds = pydicom.dcmread(BytesIO(_dicom(np.zeros((4, 4)))))
    ds.private_block(0x0009, "HLIP TEST", create=True).add_new(0x01, "OB", bytes(HEADER_BYTES))  # before PatientID
    buffer = BytesIO()
    ds.save_as(buffer)
    data = buffer.getvalue()
    header = read_header(data[:HEADER_BYTES], whole=False)
    assert header.dicom and "does not end within its first 4 MiB" in header.problem and header.patient_id is None
    whole = read_header(data, whole=True)
    assert (whole.problem, whole.modality, whole.patient_id) == ("", "CT", "ANON")
    assert "ANON" not in repr(whole)  # the PatientID stays out of the repr
    small = _dicom(np.zeros((4, 4)))  # an ordinary header ends long before the budget
    assert read_header(small[:2000], whole=False).problem == ""
    assert read_header(bytes(HEADER_BYTES), whole=False).problem == "not DICOM"  # zeros: at once
    assert read_header(small[:132] + bytes(HEADER_BYTES), whole=False).problem == NO_ELEMENTS
    assert not needs_whole_file(small[:132] + bytes(HEADER_BYTES), 10 * HEADER_BYTES)  # never read whole


# ------------------------------------------------------------------------------------------- NIfTI


def _nifti(array: np.ndarray, gz: bool = False) -> bytes:
    data = nibabel.Nifti1Image(array, np.diag([2.0, 3.0, 4.0, 1.0])).to_bytes()
    return gzip.compress(data) if gz else data


def test_nifti_axes_are_k_j_i_with_a_matching_affine():
    image = nibabel.load(NIFTI_DATA / "anatomical.nii")
    volume = _only_volume(decode_nifti("s3://bucket/anat.nii", (NIFTI_DATA / "anatomical.nii").read_bytes()))
    assert image.shape == (33, 41, 25) and volume.pixels.shape == (25, 41, 33) and volume.pixels.dtype == np.float32
    assert volume.pixels[7, 20, 11] == image.get_fdata()[11, 20, 7] and volume.modality == "MR"
    np.testing.assert_array_equal(volume.pixels, image.get_fdata().transpose(2, 1, 0))
    np.testing.assert_allclose(volume.affine @ [7, 20, 11, 1], image.affine @ [11, 20, 7, 1])
    assert volume.spacing == (2.0, 2.0, 2.0)


def test_nifti_4d_as_scans_or_first():
    data = (NIFTI_DATA / "example4d.nii.gz").read_bytes()
    fdata = nibabel.load(NIFTI_DATA / "example4d.nii.gz").get_fdata()
    scans = decode_nifti("s3://bucket/4d.nii.gz", data, four_d="scans", modality="CT")
    assert [(v.pixels.shape, v.series, v.modality) for v in scans.volumes] == [
        ((24, 96, 128), "volume-1", "CT"),
        ((24, 96, 128), "volume-2", "CT"),
    ]
    np.testing.assert_array_equal(scans.volumes[1].pixels, fdata[..., 1].transpose(2, 1, 0))
    first = decode_nifti("s3://bucket/4d.nii.gz", data, four_d="first")
    assert len(first.volumes) == 1
    np.testing.assert_array_equal(first.volumes[0].pixels, scans.volumes[0].pixels)


def test_nifti2_decodes():
    fdata = nibabel.load(NIFTI_DATA / "example_nifti2.nii.gz").get_fdata()
    decoded = decode_nifti("s3://bucket/n2.nii.gz", (NIFTI_DATA / "example_nifti2.nii.gz").read_bytes())
    assert [v.pixels.shape for v in decoded.volumes] == [(12, 20, 32)] * 2
    np.testing.assert_array_equal(decoded.volumes[0].pixels, fdata[..., 0].transpose(2, 1, 0))


@pytest.mark.parametrize(
    "data, reason",
    [
        (_nifti(np.where(np.eye(3)[None] > 0, np.nan, 1.0).astype(np.float32)), "non_finite_values"),
        (_nifti(np.full((2, 3, 4), np.inf, np.float32), gz=True), "non_finite_values"),
        (_nifti(np.zeros((3, 0, 4), np.float32)), "empty_axis"),
        (b"not a nifti at all" * 40, "corrupt"),
        (_nifti(np.zeros((8, 8, 8), np.float32), gz=True)[:-40], "corrupt"),
    ],
    ids=["nan", "inf", "empty-axis", "garbage", "truncated-gz"],
)
def test_bad_nifti_is_rejected(data, reason):
    assert _reasons(decode_nifti("s3://bucket/bad.nii", data)) == [reason]


def _volume(pixels, modality="CT", affine=None) -> Volume:
    return Volume(np.asarray(pixels, np.float32), np.eye(4) if affine is None else affine, modality, "s3://bucket/v")


def test_ct_window_scaling_is_exact():
    hu = np.array([-2000, -1000, -500, -250, 500, 1000, 3000], np.float32).reshape(1, 1, 7)
    out = preprocess_volume(_volume(hu), grid=(1, 1, 7), windows=[(-1000, 1000)])
    assert out.dtype == np.uint8 and out.shape == (1, 1, 1, 7)
    np.testing.assert_array_equal(out[0, 0, 0], [0, 0, 64, 96, 191, 255, 255])  # round((hu + 1000) / 2000 * 255)


def test_two_windows_give_two_channels():
    hu = np.array([-100, 10, 30, 80, 420], np.float32).reshape(1, 1, 5)
    out = preprocess_volume(_volume(hu), grid=(1, 1, 5), windows=[(-1000, 1000), (0, 80)])
    np.testing.assert_array_equal(out[:, 0, 0], [[115, 129, 131, 138, 181], [0, 32, 96, 255, 255]])


def test_mr_is_clipped_to_percentiles_in_every_channel():
    pixels = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    exact = preprocess_volume(_volume(pixels, "MR"), (10, 10, 10), [(0, 1)] * 3, mri_percentiles=(0, 100))
    np.testing.assert_array_equal(exact[0], np.round(pixels / 999 * 255))
    assert np.array_equal(exact[0], exact[1]) and np.array_equal(exact[0], exact[2])
    pixels.flat[0] = 1e6  # one outlier must not squash the rest of the range
    clipped = preprocess_volume(_volume(pixels, "MR"), (10, 10, 10), [(0, 1)])
    assert clipped.flat[0] == 255 and clipped.flat[1] == 0 and 120 < clipped.flat[500] < 136


def test_resize_to_a_new_grid():
    out = preprocess_volume(
        _volume(np.random.default_rng(0).normal(0, 300, (5, 20, 30))), (8, 16, 16), [(-500, 500)] * 2
    )
    assert out.shape == (2, 8, 16, 16) and out.dtype == np.uint8 and 0 < out.mean() < 255


def test_constant_volume_does_not_divide_by_zero():
    with np.errstate(all="raise"), warnings.catch_warnings():
        warnings.simplefilter("error")
        out = preprocess_volume(_volume(np.full((3, 4, 5), 7.0), "MR"), (2, 2, 2), [(0, 1)] * 2)
    assert out.shape == (2, 2, 2, 2) and not out.any()


def test_ras_reorientation_of_a_dicom_volume():
    axial = _only_volume(decode_dicom_files(_series(AXIAL), "s3://bucket/scan"))  # W to L, H to P, D to S
    axial.pixels = np.random.default_rng(0).normal(size=axial.pixels.shape).astype(np.float32)
    plain = preprocess_volume(axial, (6, 4, 5), [(-3, 3)])
    ras = preprocess_volume(axial, (6, 4, 5), [(-3, 3)], reorient_to_ras=True)
    np.testing.assert_array_equal(ras, plain[:, :, ::-1, ::-1])

    sagittal = _only_volume(decode_dicom_files(_series(SAGITTAL), "s3://bucket/scan"))  # W to P, H to I, D to R
    sagittal.pixels = axial.pixels
    plain = preprocess_volume(sagittal, (6, 4, 5), [(-3, 3)])
    ras = preprocess_volume(sagittal, (4, 5, 6), [(-3, 3)], reorient_to_ras=True)
    np.testing.assert_array_equal(ras[0], plain[0, :, ::-1, ::-1].transpose(1, 2, 0))  # new (S, A, R)
