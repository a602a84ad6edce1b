"""Manifests: Parquet/JSONL rows, HLIP's JSON layout, and clear errors."""

import codecs
import json
import logging
import re
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from hlip_ray.data.manifest import (
    ManifestError,
    ScanRef,
    StudyRow,
    build_manifest,
    decode_report,
    patient_split,
    read_manifest,
    write_manifest,
)
from hlip_ray.storage import Storage
from tests.helpers import measured

CT_SMALL = Path(get_testdata_file("CT_small.dcm")).read_bytes()  # a real CT slice
REPORT = "Lésion hypodense périventriculaire, 3 mm."

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


# -- building from a folder tree: bad input ----------------------------------------------------
def _study(root: Path, study_id: str, report: bytes | None = b"No acute findings.") -> Path:
    """``root/<study_id>/`` holding one real CT slice (``CT/IM0001.dcm``) and ``report.txt`` (None: none)."""
    folder = root / study_id
    (folder / "CT").mkdir(parents=True)
    (folder / "CT" / "IM0001.dcm").write_bytes(CT_SMALL)
    if report is not None:
        (folder / "report.txt").write_bytes(report)
    return folder


@pytest.mark.timeout(120)
def test_a_2_gib_sparse_file_named_dcm_does_not_hang_the_manifest(tmp_path):
    study = _study(tmp_path / "root", "ST001")
    with open(study / "CT" / "00000000.dcm", "wb") as handle:  # sorts first: the first header tried
        handle.truncate(2 * 1024**3)  # `truncate -s 2G`: sparse, no disk
    rows, seconds, peak = measured(lambda: build_manifest(str(tmp_path / "root"), Storage(), salt="s"))
    assert [(row.study_id, row.modality, len(row.scans)) for row in rows] == [("ST001", "CT", 1)]
    assert peak < 64 * 1024**2 and seconds < 30, (peak, seconds)


def test_a_dicom_header_longer_than_the_budget_is_not_the_study_header_and_is_named(tmp_path, caplog):
    study = _study(tmp_path / "root", "ST001")
    ds = pydicom.dcmread(BytesIO(CT_SMALL))
    ds.Modality = "MR"  # read before the long element: a header cut there would give MR and no PatientID
    ds.private_block(0x0009, "HLIP TEST", create=True).add_new(0x01, "OB", bytes(8 * 1024**2))
    ds.save_as(study / "CT" / "00000000.dcm")  # sorts first: the first header tried
    caplog.set_level(logging.INFO)
    (row,) = build_manifest(str(tmp_path / "root"), Storage(), salt="s")
    assert row.modality == "CT"  # from IM0001.dcm, the next file
    assert f"{study}/CT/00000000.dcm" in caplog.text and "MiB" in caplog.text


@pytest.mark.parametrize("codec", ["utf-8", "utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
def test_a_report_with_a_byte_order_mark_is_decoded_by_it(codec):
    bom = {"utf-8": codecs.BOM_UTF8, "utf-16-le": codecs.BOM_UTF16_LE, "utf-16-be": codecs.BOM_UTF16_BE,
           "utf-32-le": codecs.BOM_UTF32_LE, "utf-32-be": codecs.BOM_UTF32_BE}[codec]
    text, guessed = decode_report(bom + f"{REPORT}\r\n".encode(codec))
    assert text == REPORT and not guessed  # the mark says the encoding: nothing guessed


def test_a_utf16_report_without_a_byte_order_mark_is_told_by_its_zero_bytes():
    assert decode_report(REPORT.encode("utf-16-le")) == (REPORT, "utf-16-le")
    assert decode_report(REPORT.encode("utf-16-be")) == (REPORT, "utf-16-be")
    assert decode_report(REPORT.encode("cp1252")) == (REPORT, "cp1252")
    assert decode_report(REPORT.encode("utf-8")) == (REPORT, "")


def test_reports_not_in_utf8_are_named_by_study_in_the_warning_and_never_quoted(tmp_path, caplog):
    root = tmp_path / "root"
    for index in range(7):
        _study(root, f"ST{index:03d}", REPORT.encode("cp1252"))
    _study(root, "UTF16", codecs.BOM_UTF16_LE + REPORT.encode("utf-16-le"))  # Windows Notepad's "Unicode"
    _study(root, "UTF8", REPORT.encode())
    caplog.set_level(logging.INFO)
    rows = build_manifest(str(root), Storage(), salt="s")
    assert {row.report for row in rows} == {REPORT}
    (warning,) = [record.getMessage() for record in caplog.records if "UTF-8" in record.getMessage()]
    assert "7 of 9 reports" in warning and "ST000, ST001, ST002, ST003, ST004 and 2 more" in warning
    assert "UTF16" not in warning and "UTF8" not in warning
    assert "hypodense" not in caplog.text  # never the report's text


def test_a_symbolic_link_to_a_study_folder_is_followed_one_level_and_said(tmp_path, caplog):
    root = tmp_path / "root"
    _study(root, "ST001")
    elsewhere = _study(tmp_path / "archive", "ST002")
    (elsewhere / "CT" / "up").symlink_to(elsewhere)  # a loop inside the linked study: not followed
    (root / "ST002").symlink_to(elsewhere)  # a study linked in from elsewhere: followed
    (root / "ST002_COPY").symlink_to(elsewhere)  # the same folder again: left out
    (root / "LOOP").symlink_to(root)  # the root inside itself: left out
    (root / "INSIDE").symlink_to(root / "ST001")  # a study listed already: left out
    (root / "GONE").symlink_to(tmp_path / "nowhere")  # dangling: left out
    caplog.set_level(logging.INFO)
    rows = build_manifest(str(root), Storage(), salt="s")
    assert [row.study_id for row in rows] == ["ST001", "ST002"]
    assert rows[1].scans == [ScanRef("CT", f"{root}/ST002/CT", "dicom")] and rows[1].modality == "CT"
    assert rows[1].report == "No acute findings."
    followed = next(record.getMessage() for record in caplog.records if "followed" in record.getMessage())
    assert "1 study folder(s)" in followed and followed.endswith(": ST002")
    left_out = next(record.getMessage() for record in caplog.records if "left out" in record.getMessage()
                    and "symbolic" in record.getMessage())
    assert "4 symbolic link(s)" in left_out
    for name in ("GONE", "INSIDE", "LOOP", "ST002_COPY"):
        assert name in left_out


def test_studies_without_a_report_are_counted_and_a_root_one_level_too_high_is_hinted(tmp_path, caplog):
    root = tmp_path / "export"
    for site, study in (("site1", "ST001"), ("site1", "ST002"), ("site2", "ST003")):
        _study(root / site, study)
    caplog.set_level(logging.INFO)
    rows = build_manifest(str(root), Storage(), salt="s")  # root/<site>/<study>/...: one level too high
    assert [row.study_id for row in rows] == ["site1", "site2"] and not any(row.report for row in rows)
    assert "2 of 2 studies" in caplog.text and "one level too high" in caplog.text
    assert f"{root}/site1/ST001/report.txt" in caplog.text
    caplog.clear()
    _study(root / "site1", "ST004", report=None)
    rows = build_manifest(str(root / "site1"), Storage(), salt="s")
    assert [row.report != "" for row in rows] == [True, True, False]
    assert "1 of 3 studies" in caplog.text and "ST004" in caplog.text and "too high" not in caplog.text
