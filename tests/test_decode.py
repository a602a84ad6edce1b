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
import torch
import torch.nn.functional as F
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    MPEG2MPML,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from hlip_ray.data.decode import (
    DEFER_BYTES,
    HEADER_BYTES,
    MAX_DICOM_FILE_BYTES,
    NO_ELEMENTS,
    _get,
    decode_dicom_files,
    decode_nifti,
    dicom_header,
    needs_whole_file,
    read_header,
)
from hlip_ray.data.manifest import ScanRef
from hlip_ray.data.records import Decoded, Volume
from hlip_ray.data.sources import decode_scan, read_scan
from hlip_ray.data.volume import preprocess_volume, resize
from hlip_ray.storage import Storage
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
    # Kept as stored (int16) with the rescale; values() gives HU as float32.
    assert volume.pixels.shape == (1, 128, 128) and volume.pixels.dtype == np.int16
    assert volume.rescale == (float(ds.RescaleSlope), float(ds.RescaleIntercept))
    np.testing.assert_array_equal(volume.pixels[0], ds.pixel_array)
    assert volume.values().dtype == np.float32
    np.testing.assert_array_equal(volume.values()[0], expected.astype(np.float32))
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
    np.testing.assert_array_equal(volume.values()[:, 0, 0], [1 - 1000, 2 - 1000, 0 - 1000])
    assert volume.spacing == (2.0, 0.8, 0.8)


# --------------------------------------------------------------------------------------- slice order


@pytest.mark.parametrize("orientation", [AXIAL, SAGITTAL, OBLIQUE], ids=["axial", "sagittal", "oblique"])
def test_shuffled_series_is_ordered_along_the_normal(orientation):
    steps = (3, 0, 5, 1, 4, 2)
    volume = _only_volume(decode_dicom_files(_series(orientation, steps), "s3://bucket/scan"))
    order = np.argsort(steps)  # file index at each depth
    np.testing.assert_array_equal(volume.values()[:, 0, 0], 2 * order - 1024)  # slope 2, intercept -1024
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
    np.testing.assert_array_equal(volume.values()[:, 0, 0], 2 * np.arange(6) - 1024)  # InstanceNumber = i + 1


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
    np.testing.assert_array_equal(decoded.volumes[0].values()[:, 0, 0], 2 * np.array([0, 1, 2]) - 1024)
    np.testing.assert_array_equal(decoded.volumes[1].values()[:, 0, 0], 2 * np.array([3, 4, 5]) - 1024)


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



# ------------------------------------------------------------- a series held once, in its stored type


def _slices_over_defer_size(count: int = 12, shape=(192, 200), per_file=None) -> list[tuple[str, bytes]]:
    """A shuffled CT series of ``count`` random int16 slices, each's pixel data over ``DEFER_BYTES`` (so it
    stays in the file's bytes until decoded); ``per_file`` maps a file index to its attributes."""
    rng = np.random.default_rng(count)
    files = [(f"s3://bucket/scan/slice-{i}.dcm",
              _dicom(rng.integers(-1024, 3000, shape), ImagePositionPatient=[0.0, 0.0, 2.5 * ((7 * i) % count)],
                     InstanceNumber=i + 1, **(per_file or {}).get(i, {})))
             for i in range(count)]
    random.Random(1).shuffle(files)
    return files


def _hu_as_before(files: list[tuple[str, bytes]]) -> np.ndarray:
    """float32 HU ``[D, H, W]`` of a one-series scan, each slice rescaled as the decoder did before it kept
    stored values: pixel_array * slope + intercept in float64, then float32; ordered by position."""
    datasets = sorted((pydicom.dcmread(BytesIO(data)) for _, data in files), key=lambda ds: ds.ImagePositionPatient[2])
    return np.stack([(ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)).astype(np.float32)
                     for ds in datasets])


def test_a_series_keeps_its_stored_values_and_rescale():
    assert len(_dicom(np.zeros((192, 200)))) > DEFER_BYTES
    files = _slices_over_defer_size()
    volume = _only_volume(decode_dicom_files(files, "s3://bucket/scan"))
    assert volume.pixels.dtype == np.int16 and volume.rescale == (2.0, -1024.0)  # _dicom: slope 2, intercept -1024
    np.testing.assert_array_equal(volume.values(), _hu_as_before(files))


def test_files_stored_in_different_types_widen_the_volume():
    files = _slices_over_defer_size(per_file={3: {"PixelRepresentation": 0}})  # one slice stored as uint16
    volume = _only_volume(decode_dicom_files(files, "s3://bucket/scan"))
    assert volume.pixels.dtype == np.int32
    np.testing.assert_array_equal(volume.values(), _hu_as_before(files))


def test_slices_with_their_own_rescale_become_float32_values():
    files = _slices_over_defer_size(per_file={5: {"RescaleSlope": 0.5, "RescaleIntercept": -1000.25}})
    volume = _only_volume(decode_dicom_files(files, "s3://bucket/scan"))
    assert volume.pixels.dtype == np.float32 and volume.rescale == (1.0, 0.0)
    np.testing.assert_array_equal(volume.pixels, _hu_as_before(files))


@pytest.mark.parametrize(
    "bits, syntax",
    [((16, 16, 1), ExplicitVRLittleEndian), ((16, 12, 1), ExplicitVRLittleEndian),
     ((16, 12, 0), ImplicitVRLittleEndian), ((16, 16, 0), ImplicitVRLittleEndian), ((8, 8, 0), ExplicitVRLittleEndian),
     ((8, 6, 1), ExplicitVRLittleEndian), ((32, 32, 1), ExplicitVRLittleEndian)],
    ids=["int16", "int12-garbage-high-bits", "uint12-implicit", "uint16-implicit", "uint8", "int6-in-8", "int32"],
)
def test_uncompressed_pixels_read_in_place_are_pydicoms(bits, syntax):
    """Uncompressed 8/16-bit pixel data is read from the file's bytes where pydicom left it, not by pydicom: it
    must give what pydicom's pixel_array gives (unused high bits, set to garbage here, shifted away), frame by
    frame; other widths go through pydicom."""
    allocated, stored, signed = bits
    shape = (320, 256) if allocated == 8 else (256, 200)
    frames = [np.random.default_rng(i).integers(0, 2**allocated, shape, dtype=np.uint64).astype(f"<u{allocated // 8}")
              for i in range(3)]
    assert frames[0].nbytes > DEFER_BYTES

    def dicom(frame: np.ndarray, **attributes) -> bytes:
        return _dicom(np.zeros(frame.shape[-2:]), syntax=syntax, BitsAllocated=allocated, BitsStored=stored,
                      HighBit=stored - 1, PixelRepresentation=signed, PixelData=frame.tobytes(), **attributes)

    for size in (shape, (24, 20)):  # pixel data left in the file's bytes, and read with a small image's header
        files = [(f"s3://bucket/scan/f{i}.dcm",
                  dicom(frame[: size[0], : size[1]], ImagePositionPatient=[0, 0, 2.5 * i]))
                 for i, frame in enumerate(frames)]
        volume = _only_volume(decode_dicom_files(files, "s3://bucket/scan"))
        expected = np.stack([pydicom.dcmread(BytesIO(file)).pixel_array for _, file in files])
        assert volume.pixels.dtype == expected.dtype
        np.testing.assert_array_equal(volume.pixels, expected)
    multi_frame = dicom(np.stack(frames), NumberOfFrames=3, SOPClassUID="1.2.840.10008.5.1.4.1.1.2.1")
    volume = _only_volume(decode_dicom_files([("s3://bucket/mf.dcm", multi_frame)], "s3://bucket/mf"))
    np.testing.assert_array_equal(volume.pixels, pydicom.dcmread(BytesIO(multi_frame)).pixel_array)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian],
                         ids=["explicit", "implicit", "big-endian"])
def test_header_values_read_from_their_bytes_are_pydicoms(syntax):
    data = _dicom(np.zeros((4, 4)), syntax=syntax, ImageType=["ORIGINAL", "PRIMARY", "AXIAL"], InstanceNumber=" 7",
                  RescaleSlope="1.5", EchoTime="", BurnedInAnnotation="NO", PixelSpacing=["0.5", " 0.75 "])
    ds, fresh = (pydicom.dcmread(BytesIO(data)) for _ in range(2))
    for keyword in ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
                    "InstanceNumber", "RescaleSlope", "RescaleIntercept", "SliceThickness", "SOPClassUID",
                    "SeriesInstanceUID", "ImageType", "BurnedInAnnotation", "EchoTime", "NumberOfFrames", "BitsStored",
                    "PhotometricInterpretation"]:
        mine, pydicoms = _get(fresh, keyword, "absent"), ds.get(keyword, "absent")
        if isinstance(pydicoms, list | pydicom.multival.MultiValue):
            assert list(mine) == list(pydicoms), keyword
        else:
            assert mine == pydicoms and type(mine) in (int, float, str, type(pydicoms)), keyword


@pytest.mark.parametrize("cut", [0.5, 0.99, -7])
def test_a_file_cut_inside_its_pixel_data_left_in_its_bytes_is_corrupt(cut):
    files = _slices_over_defer_size()
    name, data = files[4]
    files[4] = (name, data[: int(len(data) * cut) if cut > 0 else cut])
    decoded = decode_dicom_files(files, "s3://bucket/scan")
    assert _reasons(decoded) == ["corrupt"] and "truncated" in decoded.rejections[0].detail


def test_decoding_holds_a_series_once_in_its_stored_type():
    files = _slices_over_defer_size(count=24, shape=(256, 256))
    stored = 24 * 256 * 256 * 2
    decoded, _, peak = measured(lambda: decode_dicom_files(files, "s3://bucket/scan"))
    assert _only_volume(decoded).pixels.nbytes == stored
    # Before: a parsed copy of every file's pixel data, then float32 slices, then their float32 stack (~6x).
    assert peak < 1.5 * stored, peak / stored


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
    axial.rescale = (1.0, 0.0)
    plain = preprocess_volume(axial, (6, 4, 5), [(-3, 3)])
    ras = preprocess_volume(axial, (6, 4, 5), [(-3, 3)], reorient_to_ras=True)
    np.testing.assert_array_equal(ras, plain[:, :, ::-1, ::-1])

    sagittal = _only_volume(decode_dicom_files(_series(SAGITTAL), "s3://bucket/scan"))  # W to P, H to I, D to R
    sagittal.pixels, sagittal.rescale = axial.pixels, axial.rescale
    plain = preprocess_volume(sagittal, (6, 4, 5), [(-3, 3)])
    ras = preprocess_volume(sagittal, (4, 5, 6), [(-3, 3)], reorient_to_ras=True)
    np.testing.assert_array_equal(ras[0], plain[0, :, ::-1, ::-1].transpose(1, 2, 0))  # new (S, A, R)


# ------------------------------------------- the recipe against its oracle: the one change is the resize


def _preprocess_before(volume, grid, windows, mri_percentiles=(0.5, 99.5), reorient_to_ras=False,
                       crop_foreground=False, area=False):
    """``preprocess_volume`` as it was before issue #34, the oracle: float32 HU (``Volume.values()``, what the
    decoder gave then), each window (or the MR percentiles) applied at full resolution, then a trilinear resize.
    ``area``: the one deliberate change since, and nothing else: each windowed volume is resized by an exact
    area average along an axis that shrinks (computed here from running sums; linear interpolation along one
    that grows) instead of trilinearly."""
    pixels = volume.values()
    if reorient_to_ras:
        to_ras = ornt_transform(io_orientation(volume.affine), axcodes2ornt(("S", "A", "R")))
        pixels = np.ascontiguousarray(apply_orientation(pixels, to_ras))
    ct = volume.modality.upper() == "CT"
    if crop_foreground:
        threshold = -500.0 if ct else 0.1 * float(np.percentile(pixels, mri_percentiles[1]))
        foreground = pixels > threshold
        if foreground.any():
            box = []
            for axis in range(3):
                present = np.flatnonzero(foreground.any(axis=tuple(a for a in range(3) if a != axis)))
                box.append(slice(int(present[0]), int(present[-1]) + 1))
            pixels = pixels[tuple(box)]
    if ct:
        bounds = windows
    else:
        low, high = np.percentile(pixels, mri_percentiles)
        bounds = [(float(low), float(high))]
    channels = np.stack([_scale_before(pixels, low, high) for low, high in bounds])
    if area:
        channels = np.stack([_resized_reference(channel.astype(np.float64), grid) for channel in channels])
    else:
        channels = F.interpolate(torch.from_numpy(channels)[None], size=tuple(grid), mode="trilinear",
                                 align_corners=False)[0].numpy()
    quantised = (torch.from_numpy(channels).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return quantised if len(quantised) == len(windows) else np.repeat(quantised, len(windows), axis=0)


def _scale_before(pixels, low, high):
    if high <= low:
        return np.zeros_like(pixels)
    scaled = np.clip(pixels, low, high)
    scaled -= low
    scaled /= high - low
    return scaled


def _resized_reference(pixels: np.ndarray, grid) -> np.ndarray:
    """float64 ``pixels`` resized to ``grid`` one axis at a time: where an axis shrinks, output i is the integral
    of the piecewise-constant input over [i, i + 1) * n / out (from its running sum) divided by n / out; where
    it grows or keeps its size, torch's linear interpolation (align_corners=False)."""
    for axis, out in enumerate(grid):
        moved = np.moveaxis(pixels, axis, 0)
        size = len(moved)
        if out < size:
            running = np.concatenate([np.zeros((1, *moved.shape[1:])), np.cumsum(moved, axis=0)])
            edges = np.arange(out + 1) * size / out
            whole = np.floor(edges).astype(int)
            part = (edges - whole).reshape(-1, 1, 1)
            integral = running[whole] + part * moved[np.minimum(whole, size - 1)]
            moved = np.diff(integral, axis=0) / (size / out)
        else:
            rows = torch.from_numpy(np.ascontiguousarray(moved.reshape(size, -1).T))[:, None]
            line = F.interpolate(rows, size=out, mode="linear", align_corners=False)[:, 0]
            moved = line.T.numpy().reshape(out, *moved.shape[1:])
        pixels = np.moveaxis(moved, 0, axis)
    return pixels


def _anatomy(shape, modality="CT", seed=0) -> np.ndarray:
    """int16 stored values ``[D, H, W]`` of a body in air: soft tissue, a bone, thin lines and noise (CT:
    HU + 1024, for a rescale intercept of -1024; MR: arbitrary units)."""
    rng = np.random.default_rng(seed)
    d, h, w = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    hu = np.full(shape, -1000.0)
    hu[(h / 0.7) ** 2 + (w / 0.8) ** 2 < 1 - 0.3 * d**2] = 40
    hu[(h - 0.3) ** 2 + w**2 < 0.02] = 700
    hu[:, :, shape[2] // 3] += 400  # a line a voxel wide
    hu[shape[0] // 2] += 300       # a plane a slice thick
    hu += rng.normal(0, 20, shape)
    if modality == "MR":
        return np.clip(hu + 1000, 0, None).astype(np.int16)
    return np.round(hu + 1024).astype(np.int16)


# Affines (voxel (d, h, w) -> RAS): axial as DICOM gives it (W to L, H to P, D to S) and sagittal (W to P,
# H to I, D to R): reorientation flips the first and permutes the second.
AXIAL_AFFINE = np.array([[0, 0, -0.7, 0], [0, -0.7, 0, 0], [2.5, 0, 0, 0], [0, 0, 0, 1]], float)
SAGITTAL_AFFINE = np.array([[1.5, 0, 0, 0], [0, 0, -0.9, 0], [0, -0.9, 0, 0], [0, 0, 0, 1]], float)
RECIPES = {  # name: (volume, windows, reorient, crop)
    "ct-two-windows": (Volume(_anatomy((23, 41, 37)), AXIAL_AFFINE, "CT", "v", rescale=(1.0, -1024.0)),
                       [(-1150, 350), (-160, 240)], False, False),
    "ct-cropped-reoriented": (Volume(_anatomy((19, 36, 45), seed=1), SAGITTAL_AFFINE, "CT", "v",
                                     rescale=(1.0, -1024.0)), [(-1000, 1000), (0, 80), (-1350, 150)], True, True),
    "ct-fractional-rescale": (Volume(_anatomy((17, 29, 31), seed=2), AXIAL_AFFINE, "CT", "v",
                                     rescale=(0.5, -512.25)), [(-600, 400)], True, False),
    "mr-percentiles": (Volume(_anatomy((21, 33, 27), "MR", seed=3), AXIAL_AFFINE, "MR", "v"),
                       [(0, 1)] * 2, False, False),
    "mr-cropped-reoriented": (Volume(_anatomy((15, 44, 38), "MR", seed=4), SAGITTAL_AFFINE, "MR", "v",
                                     rescale=(1.25, 3.0)), [(0, 1)], True, True),
    "nifti-float": (Volume(_anatomy((13, 27, 35), seed=5).astype(np.float32) - 1024, AXIAL_AFFINE, "CT", "v"),
                    [(-1150, 350)], False, True),
    "single-slice": (Volume(_anatomy((1, 30, 26), seed=6), AXIAL_AFFINE, "CT", "v", rescale=(1.0, -1024.0)),
                     [(-1150, 350)], False, False),
}


def _grid_as_is(volume, reorient, crop, mri_percentiles=(0.5, 99.5)) -> tuple[int, int, int]:
    """The shape a volume has when it reaches the resize (reoriented, cropped), by the oracle."""
    marker = Volume(volume.pixels, volume.affine, volume.modality, volume.uri, rescale=volume.rescale)
    probe = _preprocess_before(marker, (1, 1, 1), [(0, 1)], mri_percentiles, reorient, crop)
    assert probe.shape == (1, 1, 1, 1)
    pixels = volume.values()
    if reorient:
        pixels = apply_orientation(pixels, ornt_transform(io_orientation(volume.affine), axcodes2ornt(("S", "A", "R"))))
    if not crop:
        return pixels.shape
    threshold = -500.0 if volume.modality == "CT" else 0.1 * float(np.percentile(pixels, mri_percentiles[1]))
    return tuple(int(np.ptp(np.flatnonzero((pixels > threshold).any(axis=tuple(a for a in range(3) if a != axis)))))
                 + 1 for axis in range(3))


@pytest.mark.parametrize("name", RECIPES)
def test_on_a_grid_of_the_volumes_own_shape_the_output_is_todays(name):
    """Without resizing, windows, percentiles, rescale, cropping and reorientation are unchanged: the output
    equals the oracle's (the recipe before #34), bit for bit; MR percentiles of stored integers may differ from
    those of float32 values in their last bit (numpy interpolates them in float64), so one level there."""
    volume, windows, reorient, crop = RECIPES[name]
    grid = _grid_as_is(volume, reorient, crop)
    out = preprocess_volume(volume, grid, windows, reorient_to_ras=reorient, crop_foreground=crop)
    before = _preprocess_before(volume, grid, windows, reorient_to_ras=reorient, crop_foreground=crop)
    assert out.shape == before.shape == (len(windows), *grid) and out.dtype == np.uint8
    integers_in_mr = volume.modality == "MR" and volume.pixels.dtype.kind in "iu"
    if integers_in_mr:
        assert np.abs(out.astype(int) - before).max() <= 1 and np.mean(out != before) < 1e-3
    else:
        np.testing.assert_array_equal(out, before)


@pytest.mark.parametrize("grid", [(8, 16, 16), (5, 12, 40), (30, 9, 11)], ids=["shrink", "mixed", "grow-depth"])
@pytest.mark.parametrize("name", RECIPES)
def test_resized_output_is_the_oracles_with_an_area_average(name, grid):
    """Resized, the output is the oracle's with its one deliberate change (each windowed volume averaged over
    each output voxel's extent rather than sampled trilinearly), to one level: float32 sums here, float64 in
    the oracle, may round a value on either side of a level's edge."""
    volume, windows, reorient, crop = RECIPES[name]
    out = preprocess_volume(volume, grid, windows, reorient_to_ras=reorient, crop_foreground=crop)
    oracle = _preprocess_before(volume, grid, windows, reorient_to_ras=reorient, crop_foreground=crop,
                                area=True)
    assert out.shape == oracle.shape == (len(windows), *grid)
    assert np.abs(out.astype(int) - oracle).max() <= 1 and np.mean(out != oracle) < 1e-3


def test_shrinking_keeps_the_mean_of_the_volume():
    pixels = _anatomy((37, 61, 53)).astype(np.float64)
    resized = resize(pixels.astype(np.int16), (8, 16, 16))
    assert resized.dtype == np.float32 and resized.shape == (8, 16, 16)
    assert abs(resized.mean() - pixels.mean()) < 1e-3 * np.abs(pixels).mean()  # every voxel counts, once


def test_a_pattern_finer_than_the_grid_is_averaged_not_aliased():
    """Columns alternating 0 / 1000 HU, two voxels a period, on a grid 2.3 times coarser: the area average
    is near 500 everywhere; trilinear sampling (before #34) picked 0, 1000 or any mix, by where it fell."""
    stripes = np.zeros((4, 8, 64), np.float32)
    stripes[..., ::2] = 1000
    volume = Volume(stripes, np.eye(4), "CT", "v")
    now = preprocess_volume(volume, (4, 8, 28), [(0, 1000)])[0].astype(float)
    before = _preprocess_before(volume, (4, 8, 28), [(0, 1000)])[0].astype(float)
    assert np.abs(now - 127.5).max() < 20 and before.max() - before.min() > 100


def test_preprocessing_makes_no_full_resolution_float_copy():
    volume = Volume(_anatomy((64, 128, 128)), AXIAL_AFFINE, "CT", "v", rescale=(1.0, -1024.0))
    out, _, peak = measured(lambda: preprocess_volume(volume, (16, 32, 32), [(-1150, 350), (-160, 240), (0, 80)]))
    assert out.shape == (3, 16, 32, 32)
    # Before: a float32 copy, then one per window (and their stack): 2 + 2 x 3 x 2 = 14 times the int16 volume.
    # Now: the few slices of one output slice in float32, and the grid.
    assert peak < 0.5 * volume.pixels.nbytes, peak / volume.pixels.nbytes
