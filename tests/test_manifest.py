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
        ({"study_id": "a", "report": 42, "modality": "CT", "scans": [{"uri": "/x"}]}, "report must be text"),
        ({"study_id": "a", "report": "r", "modality": "CT", "scans": [{"uri": "/x"}], "labels": {"mass": 0.7}},
         "labels.mass must be 0 or 1, got 0.7"),
        ({"study_id": "a", "report": "r", "modality": "CT", "scans": [{"uri": "/x"}], "labels": {"mass": 2}},
         "labels.mass must be 0 or 1, got 2"),
        ({"study_id": "a", "report": "r", "modality": "CT", "scans": [{"uri": "/x"}], "split": "validation"},
         "split must be one of train, val, test, got 'validation'"),
        ({"study_id": "a", "report": "r", "modality": "CT", "scans": [{"uri": "/x"}], "labels": {"m": "yes"}},
         "labels.m must be 0 or 1, got 'yes'"),
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


def test_parquet_manifests_without_labels_or_with_labels_on_some_studies(tmp_path):
    scan = [ScanRef("ax", "/d/ax", "dicom")]
    unlabelled = [StudyRow("a", "r", "CT", scan), StudyRow("b", "r", "MR", scan, "val")]
    partly = [StudyRow("a", "r", "CT", scan, labels={"mass": 1}), StudyRow("b", "r", "CT", scan),
              StudyRow("c", "r", "CT", scan, labels={"infarct": 0, "mass": 0})]
    for rows in (unlabelled, partly):
        path = str(tmp_path / "m.parquet")
        write_manifest(rows, path, Storage())
        assert read_manifest(path, Storage()) == rows


def test_split_is_read_without_case_and_an_empty_manifest_is_refused(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"study_id": "a", "report": "r", "modality": "CT", "scans": [{"uri": "/x"}],
                                "split": "Val"}) + "\n")
    assert read_manifest(str(path), Storage())[0].split == "val"
    path.write_text("")
    with pytest.raises(ManifestError, match="m.jsonl: the manifest lists no studies"):
        read_manifest(str(path), Storage())


def test_a_latin1_report_is_read_as_such_and_labels_json_is_checked(tmp_path):
    from hlip_ray.data.manifest import build_manifest
    from hlip_ray.demo.synth import folder_writer, write_corpus

    write_corpus(folder_writer(str(tmp_path / "raw")), studies=2, seed=1)
    study = sorted(p for p in (tmp_path / "raw").iterdir() if p.is_dir())[0]
    (study / "report.txt").write_bytes("Lésion hypodense périventriculaire.".encode("latin-1"))
    row = next(r for r in build_manifest(str(tmp_path / "raw"), Storage(), salt="s") if r.study_id == study.name)
    assert row.report == "Lésion hypodense périventriculaire."
    (study / "labels.json").write_text(json.dumps({"modality": "CT", "labels": {"mass": 0.5}}))
    with pytest.raises(ManifestError, match=rf"{study.name}/labels.json: labels.mass must be 0 or 1"):
        build_manifest(str(tmp_path / "raw"), Storage(), salt="s")
