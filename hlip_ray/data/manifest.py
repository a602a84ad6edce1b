"""Study manifests: which studies exist, their scans, report, split and labels.

A manifest row (``StudyRow``)::

    study_id: str, report: str | list[str], modality: "CT" | "MR",
    scans: list[{name: str, uri: str, format: "dicom" | "nifti"}],
    split: str (optional), labels: {label: 0 | 1} (optional)

A DICOM scan's ``uri`` is the folder or key prefix holding its series. Manifests come as
Parquet or JSONL files of such rows, as HLIP's JSON layout plus a data root, or from a folder
listing as PACS exports come (``root/<study>/...``: DICOM files by name, whatever their extension,
NIfTI files, ``report.txt``; ``build_manifest`` says what it finds, ``hlip-ray manifest`` writes it).
Listing reads one DICOM header per study, within ``decode.HEADER_BYTES`` (a ranged read); whether each
file really is DICOM is decided when the scan is decoded (``decode.decode_dicom_files``), where stray
files are skipped and counted.

Splits are per patient: a salted hash of the DICOM PatientID picks the split, so one patient's
studies never straddle train and validation. The PatientID and its hash are used in memory
only, never stored or logged.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import logging
import os
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from hlip_ray.data.decode import HEADER_BYTES, read_header
from hlip_ray.storage import Storage, is_s3, join

logger = logging.getLogger(__name__)

FORMATS = ("dicom", "nifti")
MODALITIES = ("CT", "MR")
SPLITS = ("train", "val", "test")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")  # any case; also no extension, or digits only (``is_dicom_name``)
STUDY_FILES = ("report.txt", "labels.json")  # at the top of a study folder: never part of a scan
MASKS_DIR = "masks"  # lesion masks of a study (the synthetic corpus): never a scan
HEADER_READS = 8  # files tried per study for its one DICOM header, so junk named like DICOM costs little
# Byte-order marks, and the encoding each says. UTF-32 LE's mark begins with UTF-16 LE's: it is tried first.
BYTE_ORDER_MARKS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
                    (codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
SHOWN = 5  # names given in a warning about many studies, before "and N more"


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


def decode_report(data: bytes) -> tuple[str, str]:
    """A report file's text, and the encoding that had to be guessed ("" when none was).

    A byte-order mark says the encoding: UTF-8, UTF-16 or UTF-32 in either byte order (Windows' "Unicode"
    text is UTF-16 LE with a mark). Without one: UTF-8; else UTF-16 when zero bytes fill every other byte
    (text in UTF-16 without a mark; guessed); else CP1252 (older RIS exports; Latin-1 where CP1252 has a
    gap; guessed)."""
    for mark, encoding in BYTE_ORDER_MARKS:
        if data.startswith(mark):
            try:
                return data[len(mark) :].decode(encoding).strip(), ""
            except UnicodeDecodeError:
                break  # marked, but not in that encoding: guessed below
    else:
        try:
            text = data.decode("utf-8")
            if "\x00" not in text:
                return text.strip(), ""
        except UnicodeDecodeError:
            pass
    utf16 = _utf16_by_zero_bytes(data)
    for encoding in ([utf16] if utf16 else []) + ["cp1252"]:
        try:
            return data.decode(encoding).strip(), encoding
        except UnicodeDecodeError:
            pass
    return data.decode("latin-1").strip(), "latin-1"


def _utf16_by_zero_bytes(data: bytes) -> str:
    """ "utf-16-le" or "utf-16-be" when zero bytes fill at least half the odd or the even bytes of ``data``
    and none of the others (characters below U+0100, most of a report, have a zero high byte), else ""."""
    if len(data) < 2 or len(data) % 2:
        return ""
    even, odd = data[0::2].count(0), data[1::2].count(0)
    if odd >= len(data) / 4 and not even:
        return "utf-16-le"
    if even >= len(data) / 4 and not odd:
        return "utf-16-be"
    return ""


def _names(names: list[str]) -> str:
    """The first ``SHOWN`` of ``names``, then how many more."""
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


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


def is_dicom_name(name: str) -> bool:
    """Whether a file may be DICOM by its name: ``*.dcm``, ``*.dicom``, ``*.ima`` (any case), no
    extension (``IM0001``), or an extension of digits only (UID-named files such as ``1.2.826.0.1.3680``,
    ``IM0001.1``). Hidden files (``.DS_Store``, macOS ``._IM0001`` copies) and ``DICOMDIR`` never are;
    nor is any other extension (``.txt``, ``.jpg``, ``.png``, ``.json``, ``.xml``, ``.pdf``, ...)."""
    if name.startswith(".") or name.upper() == "DICOMDIR":
        return False
    _, dot, extension = name.rpartition(".")
    return not dot or extension.isdigit() or name.lower().endswith(DICOM_SUFFIXES)


def is_scan_member(relative: str) -> bool:
    """Whether a file ``relative`` to a DICOM scan's folder is read as part of the scan: every file but
    NIfTI files (scans of their own) and, at the folder's top, the study's own files (``STUDY_FILES``,
    ``masks/``), which a scan that is the study folder itself holds too."""
    return not (relative.endswith(NIFTI_SUFFIXES) or relative in STUDY_FILES
                or relative.split("/", 1)[0] == MASKS_DIR)


def build_manifest(root: str, storage: Storage, salt: str, val_fraction: float = 0.2) -> list[StudyRow]:
    """Rows for the study folders ``root/<study>/`` as found by listing (local folder or ``s3://``).

    What a study folder holds:

    - DICOM scans. A DICOM file is found by its name (``is_dicom_name``: ``*.dcm``, ``*.dicom``,
      ``*.ima``, no extension, UID-like names), at any depth. Each subfolder holding such files is one
      scan, however deep its files lie (``<scan>/a/b/IM1``). Files directly in the study folder make the
      study folder itself the one DICOM scan, subfolders included (no file is read twice). A scan may
      hold several series: decoding tells them apart by SeriesInstanceUID, and skips and counts the
      files that turn out not to be DICOM (``decode.decode_dicom_files``).
    - NIfTI scans: each ``*.nii``/``*.nii.gz`` file, in the study folder or a subfolder.
    - ``report.txt``, the report; optional ``labels.json`` (``{"modality": ..., "labels": {...}}``),
      which gives modality and labels. ``masks/`` is never a scan.

    Without a modality in ``labels.json`` it is read from the study's DICOM header (NIfTI-only studies:
    MR). The split comes from that header's PatientID (NIfTI-only studies: the study id). The header is
    the first of the study's DICOM files (top-level files first, then subfolders in name order) that
    is DICOM by content and not a DICOMDIR: one read of at most ``decode.HEADER_BYTES`` (``Storage.read_head``:
    a ranged GET on S3) per study, up to ``HEADER_READS`` when the first files are not DICOM. A header that
    does not end within ``HEADER_BYTES`` is not used (logged, naming the file). A study with neither DICOM
    nor NIfTI files is left out (logged, with a count). A study without report text is kept, and logged with
    a count (and a hint when most have none and ``report.txt`` lies one level deeper: the root is then
    likely one level too high); preprocessing and training refuse it (``empty_report``). Reports whose
    encoding had to be guessed (``decode_report``) are logged by study id, never their text.

    A relative local ``root`` is taken from the current folder. Below the study folders the listing does
    not follow symbolic links to folders (no loop is walked), and a dangling link is not listed
    (``Storage.list_files``). A study folder that is itself a link to a folder elsewhere is followed, one
    level (links inside it are not), and logged; a study-level link is left out, and logged, when it leads
    to the root or a folder above it (a loop), into the root (a second copy of what is listed already),
    to the folder another such link leads to, or nowhere (``_linked_studies``).
    """
    if not is_s3(root):
        root = os.path.abspath(root.removeprefix("file://"))
    root = root.rstrip("/")
    by_study: dict[str, list[str]] = defaultdict(list)
    for uri in storage.list_files(root):
        relative = uri[len(root) + 1 :]
        if "/" in relative:
            by_study[relative.split("/", 1)[0]].append(uri)
    for name, link in _linked_studies(root, storage).items():
        by_study[name] += storage.list_files(link)
    rows, guessed, empty = [], [], []
    for study_id in sorted(by_study):
        row, encoding = study_row(study_id, join(root, study_id), by_study[study_id], storage, salt, val_fraction)
        if row is None:
            empty.append(study_id)
            continue
        rows.append(row)
        if encoding:
            guessed.append((study_id, encoding))
    if guessed:
        by_encoding = ", ".join(f"{encoding}: {count}" for encoding, count in
                                sorted(Counter(encoding for _, encoding in guessed).items()))
        logger.warning("%d of %d reports were not UTF-8 and had no byte-order mark; their encoding was guessed "
                       "(%s; CP1252 is that of older RIS exports): %s", len(guessed), len(rows), by_encoding,
                       _names([study_id for study_id, _ in guessed]))
    if empty:
        logger.warning("%d study folder(s) under %s hold no DICOM or NIfTI file and were left out: %s",
                       len(empty), root, _names(empty))
    _warn_missing_reports(rows, by_study, root)
    return rows


def _linked_studies(root: str, storage: Storage) -> dict[str, str]:
    """The study folders under a local ``root`` that are symbolic links to folders, to be listed through
    the link: name -> link path. Only this level is followed (``Storage.list_files`` follows no link below
    it), so no loop is walked. Left out, and logged: a link to the root or a folder above it (a loop), into
    the root (its folders are listed already: a second copy), to the folder an earlier link (in name order)
    leads to, or to nothing. The links followed are logged too."""
    links = storage.folder_links(root)  # none on S3
    if not links:
        return {}
    real_root = os.path.realpath(root)
    followed: dict[str, str] = {}
    targets: dict[str, str] = {}  # real path -> the name of the link followed to it
    left_out = []
    for link, target in links.items():
        name = os.path.basename(link)
        if target is None:
            why = "it leads nowhere"
        elif os.path.commonpath([target, real_root]) == target:
            why = "a loop: it leads to the root or a folder above it"
        elif os.path.commonpath([target, real_root]) == real_root:
            why = "it leads into the root, whose folders are listed already"
        elif target in targets:
            why = f"it leads where {targets[target]} does"
        else:
            followed[name], targets[target] = link, name
            continue
        left_out.append(f"{name} ({why})")
    if followed:
        logger.warning("%d study folder(s) under %s are symbolic links to folders elsewhere and were followed "
                       "(one level: links inside them are not): %s", len(followed), root, _names(list(followed)))
    if left_out:
        logger.warning("%d symbolic link(s) under %s were left out: %s", len(left_out), root, _names(left_out))
    return followed


def _warn_missing_reports(rows: list[StudyRow], by_study: dict[str, list[str]], root: str) -> None:
    """Log the studies without report text; when most have none and some hold a ``report.txt`` one level
    deeper (``root/<site>/<study>/report.txt``), say that the root is likely one level too high."""
    missing = [row.study_id for row in rows if not row.report.strip()]
    if not missing:
        return
    deeper = []  # a report.txt one level below each study folder that has one there
    for study_id in missing:
        prefix = join(root, study_id) + "/"
        deeper += [uri for uri in by_study[study_id] if uri.startswith(prefix)
                   and uri[len(prefix) :].count("/") == 1 and uri.endswith("/report.txt")][:1]
    hint = ""
    if deeper and 2 * len(missing) > len(rows):
        hint = (f". {len(deeper)} of them hold a report.txt one level deeper (such as {deeper[0]}): the root "
                "is likely one level too high; give the folder whose subfolders are the studies "
                "(hlip-ray manifest --root)")
    logger.warning("%d of %d studies under %s have no report text (no report.txt in the study folder, or an "
                   "empty one): %s. They are kept; preprocessing and training refuse them (empty_report)%s",
                   len(missing), len(rows), root, _names(missing), hint)


def study_row(study_id: str, study_dir: str, files: list[str], storage: Storage, salt: str,
              val_fraction: float = 0.2) -> tuple[StudyRow | None, str]:
    """The row of one study folder from its listed ``files`` (``build_manifest``'s rules), or None when
    it holds no DICOM or NIfTI file; and the encoding guessed for its report ("" when none was:
    ``decode_report``)."""
    dicom_files: dict[str, list[str]] = defaultdict(list)  # scan folder ("" for the study folder) -> uris
    scans, report, meta, guessed = [], None, {}, ""
    for uri in files:
        relative = uri[len(study_dir) + 1 :]
        parts = relative.split("/")
        if parts[0] == MASKS_DIR:
            continue
        if relative == "report.txt":
            report, guessed = decode_report(storage.read_bytes(uri))
        elif relative == "labels.json":
            try:
                meta = json.loads(storage.read_bytes(uri))
            except ValueError as error:
                raise ManifestError(f"{uri}: not JSON ({error})") from None
        elif uri.endswith(NIFTI_SUFFIXES):
            name = parts[-1].removesuffix(".gz").removesuffix(".nii") if len(parts) == 1 else parts[0]
            scans.append(ScanRef(name, uri, "nifti"))
        elif is_dicom_name(parts[-1]):
            dicom_files[parts[0] if len(parts) > 1 else ""].append(uri)
    if "" in dicom_files:
        scans.append(ScanRef(study_id, study_dir, "dicom"))
    else:
        scans += [ScanRef(name, join(study_dir, name), "dicom") for name in dicom_files]
    if not scans:
        return None, guessed
    patient_key, modality = study_id, meta.get("modality")
    candidates = [uri for folder in sorted(dicom_files) for uri in dicom_files[folder]]
    for uri in candidates[:HEADER_READS]:
        try:
            head = storage.read_head(uri, HEADER_BYTES)  # a huge file costs what its head does
        except FileNotFoundError:  # gone since the listing
            continue
        header = read_header(head, whole=len(head) < HEADER_BYTES)
        if header.dicom and header.problem:
            logger.warning("%s: %s; not used as study %s's header (modality, split)", uri, header.problem, study_id)
            continue
        if header.patient_id or header.modality:
            patient_key = header.patient_id or study_id  # goes no further than the split below
            modality = modality or header.modality
            break
    scans.sort(key=lambda scan: scan.name)
    return StudyRow(
        study_id=study_id,
        report=report or "",
        modality=modality.upper() if modality and modality.upper() in MODALITIES else "MR",
        scans=scans,
        split=patient_split(patient_key, salt, val_fraction),
        labels=checked_labels(meta.get("labels") or {}, join(study_dir, "labels.json")),
    ), guessed
