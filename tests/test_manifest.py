"""Manifests: Parquet/JSONL rows, HLIP's JSON layout, and clear errors."""

import json
import re

import pytest

from hlip_ray.data.manifest import (
    ManifestError,
    ScanRef,
    StudyRow,
    patient_split,
    read_manifest,
    write_manifest,
)
from hlip_ray.data.storage import Storage

ROWS = [
    StudyRow("s1", "No acute abnormality.", "CT", [ScanRef("ax", "s3://b/s1/ax", "dicom")], "train", {"mass": 0}),
    StudyRow("s2", "Mass.", "MR", [ScanRef("t1", "/d/s2/t1.nii.gz", "nifti"), ScanRef("t2", "/d/s2/t2", "dicom")],
             "val", {"mass": 1}),
]


@pytest.mark.parametrize("suffix", ["parquet", "jsonl"])
def test_rows_round_trip_locally_and_on_s3(tmp_path, s3_endpoint, bucket, suffix):
    storage = Storage(endpoint_url=s3_endpoint)
    for uri in (str(tmp_path / f"m.{suffix}"), f"{bucket}/m.{suffix}"):
        write_manifest(ROWS, uri, storage)
        assert read_manifest(uri, storage) == ROWS


def test_ray_items_carry_labels_as_json_text_and_read_back():
    items = [row.to_item() for row in ROWS]
    assert items[0]["labels"] == '{"mass": 0}'
    assert [StudyRow.from_dict(item, "item") for item in items] == ROWS
    with pytest.raises(ManifestError, match="labels must map"):
        StudyRow.from_dict({**items[0], "labels": "{not json"}, "item")


def test_report_as_sentences_and_format_from_suffix(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"study_id": "a", "report": ["One.", "Two."], "modality": "mr",
                                "scans": [{"uri": "/x/a/t1.nii"}, {"name": "ax", "uri": "/x/a/ax"}]}) + "\n")
    (row,) = read_manifest(str(path), Storage())
    assert row.report == "One. Two."
    assert row.modality == "MR"
    assert [(s.name, s.format) for s in row.scans] == [("scan0", "nifti"), ("ax", "dicom")]
    assert row.split == "train" and row.labels == {}


@pytest.mark.parametrize(
    "row, message",
    [
        ({"study_id": "a", "modality": "CT", "scans": [{"uri": "/x"}]}, "row 0: missing field(s) report"),
        ({"study_id": "a", "report": "r", "modality": "PET", "scans": [{"uri": "/x"}]}, "row 0: modality"),
        ({"study_id": "a", "report": "r", "modality": "CT", "scans": [{"name": "n"}]}, "scans[0] needs a uri"),
        ({"study_id": "a", "report": "r", "modality": "CT", "scans": [{"uri": "/x", "format": "png"}]},
         "scans[0].format"),
        ({"study_id": "a", "report": "r", "modality": "CT", "scans": []}, "at least one scan"),
        ({"study_id": "a", "report": "r", "modality": "CT", "scans": [{"uri": "/x"}], "labels": {"m": "yes"}},
         "labels must map"),
    ],
)
def test_bad_rows_name_the_file_row_and_field(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ManifestError, match=re.escape(message)) as error:
        read_manifest(str(path), Storage())
    assert str(path) in str(error.value)


def test_duplicates_and_broken_lines_are_rejected(tmp_path):
    path = tmp_path / "dup.jsonl"
    line = json.dumps({"study_id": "a", "report": "r", "modality": "CT", "scans": [{"uri": "/x"}]})
    path.write_text(line + "\n" + line + "\n")
    with pytest.raises(ManifestError, match="row 1: duplicate study_id 'a'"):
        read_manifest(str(path), Storage())
    path.write_text(line + "\n{not json\n")
    with pytest.raises(ManifestError, match="line 2: not JSON"):
        read_manifest(str(path), Storage())
    (tmp_path / "m.csv").write_text("study_id\n")
    with pytest.raises(ManifestError, match="must be .parquet, .jsonl"):
        read_manifest(str(tmp_path / "m.csv"), Storage())


def test_hlip_json_layout_with_a_data_root(tmp_path):
    root = tmp_path / "data"
    (root / "BRAIN_1" / "AX_T2").mkdir(parents=True)
    (root / "BRAIN_1" / "AX_T2" / "1.dcm").write_bytes(b"x")
    (root / "BRAIN_1" / "SAG_T1.nii.gz").write_bytes(b"x")
    manifest = tmp_path / "hlip.json"
    manifest.write_text(json.dumps({"BRAIN_1": {
        "series": {"AX_T2": {"num_slices": 30, "view": "axial"}, "SAG_T1": {"num_slices": 25}},
        "report_length": 4, "report": ["Chiari malformation.", "Mild ventriculomegaly."]}}))
    (row,) = read_manifest(str(manifest), Storage(), data_root=str(root), modality="MR")
    assert row.study_id == "BRAIN_1" and row.modality == "MR"
    assert row.report == "Chiari malformation. Mild ventriculomegaly."
    assert [(s.name, s.format, s.uri) for s in row.scans] == [
        ("AX_T2", "dicom", f"{root}/BRAIN_1/AX_T2"), ("SAG_T1", "nifti", f"{root}/BRAIN_1/SAG_T1.nii.gz")]
    with pytest.raises(ManifestError, match="needs a data root"):
        read_manifest(str(manifest), Storage())


def test_patient_split_is_deterministic_salted_and_near_the_fraction():
    splits = [patient_split(f"P{i}", "salt", 0.25) for i in range(2000)]
    assert splits == [patient_split(f"P{i}", "salt", 0.25) for i in range(2000)]
    assert 0.2 < splits.count("val") / 2000 < 0.3
    assert splits != [patient_split(f"P{i}", "other salt", 0.25) for i in range(2000)]
