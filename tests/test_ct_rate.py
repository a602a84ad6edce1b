"""CT-RATE's published layout -> a manifest and its vocabulary, through ``hlip-ray manifest --archive ct-rate``.

A tiny copy of the layout is written per test: 8x16x16 NIfTI volumes and the report, label and metadata CSVs.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import nibabel
import numpy as np
import pytest

from hlip_ray import cli
from hlip_ray.config import StorageConfig
from hlip_ray.data.ct_rate import LABELS
from hlip_ray.data.manifest import read_manifest
from hlip_ray.data.sources import decode_scan, read_scan
from hlip_ray.eval.zeroshot import load_vocabulary
from hlip_ray.storage import Storage

# Volume -> (findings, impressions, labels set to 1). Patient valid_1 has two scans (studies a and b).
VOLUMES = {
    "train_1_a_1": ("Emphysematous changes in both lungs.", "Emphysema.", {"Emphysema"}),
    "train_1_a_2": ("Emphysematous changes in both lungs.", "Emphysema.", {"Emphysema", "Cardiomegaly"}),
    "train_2_a_1": ("No pleural effusion.", "", set()),
    "valid_1_a_1": ("Pleural effusion on the right.", "Pleural effusion.", {"Pleural effusion"}),
    "valid_1_a_2": ("Pleural effusion on the right.", "Pleural effusion.", {"Pleural effusion"}),
    "valid_1_b_1": ("", "Hiatal hernia.", {"Hiatal hernia"}),
}


def _nifti(hu: bool, seed: int) -> bytes:
    """An 8x16x16 chest-like volume: air around a body; in HU, or as raw values (HU + 1024) when not ``hu``."""
    volume = np.full((16, 16, 8), -1000.0, dtype=np.float32)
    volume[3:13, 3:13, :] = np.random.default_rng(seed).normal(40.0, 10.0, (10, 10, 8))
    if not hu:
        volume += 1024.0
    return gzip.compress(nibabel.Nifti1Image(volume.astype(np.int16), np.diag([0.75, 0.75, 1.5, 1.0])).to_bytes())


def _csv(header: list[str], rows: list[list]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode()


def ct_rate_files(volumes: dict = VOLUMES, fixed: bool = True, hu: bool = True,
                  val_reports: str = "validation_reports.csv") -> dict[str, bytes]:
    """Relative path below ``dataset/`` -> bytes of a tiny CT-RATE copy. The validation CSVs name volumes
    with ``.nii.gz``, the training ones without (both appear in the wild)."""
    files = {}
    for index, name in enumerate(volumes):
        split, patient, scan, _ = name.split("_")
        folder = f"{split}_fixed" if fixed else split
        files[f"{folder}/{split}_{patient}/{split}_{patient}_{scan}/{name}.nii.gz"] = _nifti(hu, index)
    for split, reports, labels, metadata in (
        ("train", "train_reports.csv", "train_predicted_labels.csv", "train_metadata.csv"),
        ("valid", val_reports, "valid_predicted_labels.csv", "validation_metadata.csv"),
    ):
        names = [name for name in volumes if name.startswith(split)]
        shown = [name + ".nii.gz" if split == "valid" else name for name in names]
        files[f"radiology_text_reports/{reports}"] = _csv(
            ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"],
            [[shown_name, "Cough.", "Non-contrast.", volumes[name][0], volumes[name][1]]
             for name, shown_name in zip(names, shown)])
        files[f"multi_abnormality_labels/{labels}"] = _csv(
            ["VolumeName", *LABELS],
            [[shown_name, *(int(label in volumes[name][2]) for label in LABELS)]
             for name, shown_name in zip(names, shown)])
        files[f"metadata/{metadata}"] = _csv(
            ["VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing"],
            [[shown_name, 1.0, -1024.0, "[0.75, 0.75]", 1.5] for shown_name in shown])
    return files


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for relative, data in files.items():
        path = root / "dataset" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def manifest_command(root: str, out: str, *overrides: str) -> int:
    return cli.main(["manifest", "--archive", "ct-rate", "--root", root, "--out", out, *overrides])


def test_ct_rate_layout_gives_studies_of_reconstructions_with_its_split_report_labels_and_vocabulary(
        tmp_path, capsys):
    write_tree(tmp_path / "CT-RATE", ct_rate_files())
    out = tmp_path / "out" / "manifest.parquet"
    assert manifest_command(str(tmp_path / "CT-RATE"), str(out)) == 0
    printed = capsys.readouterr().out
    assert "wrote 4 studies to" in printed and str(tmp_path / "out" / "vocabulary.json") in printed

    rows = {row.study_id: row for row in read_manifest(str(out), Storage())}
    assert sorted(rows) == ["train_1_a", "train_2_a", "valid_1_a", "valid_1_b"]
    assert {study: row.split for study, row in rows.items()} == {
        "train_1_a": "train", "train_2_a": "train", "valid_1_a": "val", "valid_1_b": "val"}
    assert [scan.name for scan in rows["train_1_a"].scans] == ["train_1_a_1", "train_1_a_2"]
    assert all(scan.format == "nifti" and Path(scan.uri).is_file() for row in rows.values() for scan in row.scans)
    assert {row.modality for row in rows.values()} == {"CT"}
    # Findings then impressions; either may be empty.
    assert rows["train_1_a"].report == "Emphysematous changes in both lungs. Emphysema."
    assert rows["train_2_a"].report == "No pleural effusion."
    assert rows["valid_1_b"].report == "Hiatal hernia."
    # All 18 labels on every study; a study's label is the maximum over its reconstructions.
    assert all(set(row.labels) == set(LABELS) for row in rows.values())
    assert rows["train_1_a"].labels["Emphysema"] == 1 and rows["train_1_a"].labels["Cardiomegaly"] == 1
    assert sum(rows["train_2_a"].labels.values()) == 0
    assert {label for label, value in rows["valid_1_a"].labels.items() if value} == {"Pleural effusion"}

    vocabulary = load_vocabulary((tmp_path / "out" / "vocabulary.json").read_bytes(), "vocabulary.json")
    assert list(vocabulary) == list(LABELS)

    # The scans decode through the pipeline's own reader and decoder, in HU.
    decoded = decode_scan(read_scan(rows["valid_1_b"].scans[0], Storage()), "CT", "scans", 8)
    assert not decoded.rejections and decoded.volumes[0].pixels.shape == (8, 16, 16)
    assert decoded.volumes[0].pixels.min() == -1000


def test_ct_rate_on_s3_with_the_validation_spelling_and_the_first_release_folders(tmp_path, s3_endpoint, bucket):
    storage = Storage.from_config(StorageConfig(endpoint_url=s3_endpoint))
    for relative, data in ct_rate_files(fixed=False, val_reports="valid_reports.csv").items():
        storage.write_bytes(f"{bucket}/CT-RATE/dataset/{relative}", data)
    out = f"{bucket}/ct-rate/manifest.jsonl"
    assert manifest_command(f"{bucket}/CT-RATE", out, f"storage.endpoint_url={s3_endpoint}") == 0
    rows = read_manifest(out, storage)
    assert [row.study_id for row in rows] == ["train_1_a", "train_2_a", "valid_1_a", "valid_1_b"]
    assert rows[2].scans[1].uri == f"{bucket}/CT-RATE/dataset/valid/valid_1/valid_1_a/valid_1_a_2.nii.gz"
    assert len(load_vocabulary(storage.read_bytes(f"{bucket}/ct-rate/vocabulary.json"))) == 18


@pytest.mark.parametrize("broken, message", [
    ("no_reports", "radiology_text_reports/validation_reports.csv: not found"),
    ("no_report_row", "validation_reports.csv: no row for volume valid_1_b_1"),
    ("no_label_column", "valid_predicted_labels.csv: missing column(s) Hiatal hernia"),
    ("not_hu", "train_1_a_1.nii.gz: not in Hounsfield units"),
])
def test_broken_layouts_are_refused_naming_the_file(tmp_path, capsys, broken, message):
    files = ct_rate_files(hu=broken != "not_hu")
    if broken == "no_reports":
        del files["radiology_text_reports/validation_reports.csv"]
    elif broken == "no_report_row":
        text = files["radiology_text_reports/validation_reports.csv"].decode()
        files["radiology_text_reports/validation_reports.csv"] = "\n".join(
            line for line in text.splitlines() if not line.startswith("valid_1_b_1")).encode()
    elif broken == "no_label_column":
        labels = "multi_abnormality_labels/valid_predicted_labels.csv"
        files[labels] = files[labels].decode().replace(",Hiatal hernia", ",Hernia").encode()
    write_tree(tmp_path, files)
    out = tmp_path / "manifest.parquet"
    assert manifest_command(str(tmp_path), str(out)) == 3
    error = capsys.readouterr().err.splitlines()[-1]   # after the progress lines
    assert error.startswith("hlip-ray: ") and message in error
    if broken == "not_hu":   # the advice names the metadata's rescale and the HU release
        assert "RescaleIntercept -1024" in error and "train_fixed" in error
    assert not out.exists()


def test_the_vocabulary_keeps_hlips_class_prompts_first():
    from hlip_ray.data.ct_rate import vocabulary_json

    vocabulary = json.loads(vocabulary_json())
    assert vocabulary["Emphysema"]["positive"][0] == "emphysema"
    assert vocabulary["Emphysema"]["negative"][0] == "not emphysema"
    assert all(len(sides["positive"]) == len(sides["negative"]) == 2 for sides in vocabulary.values())
