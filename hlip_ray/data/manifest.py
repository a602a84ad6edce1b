"""Study manifests: which studies exist, their scans, report, split and labels.

A manifest row (``StudyRow``)::

    study_id: str, report: str | list[str], modality: "CT" | "MR",
    scans: list[{name: str, uri: str, format: "dicom" | "nifti"}],
    split: str (optional), labels: {label: 0 | 1} (optional)

A DICOM scan's ``uri`` is the folder or key prefix holding its series. Manifests come as
Parquet or JSONL files of such rows, as HLIP's JSON layout plus a data root, or from a folder
listing (``root/<study>/<scan>/*.dcm | *.nii | *.nii.gz`` and ``root/<study>/report.txt``;
``hlip-ray manifest`` writes one).

Splits are per patient: a salted hash of the DICOM PatientID picks the split, so one patient's
studies never straddle train and validation. The PatientID and its hash are used in memory
only, never stored or logged.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from hlip_ray.data.decode import dicom_header
from hlip_ray.data.storage import Storage, join

logger = logging.getLogger(__name__)

FORMATS = ("dicom", "nifti")
MODALITIES = ("CT", "MR")
SPLITS = ("train", "val", "test")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file and the row or field."""


@dataclass
class ScanRef:
    name: str
    uri: str
    format: str


@dataclass
class StudyRow:
    study_id: str
    report: str
    modality: str
    scans: list[ScanRef]
    split: str = "train"
    labels: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_item(self) -> dict[str, Any]:
        """The row as a Ray Data item: ``labels`` as JSON text, since Arrow would merge the label
        names of all rows in a block into one struct and fill the names a study lacks with nulls."""
        return {**self.to_dict(), "labels": json.dumps(self.labels, sort_keys=True)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str) -> StudyRow:
        """Validate one raw row; ``where`` (file and row) prefixes every error."""
        missing = [key for key in ("study_id", "report", "modality", "scans") if raw.get(key) is None]
        if missing:
            raise ManifestError(f"{where}: missing field(s) {', '.join(missing)}")
        report = raw["report"]
        if isinstance(report, list) and all(isinstance(sentence, str) for sentence in report):
            report = " ".join(sentence.strip() for sentence in report)
        if not isinstance(report, str):
            raise ManifestError(f"{where}: report must be text (or a list of sentences), got "
                                f"{type(report).__name__}")
        modality = str(raw["modality"]).upper()
        if modality not in MODALITIES:
            raise ManifestError(f"{where}: modality must be one of {MODALITIES}, got {raw['modality']!r}")
        scans = []
        for index, scan in enumerate(raw["scans"]):
            if not isinstance(scan, dict) or not scan.get("uri"):
                raise ManifestError(f"{where}: scans[{index}] needs a uri")
            fmt = scan.get("format") or ("nifti" if scan["uri"].endswith(NIFTI_SUFFIXES) else "dicom")
            if fmt not in FORMATS:
                raise ManifestError(f"{where}: scans[{index}].format must be dicom or nifti, got {fmt!r}")
            scans.append(ScanRef(str(scan.get("name") or f"scan{index}"), str(scan["uri"]), fmt))
        if not scans:
            raise ManifestError(f"{where}: a study needs at least one scan")
        labels = raw.get("labels") or {}
        try:
            if isinstance(labels, str):  # JSON text, as in a Ray Data item (``to_item``)
                labels = json.loads(labels)
            if isinstance(labels, list):  # Parquet maps read back as lists of (key, value) pairs
                labels = dict(labels)
            labels = dict(labels.items())
        except (TypeError, ValueError, AttributeError):  # JSONDecodeError is a ValueError
            raise ManifestError(f"{where}: labels must map label names to 0 or 1") from None
        labels = checked_labels(labels, where)
        split = str(raw.get("split") or "train").lower()
        if split not in SPLITS:
            raise ManifestError(f"{where}: split must be one of {', '.join(SPLITS)}, got {raw.get('split')!r}")
        return cls(str(raw["study_id"]), report, modality, scans, split, labels)


def checked_labels(labels: dict, where: str) -> dict[str, int]:
    """Label name -> 0 or 1; anything else (0.7, 2, "yes") is refused, naming the label."""
    for name, value in labels.items():
        if isinstance(value, bool) or value not in (0, 1):
            raise ManifestError(f"{where}: labels.{name} must be 0 or 1, got {value!r}")
    return {str(name): int(value) for name, value in labels.items()}


def decode_report(data: bytes) -> tuple[str, bool]:
    """A report file's text: UTF-8, else CP1252 (older RIS exports; Latin-1 where CP1252 has a gap).
    Returns ``(text, fell_back)``."""
    try:
        return data.decode("utf-8").strip(), False
    except UnicodeDecodeError:
        try:
            return data.decode("cp1252").strip(), True
        except UnicodeDecodeError:
            return data.decode("latin-1").strip(), True


# -- reading -----------------------------------------------------------------------------
def read_manifest(uri: str, storage: Storage, data_root: str | None = None, modality: str = "MR") -> list[StudyRow]:
    """Rows of a Parquet (``.parquet``), JSONL (``.jsonl``) or HLIP JSON (``.json``) manifest.

    HLIP's JSON needs ``data_root``: scan ``name`` of study ``id`` is ``data_root/id/name``
    (a DICOM folder) or ``data_root/id/name.nii[.gz]``; its modality comes from ``modality``.
    """
    data = storage.read_bytes(uri)
    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq

        raws = pq.read_table(io.BytesIO(data)).to_pylist()
    elif uri.endswith(".jsonl"):
        raws = []
        for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    raws.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ManifestError(f"{uri} line {number}: not JSON ({error.msg})") from None
    elif uri.endswith(".json"):
        if data_root is None:
            raise ManifestError(f"{uri}: an HLIP JSON manifest needs a data root (--data-root)")
        raws = _rows_from_hlip_json(uri, data, data_root, modality, storage)
    else:
        raise ManifestError(f"{uri}: manifest must be .parquet, .jsonl or HLIP .json")
    rows = [StudyRow.from_dict(raw, f"{uri} row {index}") for index, raw in enumerate(raws)]
    if not rows:
        raise ManifestError(f"{uri}: the manifest lists no studies")
    seen: set[str] = set()
    for index, row in enumerate(rows):
        if row.study_id in seen:
            raise ManifestError(f"{uri} row {index}: duplicate study_id {row.study_id!r}")
        seen.add(row.study_id)
    return rows


def _rows_from_hlip_json(uri: str, data: bytes, root: str, modality: str, storage: Storage) -> list[dict]:
    try:
        studies = json.loads(data)
    except json.JSONDecodeError as error:
        raise ManifestError(f"{uri}: not JSON ({error.msg})") from None
    rows = []
    for study_id, entry in studies.items():
        if not isinstance(entry, dict) or "series" not in entry:
            raise ManifestError(f"{uri}: study {study_id!r} has no 'series'")
        present = set(storage.list_files(join(root, study_id))) if storage.exists(join(root, study_id)) else set()
        scans = []
        for name in entry["series"]:
            nifti = [join(root, study_id, name + suffix) for suffix in NIFTI_SUFFIXES]
            found = [candidate for candidate in nifti if candidate in present]
            if found:
                scans.append({"name": name, "uri": found[0], "format": "nifti"})
            else:
                scans.append({"name": name, "uri": join(root, study_id, name), "format": "dicom"})
        rows.append({"study_id": study_id, "report": entry.get("report") or "", "modality": modality,
                     "scans": scans, "split": entry.get("split"), "labels": entry.get("labels")})
    return rows


def write_manifest(rows: list[StudyRow], uri: str, storage: Storage) -> None:
    """Write rows as Parquet (``.parquet``) or JSONL (``.jsonl``)."""
    dicts = [row.to_dict() for row in rows]
    if uri.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(dicts, schema=_parquet_schema()), sink)
        storage.write_bytes(uri, sink.getvalue())
    elif uri.endswith(".jsonl"):
        storage.write_bytes(uri, "".join(json.dumps(d) + "\n" for d in dicts).encode())
    else:
        raise ManifestError(f"{uri}: write a manifest as .parquet or .jsonl")


def _parquet_schema():
    """The manifest's Parquet schema. ``labels`` is a map, so that studies may carry different labels
    or none at all (Arrow would infer a struct of every label name seen, or one with no field)."""
    import pyarrow as pa

    scan = pa.struct([("name", pa.string()), ("uri", pa.string()), ("format", pa.string())])
    return pa.schema([("study_id", pa.string()), ("report", pa.string()), ("modality", pa.string()),
                      ("scans", pa.list_(scan)), ("split", pa.string()), ("labels", pa.map_(pa.string(), pa.int8()))])


# -- building from a folder listing ------------------------------------------------------
def patient_split(patient_key: str, salt: str, val_fraction: float) -> str:
    """``"val"`` or ``"train"`` from a salted hash of a patient key (never stored)."""
    digest = hashlib.sha256(f"{salt}\x00{patient_key}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def build_manifest(root: str, storage: Storage, salt: str, val_fraction: float = 0.2) -> list[StudyRow]:
    """Rows for ``root/<study>/<scan>/...`` as found by listing (local folder or ``s3://``).

    A scan is a subfolder holding ``*.dcm`` files or a ``*.nii``/``*.nii.gz`` file (in the study
    folder or a scan subfolder); ``report.txt`` is the report; an optional ``labels.json``
    (``{"modality": ..., "labels": {...}}``) gives modality and labels. Otherwise the modality
    is read from the first DICOM header (NIfTI-only studies: MR). The split comes from the
    PatientID of the study's first DICOM file (NIfTI-only studies: the study id).
    """
    root = root.rstrip("/")
    by_study: dict[str, list[str]] = defaultdict(list)
    for uri in storage.list_files(root):
        relative = uri[len(root) + 1 :]
        if "/" in relative:
            by_study[relative.split("/", 1)[0]].append(uri)
    rows, not_utf8 = [], 0
    for study_id in sorted(by_study):
        files = by_study[study_id]
        study_dir = join(root, study_id)
        dicom_dirs: dict[str, list[str]] = defaultdict(list)
        scans, report, meta = [], None, {}
        for uri in files:
            relative = uri[len(study_dir) + 1 :]
            parts = relative.split("/")
            if parts[0] == "masks":
                continue
            if relative == "report.txt":
                report, fell_back = decode_report(storage.read_bytes(uri))
                not_utf8 += fell_back
            elif relative == "labels.json":
                try:
                    meta = json.loads(storage.read_bytes(uri))
                except ValueError as error:
                    raise ManifestError(f"{uri}: not JSON ({error})") from None
            elif uri.endswith(NIFTI_SUFFIXES):
                name = parts[-1].removesuffix(".gz").removesuffix(".nii") if len(parts) == 1 else parts[0]
                scans.append(ScanRef(name, uri, "nifti"))
            elif len(parts) >= 2 and (uri.lower().endswith(".dcm") or "." not in parts[-1]):
                dicom_dirs[parts[0]].append(uri)
        patient_key, modality = study_id, meta.get("modality")
        for name in sorted(dicom_dirs):
            scans.append(ScanRef(name, join(study_dir, name), "dicom"))
        if dicom_dirs:
            first = dicom_dirs[sorted(dicom_dirs)[0]][0]
            patient_id, header_modality = dicom_header(storage.read_bytes(first))
            patient_key = patient_id or study_id  # goes no further than the split below
            modality = modality or header_modality
        if not scans:
            continue
        scans.sort(key=lambda scan: scan.name)
        rows.append(StudyRow(
            study_id=study_id,
            report=report or "",
            modality=modality.upper() if modality and modality.upper() in MODALITIES else "MR",
            scans=scans,
            split=patient_split(patient_key, salt, val_fraction),
            labels=checked_labels(meta.get("labels") or {}, join(study_dir, "labels.json")),
        ))
    if not_utf8:
        logger.warning("%d of %d reports were not UTF-8 and were read as CP1252 (older RIS exports)",
                       not_utf8, len(rows))
    return rows

