"""CT-RATE, the public chest CT benchmark (Hamamci et al., 2024), as a study manifest.

The layout of the Hugging Face dataset ``ibrahimhamamci/CT-RATE``, below ``root`` or ``root/dataset``::

    train/train_<patient>/train_<patient>_<scan>/train_<patient>_<scan>_<reconstruction>.nii.gz
    valid/valid_<patient>/...                                  the validation volumes, named alike
    radiology_text_reports/train_reports.csv, validation_reports.csv
                                   VolumeName, ClinicalInformation_EN, Technique_EN, Findings_EN, Impressions_EN
    multi_abnormality_labels/train_predicted_labels.csv, valid_predicted_labels.csv
                                   VolumeName and the 18 abnormalities (``LABELS``), 0 or 1
    metadata/train_metadata.csv, validation_metadata.csv       VolumeName, RescaleSlope, RescaleIntercept, ...

A study is one patient's scan (``train_12_a``); each reconstruction of it (``train_12_a_1``,
``train_12_a_2``, lung and soft-tissue kernels) is one of its scans. Every CSV has one row per
reconstruction (``VolumeName``, with or without ``.nii.gz``). A study's

- split is CT-RATE's own: ``train`` -> ``train``, ``valid`` -> ``val`` (no hash split);
- report is the Findings_EN then the Impressions_EN of its first reconstruction's row (clinical
  information and technique are left out);
- labels are the 18 abnormalities, each the maximum over its reconstructions' rows (rows of one
  study come from one report, so they agree in practice).

Intensities. CT-RATE's second release (2025, folders ``train_fixed``/``valid_fixed``) stores
Hounsfield units. The first release stored raw values: HU = value x RescaleSlope + RescaleIntercept
from the metadata CSV, with intercepts that differ between volumes. The NIfTI decoder reads values as
stored (with the file header's own scaling) and has no per-scan rescale, so ``build_ct_rate_manifest``
reads the first volume of each split and refuses the layout if no voxel lies below ``HU_AIR_BELOW``
(a chest CT in HU holds air near -1000 HU), naming the volume and its metadata slope and intercept.
Where both releases lie side by side, the ``_fixed`` folders are used.

Folder and file names are taken with some tolerance: ``valid`` or ``validation``, with or
without ``_fixed``; ``validation_``/``valid_`` CSV prefixes.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Callable

from hlip_ray.data.manifest import ManifestError, ScanRef, StudyRow
from hlip_ray.storage import Storage, is_s3, join

logger = logging.getLogger(__name__)

# The 18 abnormality columns of CT-RATE's label CSVs, in their order.
LABELS = (
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion", "Mosaic attenuation pattern",
    "Peribronchial thickening", "Consolidation", "Bronchiectasis", "Interlobular septal thickening",
)
# Manifest split -> CT-RATE's volume folders, the preferred first (the HU release before the first one).
SPLIT_FOLDERS = {
    "train": ("train_fixed", "train"),
    "val": ("valid_fixed", "valid", "validation_fixed", "validation"),
}
REPORTS_DIR, LABELS_DIR, METADATA_DIR = "radiology_text_reports", "multi_abnormality_labels", "metadata"
REPORT_FILES = {"train": ("train_reports.csv",), "val": ("validation_reports.csv", "valid_reports.csv")}
LABEL_FILES = {"train": ("train_predicted_labels.csv",),
               "val": ("valid_predicted_labels.csv", "validation_predicted_labels.csv")}
METADATA_FILES = {"train": ("train_metadata.csv",), "val": ("validation_metadata.csv", "valid_metadata.csv")}
REPORT_COLUMNS = ("VolumeName", "Findings_EN", "Impressions_EN")
VOLUME_NAME = re.compile(r"^(?P<study>(?:train|valid)_\d+_[a-z]+)_(?P<reconstruction>\d+)\.nii(?:\.gz)?$")
HU_AIR_BELOW = -500.0  # a chest CT in HU has voxels below this (air, about -1000 HU); raw stored values do not

# Zero-shot phrases of the 18 labels (``zeroshot.load_vocabulary``'s format). The first phrase of each
# side is HLIP's CT-RATE class prompt (Zch0414/hlip, src/hlip/zeroshot_metadata_ct_rate.py: "Not <finding>"
# / "<finding>", for 16 of the labels; Medical material and Lymphadenopathy written alike here); the second
# is worded as CT-RATE's reports word findings, written for this package.
VOCABULARY: dict[str, dict[str, list[str]]] = {
    "Medical material": {
        "positive": ["medical material", "a catheter, port or surgical material is seen"],
        "negative": ["not medical material", "no catheter, tube or surgical material is seen"]},
    "Arterial wall calcification": {
        "positive": ["arterial wall calcification", "atherosclerotic calcification in the aortic wall"],
        "negative": ["not arterial wall calcification", "no calcification in the aortic wall"]},
    "Cardiomegaly": {
        "positive": ["cardiomegaly", "the heart is enlarged"],
        "negative": ["not cardiomegaly", "heart size is normal"]},
    "Pericardial effusion": {
        "positive": ["pericardial effusion", "pericardial effusion-thickening is present"],
        "negative": ["not pericardial effusion", "no pericardial effusion-thickening"]},
    "Coronary artery wall calcification": {
        "positive": ["coronary artery wall calcification", "calcified atheroma plaques in the coronary arteries"],
        "negative": ["not coronary artery wall calcification", "no calcification in the coronary arteries"]},
    "Hiatal hernia": {
        "positive": ["hiatal hernia", "a hiatal hernia is observed"],
        "negative": ["not hiatal hernia", "no hiatal hernia"]},
    "Lymphadenopathy": {
        "positive": ["lymphadenopathy", "enlarged lymph nodes in the mediastinum"],
        "negative": ["not lymphadenopathy", "no lymph node in pathological size or appearance"]},
    "Emphysema": {
        "positive": ["emphysema", "emphysematous changes in both lungs"],
        "negative": ["not emphysema", "no emphysematous changes"]},
    "Atelectasis": {
        "positive": ["atelectasis", "atelectasis in the lung"],
        "negative": ["not atelectatic", "no atelectasis"]},
    "Lung nodule": {
        "positive": ["lung nodule", "a nodule in the lung parenchyma"],
        "negative": ["not lung nodule", "no nodule in the lungs"]},
    "Lung opacity": {
        "positive": ["lung opacity", "ground-glass opacities in the lung parenchyma"],
        "negative": ["not lung opacity", "no opacity in the lung parenchyma"]},
    "Pulmonary fibrotic sequela": {
        "positive": ["pulmonary fibrotic sequela", "fibrotic sequelae changes in the lungs"],
        "negative": ["not pulmonary fibrotic sequela", "no fibrotic changes in the lungs"]},
    "Pleural effusion": {
        "positive": ["pleural effusion", "pleural effusion is present"],
        "negative": ["not pleural effusion", "no pleural effusion"]},
    "Mosaic attenuation pattern": {
        "positive": ["mosaic attenuation pattern", "mosaic attenuation pattern in the lungs"],
        "negative": ["not mosaic attenuation pattern", "no mosaic attenuation pattern"]},
    "Peribronchial thickening": {
        "positive": ["peribronchial thickening", "peribronchial thickening is observed"],
        "negative": ["not peribronchial thickening", "no peribronchial thickening"]},
    "Consolidation": {
        "positive": ["consolidation", "consolidation in the lung"],
        "negative": ["not consolidation", "no consolidation in the lungs"]},
    "Bronchiectasis": {
        "positive": ["bronchiectasis", "bronchiectasis is observed"],
        "negative": ["not bronchiectasis", "no bronchiectasis"]},
    "Interlobular septal thickening": {
        "positive": ["interlobular septal thickening", "thickening of the interlobular septa"],
        "negative": ["not interlobular septal thickening", "no interlobular septal thickening"]},
}


def vocabulary_json() -> bytes:
    """The 18-label vocabulary (``VOCABULARY``) as JSON, as ``eval.vocabulary`` reads it."""
    return (json.dumps(VOCABULARY, indent=1) + "\n").encode()


def build_ct_rate_manifest(root: str, storage: Storage, log: Callable[[str], None] = logger.info) -> list[StudyRow]:
    """Rows of the CT-RATE studies under ``root`` (local folder or ``s3://``; the folder holding ``dataset/``
    or ``dataset/`` itself), in study ID order. ``log`` gets a line per step (listing, CSVs, the HU check).

    Raises ``FileNotFoundError`` when no volume folder or a split's report or label CSV is missing, and
    ``ManifestError`` (a ValueError) naming the file for a volume without a report row, a CSV without
    its columns, a label that is not 0 or 1, or volumes not in HU (module docstring).
    """
    if not is_s3(root):
        root = os.path.abspath(root.removeprefix("file://"))
    root = root.rstrip("/")
    log(f"listing {root} ...")
    files = storage.list_files(root)
    base = join(root, "dataset") if any(uri.startswith(join(root, "dataset") + "/") for uri in files) else root
    relative = {uri[len(base) + 1:]: uri for uri in files if uri.startswith(base + "/")}
    log(f"{len(files)} files listed")
    rows: list[StudyRow] = []
    for split, folders in SPLIT_FOLDERS.items():
        present = [folder for folder in folders if any(path.startswith(folder + "/") for path in relative)]
        if not present:
            continue
        folder = present[0]
        if len(present) > 1:
            log(f"{split}: reading {folder}/ (also present, left out: {', '.join(p + '/' for p in present[1:])})")
        rows += _split_rows(split, folder, relative, base, storage, log)
    if not rows:
        expected = " or ".join(f"{folders[0]}/" for folders in SPLIT_FOLDERS.values())
        raise FileNotFoundError(f"{root}: no CT-RATE volumes found (expected {expected} of "
                                "<split>_<patient>/<split>_<patient>_<scan>/<...>_<reconstruction>.nii.gz, "
                                f"in {root} or {join(root, 'dataset')})")
    return sorted(rows, key=lambda row: row.study_id)


def _split_rows(split: str, folder: str, relative: dict[str, str], base: str, storage: Storage,
                log: Callable[[str], None]) -> list[StudyRow]:
    """The studies of one split, from its volume folder and CSVs."""
    volumes: dict[str, dict[int, str]] = defaultdict(dict)   # study -> reconstruction number -> uri
    strays = 0
    for path, uri in relative.items():
        if not path.startswith(folder + "/") or not path.endswith((".nii", ".nii.gz")):
            continue
        match = VOLUME_NAME.match(path.rsplit("/", 1)[-1])
        if match is None:
            strays += 1
            continue
        volumes[match["study"]][int(match["reconstruction"])] = uri
    if strays:
        logger.warning("%d NIfTI file(s) under %s/ are not named <split>_<patient>_<scan>_<reconstruction>.nii.gz "
                       "and were left out", strays, join(base, folder))
    reports_uri = _csv(split, REPORTS_DIR, REPORT_FILES, relative, base, required=True)
    labels_uri = _csv(split, LABELS_DIR, LABEL_FILES, relative, base, required=True)
    metadata_uri = _csv(split, METADATA_DIR, METADATA_FILES, relative, base, required=False)
    log(f"{split}: {sum(map(len, volumes.values()))} volumes of {len(volumes)} studies in {folder}/; "
        f"reading {reports_uri} and {labels_uri}")
    reports = _read_csv(reports_uri, storage, REPORT_COLUMNS)
    labels = _read_csv(labels_uri, storage, ("VolumeName", *LABELS))
    _check_hu(volumes, metadata_uri, storage, log)
    rows, unlabelled = [], 0
    for study_id, reconstructions in volumes.items():
        names = {number: f"{study_id}_{number}" for number in reconstructions}
        for number in sorted(reconstructions):
            if names[number] not in reports:
                raise ManifestError(f"{reports_uri}: no row for volume {names[number]} ({reconstructions[number]})")
        first = reports[names[min(reconstructions)]]
        report = " ".join(text for text in (first["Findings_EN"].strip(), first["Impressions_EN"].strip()) if text)
        label_rows = [labels[name] for name in names.values() if name in labels]
        study_labels = {label: max(_label(row, label, labels_uri) for row in label_rows) for label in LABELS} \
            if label_rows else {}
        unlabelled += not label_rows
        rows.append(StudyRow(
            study_id=study_id, report=report, modality="CT",
            scans=[ScanRef(names[number], reconstructions[number], "nifti") for number in sorted(reconstructions)],
            split=split, labels=study_labels,
        ))
    if unlabelled:
        logger.warning("%d %s studies have no row in %s and carry no labels", unlabelled, split, labels_uri)
    return rows


def _csv(split: str, folder: str, names: dict[str, tuple[str, ...]], relative: dict[str, str], base: str,
         required: bool) -> str | None:
    """The URI of a split's CSV in ``folder`` (the first of its accepted names that is present)."""
    for name in names[split]:
        if f"{folder}/{name}" in relative:
            return relative[f"{folder}/{name}"]
    if required:
        raise FileNotFoundError(f"{join(base, folder, names[split][0])}: not found; CT-RATE's {split} volumes need it "
                                f"(accepted names: {', '.join(names[split])})")
    return None


def _read_csv(uri: str, storage: Storage, columns: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """``{volume name without suffix: row}`` of a CT-RATE CSV that must have ``columns``."""
    try:
        reader = csv.DictReader(io.StringIO(storage.read_bytes(uri).decode("utf-8-sig")))
        missing = [column for column in columns if column not in (reader.fieldnames or [])]
        if missing:
            raise ManifestError(f"{uri}: missing column(s) {', '.join(missing)}")
        return {_volume_name(row["VolumeName"]): {key: value or "" for key, value in row.items()} for row in reader}
    except (UnicodeDecodeError, csv.Error) as error:
        raise ManifestError(f"{uri}: not a readable CSV ({type(error).__name__})") from None


def _volume_name(name: str) -> str:
    return name.strip().removesuffix(".gz").removesuffix(".nii")


def _label(row: dict[str, str], label: str, uri: str) -> int:
    value = row[label].strip()
    if value not in ("0", "1", "0.0", "1.0"):
        raise ManifestError(f"{uri}: {label} of {row['VolumeName']} must be 0 or 1, got {value!r}")
    return int(float(value))


def _check_hu(volumes: dict[str, dict[int, str]], metadata_uri: str | None, storage: Storage,
              log: Callable[[str], None]) -> None:
    """Refuse a split whose first volume (that decodes) holds no voxel below ``HU_AIR_BELOW``: its values are
    not HU (module docstring). Up to three volumes are tried."""
    from hlip_ray.data.decode import decode_nifti

    uris = [volumes[study][number] for study in sorted(volumes) for number in sorted(volumes[study])][:3]
    for uri in uris:
        log(f"checking that {uri} is in HU ...")
        decoded = decode_nifti(uri, storage.read_bytes(uri), four_d="first", modality="CT")
        if not decoded.volumes:
            continue
        lowest = float(decoded.volumes[0].pixels.min())
        if lowest < HU_AIR_BELOW:
            return
        name = _volume_name(uri.rsplit("/", 1)[-1])
        rescale = ""
        if metadata_uri is not None:
            row = _read_csv(metadata_uri, storage, ("VolumeName",)).get(name, {})
            rescale = (f"; {metadata_uri} gives it RescaleSlope {row.get('RescaleSlope', '?')}, "
                       f"RescaleIntercept {row.get('RescaleIntercept', '?')}")
        raise ManifestError(
            f"{uri}: not in Hounsfield units (lowest value {lowest:g}, a chest CT in HU has air near -1000){rescale}. "
            "The NIfTI decoder reads values as stored, so these volumes would be windowed wrongly: use CT-RATE's "
            "HU release (dataset/train_fixed, dataset/valid_fixed) or write the volumes as HU first "
            "(value x RescaleSlope + RescaleIntercept of the metadata CSV)")
    if uris:
        logger.warning("none of %s decodes: its split's intensities were not checked", ", ".join(uris))
