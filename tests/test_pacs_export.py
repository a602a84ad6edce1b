"""A hospital's PACS export as it comes: DICOM found by content whatever its name, stray files, duplicate
and conflicting slices, localizers, DICOMDIRs and symbolic links, each study found or refused with its
reason (no Ray: manifest, then read and decode per scan)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import nibabel
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from hlip_ray.config import DataConfig
from hlip_ray.data import manifest as manifest_module
from hlip_ray.data.manifest import build_manifest, is_dicom_name, patient_split
from hlip_ray.data.records import Decoded, Note, Rejection
from hlip_ray.data.sources import decode_scan, read_scan
from hlip_ray.storage import Storage

NIFTI_DATA = Path(nibabel.__file__).parent / "tests" / "data"
CANARY_NAME, CANARY_ID = "CANARY^PACSEXPORT", "CANARY-PID-4711"
SALT = "pacs"
MIN_SLICES = DataConfig().min_slices
SLICES = MIN_SLICES + 2  # a short real series: passes the default minimum
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01" + bytes(200) + b"\xff\xd9"
DS_STORE = b"\x00\x00\x00\x01Bud1" + bytes(120)


def _series(count: int = SLICES, source: str = "CT_small.dcm", **attributes) -> list[pydicom.Dataset]:
    """``count`` slices of one new series from one of pydicom's real files: each with its own
    SOPInstanceUID, InstanceNumber, ImagePositionPatient (5 mm apart) and pixels, and the canary patient."""
    base = pydicom.dcmread(get_testdata_file(source))
    series_uid, pixels = generate_uid(), base.pixel_array
    x, y, z = (float(value) for value in base.ImagePositionPatient)
    slices = []
    for index in range(count):
        ds = copy.deepcopy(base)
        ds.PatientName, ds.PatientID, ds.SeriesInstanceUID = CANARY_NAME, CANARY_ID, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber, ds.ImagePositionPatient = index + 1, [x, y, z + 5.0 * index]
        ds.PixelData = (pixels + index).astype(pixels.dtype).tobytes()
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        slices.append(ds)
    return slices


def _write(folder: Path, slices: list[pydicom.Dataset], name=lambda ds, i: f"IM{i:04d}.dcm") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, ds in enumerate(slices):
        ds.save_as(folder / name(ds, index), enforce_file_format=True)


def _study(root: Path, study_id: str) -> Path:
    folder = root / study_id
    folder.mkdir(parents=True)
    (folder / "report.txt").write_text(f"Report of {study_id}: no acute findings.")
    return folder


# Per study: (scans found, volumes decoded, rejection reasons, file notes by reason). Left out: absent.
EXPECTED = {
    "uid_named": (1, 1, [], {}),
    "dot_dicom": (1, 1, [], {}),
    "top_level": (1, 1, [], {}),
    "top_and_folders": (2, 3, [], {}),            # the study folder (2 series) and a NIfTI scan
    "two_series_one_folder": (1, 2, [], {}),
    "nested": (1, 1, [], {}),
    "dicomdir": (1, 1, [], {"skipped_file": 2}),
    "stray_files": (1, 1, [], {"skipped_file": 4}),
    "exported_twice": (1, 1, [], {"duplicate_slice": SLICES + 1}),
    "conflicting": (1, 0, ["conflicting_slices"], {}),
    "localizer": (1, 0, ["localizer"], {}),
    "three_plane": (1, 0, ["localizer"], {}),
    "single_slice": (1, 0, ["too_few_slices"], {}),
    "triple_copy": (1, 0, ["too_few_slices"], {"duplicate_slice": 2}),
    "links": (1, 1, [], {}),
    "nifti": (2, 3, [], {}),
}


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """One study per case of a messy export, under ``<tmp>/export``."""
    root = tmp_path_factory.mktemp("pacs") / "export"
    _write(_study(root, "uid_named") / "SE0001", _series(), name=lambda ds, i: str(ds.SOPInstanceUID))
    _write(_study(root, "dot_dicom") / "CT", _series(), name=lambda ds, i: f"slice{i}.dicom")
    _write(_study(root, "top_level"), _series(), name=lambda ds, i: f"IM{i:04d}")

    mixed = _study(root, "top_and_folders")
    _write(mixed, _series(), name=lambda ds, i: f"{i:08d}.{i + 1}")  # numeric "extensions"
    _write(mixed / "B", _series(SeriesNumber=2), name=lambda ds, i: f"I{i}.IMA")
    (mixed / "nii").mkdir()
    shutil.copy(NIFTI_DATA / "anatomical.nii", mixed / "nii" / "anatomical.nii")

    _write(_study(root, "two_series_one_folder") / "ALL", _series(SeriesNumber=1) + _series(SeriesNumber=2),
           name=lambda ds, i: f"IM{i:04d}.dcm")
    nested = _study(root, "nested") / "SER"
    series = _series()
    _write(nested / "a" / "b", series[:5])
    _write(nested / "a" / "c", series[5:], name=lambda ds, i: f"IM{i + 5:04d}.dcm")

    dicomdir = _study(root, "dicomdir") / "SE1"
    _write(dicomdir, _series())
    for name in ("DICOMDIR", "00000000"):  # a copy without its name sorts first: only its content tells
        shutil.copy(get_testdata_file("DICOMDIR"), dicomdir / name)

    stray = _study(root, "stray_files") / "SE1"
    _write(stray, _series())
    (stray / "notes.txt").write_text(f"called back, {CANARY_NAME}")
    (stray / "thumbnail.jpg").write_bytes(JPEG)
    (stray / ".DS_Store").write_bytes(DS_STORE)
    (stray / "0000.dcm").write_bytes(b"")  # zero bytes, named like DICOM and first in name order

    twice = _study(root, "exported_twice") / "CT"
    series = _series()
    _write(twice / "export1", series)
    _write(twice / "export2", series)  # the same instances again
    again = copy.deepcopy(series[3])
    again.SOPInstanceUID = again.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    _write(twice / "export1", [again], name=lambda ds, i: "IM0003_again.dcm")  # a new UID, same slice

    conflicting = _study(root, "conflicting") / "CT"
    series = _series()
    other = copy.deepcopy(series[3])
    other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    other.PixelData = (other.pixel_array + 100).astype(other.pixel_array.dtype).tobytes()
    _write(conflicting, series + [other])

    _write(_study(root, "localizer") / "SCOUT", _series(3, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]))
    planes = _series()
    for index, ds in enumerate(planes):  # a three-plane scout stored as one series
        ds.ImageOrientationPatient = [[1, 0, 0, 0, 1, 0], [0, 1, 0, 0, 0, -1], [1, 0, 0, 0, 0, -1]][index % 3]
    _write(_study(root, "three_plane") / "LOC", planes)
    _write(_study(root, "single_slice") / "DOSE", _series(1))
    single = _series(1)
    _write(_study(root, "triple_copy") / "CT", single * 3, name=lambda ds, i: f"copy{i}.dcm")

    links = _study(root, "links")
    _write(links / "SE1", _series())
    os.symlink("..", links / "SE1" / "loop")  # a folder loop
    os.symlink(links, links / "again")  # the study folder inside itself
    os.symlink(links / "nowhere.dcm", links / "SE1" / "dangling.dcm")
    os.symlink("self.dcm", links / "SE1" / "self.dcm")  # a link to itself

    nifti = _study(root, "nifti")
    shutil.copy(NIFTI_DATA / "anatomical.nii", nifti / "anatomical.nii")
    (nifti / "T1").mkdir()
    shutil.copy(NIFTI_DATA / "example4d.nii.gz", nifti / "T1" / "example4d.nii.gz")

    junk = _study(root, "no_images") / "thumbs"  # left out: nothing in it is DICOM by name or NIfTI
    junk.mkdir()
    (junk / "key.jpg").write_bytes(JPEG)
    (junk / "index.xml").write_text("<index/>")
    return root


def _decode_study(row, storage: Storage) -> Decoded:
    decoded = Decoded()
    for scan in row.scans:
        scan_decoded = decode_scan(read_scan(scan, storage), row.modality, "scans", MIN_SLICES)
        decoded.volumes += scan_decoded.volumes
        decoded.rejections += scan_decoded.rejections
        decoded.notes += scan_decoded.notes
    return decoded


def test_every_study_of_the_export_is_found_and_decoded_or_refused_with_its_reason(export, caplog):
    storage = Storage()
    rows = {row.study_id: row for row in build_manifest(str(export), storage, salt=SALT)}
    assert sorted(rows) == sorted(EXPECTED)  # "no_images" is left out, and says so
    assert "1 study folder(s)" in caplog.text and "no_images" in caplog.text
    for study_id, (scans, volumes, reasons, notes) in EXPECTED.items():
        row = rows[study_id]
        decoded = _decode_study(row, storage)
        found = (len(row.scans), len(decoded.volumes), sorted(r.reason for r in decoded.rejections),
                 dict(Counter(note.reason for note in decoded.notes)))
        assert found == (scans, volumes, reasons, notes), study_id
        assert all(volume.pixels.shape[0] >= MIN_SLICES for volume in decoded.volumes if volume.modality == "CT")
        if study_id != "nifti":
            assert row.modality == "CT", study_id


def test_files_in_the_study_folder_make_it_the_one_scan_and_none_is_read_twice(export):
    storage = Storage()
    rows = {row.study_id: row for row in build_manifest(str(export), storage, salt=SALT)}
    assert [(scan.name, scan.uri, scan.format) for scan in rows["top_level"].scans] == [
        ("top_level", str(export / "top_level"), "dicom")]
    mixed = rows["top_and_folders"]
    assert [(scan.uri, scan.format) for scan in mixed.scans] == [
        (str(export / "top_and_folders/nii/anatomical.nii"), "nifti"), (str(export / "top_and_folders"), "dicom")]
    files = read_scan(mixed.scans[1], storage).files
    assert len(files) == 2 * SLICES  # its DICOM files only: not report.txt, not the NIfTI scan
    assert [scan.uri for scan in rows["nested"].scans] == [str(export / "nested/SER")]
    exported_twice = _decode_study(rows["exported_twice"], storage)
    assert exported_twice.volumes[0].pixels.shape[0] == SLICES


def test_dicomdir_is_neither_an_image_nor_the_study_header(export, monkeypatch):
    keys = []

    def recording_split(patient_key, salt, val_fraction):
        keys.append(patient_key)
        return patient_split(patient_key, salt, val_fraction)

    monkeypatch.setattr(manifest_module, "patient_split", recording_split)
    rows = build_manifest(str(export), Storage(), salt=SALT)
    by_study = dict(zip((row.study_id for row in rows), keys))
    assert {row.study_id: row.modality for row in rows}["dicomdir"] == "CT"
    assert by_study["dicomdir"] == CANARY_ID  # split by patient, not by study
    assert by_study["stray_files"] == CANARY_ID  # the zero-byte 0000.dcm was not taken for the header
    assert by_study["nifti"] == "nifti"
    decoded = _decode_study(next(row for row in rows if row.study_id == "dicomdir"), Storage())
    assert sorted(note.detail for note in decoded.notes) == ["00000000: a DICOMDIR", "DICOMDIR: a DICOMDIR"]


def test_stray_files_are_skipped_and_counted_by_name(export):
    rows = build_manifest(str(export), Storage(), salt=SALT)
    decoded = _decode_study(next(row for row in rows if row.study_id == "stray_files"), Storage())
    assert sorted(note.detail for note in decoded.notes) == [
        ".DS_Store: not DICOM", "0000.dcm: zero bytes", "notes.txt: not DICOM", "thumbnail.jpg: not DICOM"]
    assert all(note.uri.startswith(str(export / "stray_files/SE1/")) for note in decoded.notes)


def test_a_relative_root_is_taken_from_the_current_folder(export, monkeypatch):
    absolute = build_manifest(str(export), Storage(), salt=SALT)
    monkeypatch.chdir(export.parent)
    relative = build_manifest("export", Storage(), salt=SALT)
    assert relative == absolute and len(relative) == len(EXPECTED)
    monkeypatch.chdir(export / "links")
    assert [row.study_id for row in build_manifest(".", Storage(), salt=SALT)] == ["SE1"]


def test_listing_reads_one_header_per_study(export, monkeypatch):
    reads = []
    original = Storage.read_bytes

    def counting_read(self, uri):
        reads.append(uri)
        return original(self, uri)

    monkeypatch.setattr(Storage, "read_bytes", counting_read)
    original_head = Storage.read_head

    def counting_head(self, uri, nbytes):
        reads.append(uri)
        return original_head(self, uri, nbytes)

    monkeypatch.setattr(Storage, "read_head", counting_head)
    rows = build_manifest(str(export), Storage(), salt=SALT)
    headers = Counter(Path(uri).relative_to(export).parts[0] for uri in reads if not uri.endswith("report.txt"))
    # one header per DICOM study; the DICOMDIR copy and the zero-byte file cost one more read each
    assert headers == {row.study_id: 1 for row in rows if row.study_id != "nifti"} | {"dicomdir": 2,
                                                                                       "stray_files": 2}


def test_patient_fields_reach_no_manifest_row_rejection_or_note(export, caplog):
    storage = Storage()
    rows = build_manifest(str(export), storage, salt=SALT)
    records: list[Rejection | Note] = []
    for row in rows:
        decoded = _decode_study(row, storage)
        records += decoded.rejections + decoded.notes
    assert {record.reason for record in records} >= {"skipped_file", "duplicate_slice", "conflicting_slices",
                                                      "localizer", "too_few_slices"}
    text = repr([row.to_dict() for row in rows]) + repr(records) + caplog.text
    for needle in (CANARY_NAME, CANARY_ID, "CANARY", "PACSEXPORT"):
        assert needle not in text


@pytest.mark.parametrize(
    "name, candidate",
    [("IM0001", True), ("1.2.826.0.1.3680043.8.498.1", True), ("IM0001.1", True), ("a.dcm", True),
     ("A.DCM", True), ("x.dicom", True), ("y.IMA", True), ("notes.txt", False), ("thumb.jpg", False),
     ("labels.json", False), (".DS_Store", False), ("._IM0001.dcm", False), ("DICOMDIR", False),
     ("index.xml", False), ("report.pdf", False)],
)
def test_dicom_candidates_by_name(name, candidate):
    assert is_dicom_name(name) is candidate


def test_an_export_on_s3_is_found_the_same_way(export, s3_endpoint, bucket):
    storage = Storage(endpoint_url=s3_endpoint)
    studies = ("uid_named", "top_level", "stray_files", "exported_twice")
    for study in studies:
        for path in sorted((export / study).rglob("*")):
            if path.is_file() and not path.is_symlink():
                storage.write_bytes(f"{bucket}/raw/{path.relative_to(export)}", path.read_bytes())
    rows = {row.study_id: row for row in build_manifest(f"{bucket}/raw/", storage, salt=SALT)}
    assert sorted(rows) == sorted(studies)
    assert [scan.uri for scan in rows["top_level"].scans] == [f"{bucket}/raw/top_level"]
    for row in rows.values():
        _, volumes, _, notes = EXPECTED[row.study_id]
        decoded = _decode_study(row, storage)
        assert (len(decoded.volumes), dict(Counter(note.reason for note in decoded.notes))) == (volumes, notes)


def test_the_export_preprocesses_to_each_usable_study_once_and_each_refusal_with_its_reason(export, tmp_path,
                                                                                          ray_session, capsys):
    """The whole way, as a user runs it: `hlip-ray manifest`, then `hlip-ray preprocess` twice."""
    from hlip_ray import cli
    from hlip_ray.data.shards import read_index

    settings = ["data.grid=[8,16,16]", "data.windows=[[0,80]]", "resources.data=data_pool"]
    manifest, out = str(tmp_path / "manifest.parquet"), tmp_path / "shards"
    assert cli.main(["manifest", "--root", str(export), "--out", manifest]) == 0
    for _ in range(2):
        assert cli.main(["preprocess", "--manifest", manifest, "--out", str(out), *settings]) == 0
    summary = capsys.readouterr().out
    written = sorted(row["study_id"] for row in read_index(str(out), Storage()))
    usable = sorted(study for study, (_, volumes, _, _) in EXPECTED.items() if volumes)
    assert written == usable                                               # each once, after two runs
    records = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    for study, (_, volumes, reasons, notes) in EXPECTED.items():
        found = Counter(record["reason"] for record in records if record["study_id"] == study)
        assert {reason: found[reason] for reason in notes} == notes, study
        assert all(found[reason] for reason in reasons), study
        if not volumes:
            assert found["no_usable_scan"] == 1, study
    assert re.search(rf"^  written +{len(usable)}  0 now, {len(usable)} by an earlier run$", summary, re.M)
    for path in out.rglob("*"):
        if path.is_file():
            assert CANARY_NAME.encode() not in path.read_bytes() and CANARY_ID.encode() not in path.read_bytes()
