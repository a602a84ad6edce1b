"""A deterministic synthetic corpus of head CT and brain MRI studies, written as real DICOM and NIfTI files.

``write_corpus(write, studies, seed, size)`` calls ``write(relative_path, data)`` once per file; the
same arguments always give byte-identical files (numpy generators keyed on the seed, UIDs hashed from
it, fixed dates, no clock). Layout, relative to the corpus root::

    <study_id>/<scan_name>/0001.dcm ...            a DICOM series, one file per slice
    <study_id>/<scan_name>/0001.dcm                or one enhanced multi-frame DICOM object
    <study_id>/<scan_name>/<scan_name>.nii.gz      or one NIfTI scan
    <study_id>/report.txt                          the report
    <study_id>/labels.json                         {"study_id", "patient_id", "modality", "labels", "lesions"}
    <study_id>/masks/<scan_name>_<lesion>.nii.gz   each present lesion's binary mask (uint8) in each scan
    labels.jsonl                                   one row per study: study_id, patient_id, modality, labels
    vocabulary.json                                label -> {"positive": [...], "negative": [...]} phrases
    corpus.json                                    seed, size and the counts of ``CorpusSummary``

Studies: patients ``SYNTH-P0000``... have 1-3 studies each (later studies keep each finding of the
previous one with probability ``FOLLOW_UP_KEEPS``, so patient-level splits matter). A study is head CT
or brain MRI with 1-8 scans (P(n) ~ 1/n): axial, coronal or sagittal, varied grids and spacing
(``SIZES``), about a quarter NIfTI, the rest DICOM (some RLE Lossless, some stored top-down): most as one
enhanced multi-frame object (per-frame positions, as current scanners write), the rest one file per slice.
CT decodes to HU through RescaleSlope/Intercept; MR (T1, T2, FLAIR contrasts) is in arbitrary units.

Sizes. ``small`` and ``medium`` (``SIZES``) are toy grids for tests and the demo. ``real`` writes studies at the
size archives hold them (``REAL_SIZES``): a CT study is one thin-slice axial series of 300-600 slices at 512x512
int16, an MR study 4-10 series of 176-256 slices at 256-512 pixels; all DICOM, one file per slice (as PACS
exports are), in a mix of transfer syntaxes (``REAL_SYNTAX_SHARES``: uncompressed, RLE Lossless, JPEG 2000
Lossless, JPEG-LS Lossless), with fine structure a downsampling to the model grid has to average rather than
sample: vessels 0.7-2 mm across and calcifications of 1.5-5 mm (``FINE_STRUCTURE``), the same in every scan of
a patient. ``transfer_syntax`` writes every DICOM series in one syntax (``TRANSFER_SYNTAXES``); ``slices`` sets
every scan's slice count (the same anatomy, sampled more or less finely: a reduced real-size corpus for
tests); ``modality`` makes every study CT or MR. A lossless syntax stores the same pixels as the uncompressed
series of the same arguments.

Anatomy (millimetres, DICOM patient LPS axes): a head-like ellipsoid of scalp fat (-90 to -60 HU), skull
(850-1000 HU), grey-matter rim and white matter (26-40 HU), CSF ventricles (0-6 HU), air (-1000 HU) and
Gaussian noise. Each label is present per study with probability ``PREVALENCE``, independently, as one
ellipsoid blob well inside the brain, clear of the ventricles and of the other lesions, at the same
anatomical place in every scan of the study (every scan covers the whole brain). Every lesion has its own
level in every contrast, apart from the normal tissues and from the other lesions (a simplification:
any one scan tells the three apart):

- hemorrhage: CT 70-90 HU; MR the brightest lesion on T1 and dark on T2 and FLAIR (between the skull
  and white matter), as an early subacute hematoma is;
- infarct: CT 11-15 HU (between CSF and white matter); MR dark on T1 (between CSF and grey matter) and
  the brightest lesion on T2 and FLAIR, as an acute infarct is;
- mass: CT 52-62 HU, MR moderately bright in every contrast; it shifts the ventricles 5-9 mm to the
  other side and compresses the ventricle on its own side (midline shift).

Radii (``RADIUS_MM``) are 20-26 mm for a hemorrhage, 28-33 mm for an infarct and 24-29 mm for a mass
(smaller where a brain is crowded): at most 2% of a scan's voxels (checked). Lesions are placed per
patient; field of view, tissue levels, calibration offset and MR gain vary by study and scan far more
than a lesion moves a scan's mean, and MR scalp fat outshines every lesion (so 99.5th-percentile
scaling does not depend on them): mean intensity does not give the labels away.

Voxel order. A DICOM series decodes to ``[D, H, W]`` = (slice, row, column) with D along increasing
position on the slice normal (row cosines x column cosines): sort by position, not by file name or
InstanceNumber. A NIfTI scan's array is ``(i, j, k)`` = (column, row, slice). A lesion mask has its
scan's voxel grid in that scan's decoded order: ``[D, H, W]`` for a DICOM series (its NIfTI affine maps
``(d, h, w)`` to RAS+ mm), the scan's own ``(i, j, k)`` and affine for a NIfTI scan. A lesion's
``center_voxel`` and ``radius_voxels`` (semi-axes) index the mask array.
"""

from __future__ import annotations

import datetime
import gzip
import json
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

LABELS = ("hemorrhage", "infarct", "mass")
PREVALENCE = 0.4
FOLLOW_UP_KEEPS = 0.7
MAX_LESION_FRACTION = 0.02
NIFTI_FRACTION, RLE_FRACTION, TOP_DOWN_FRACTION, MULTIFRAME_FRACTION = 0.25, 0.2, 0.3, 0.75
# size -> (slices per scan, in-plane pixels per side), inclusive ranges
SIZES = {"small": ((16, 40), (48, 96)), "medium": ((32, 80), (96, 192))}
# size "real", by modality: (series per study, slices per series, in-plane pixels per side), inclusive ranges
REAL_SIZES = {"CT": ((1, 1), (300, 600), (512, 512)), "MR": ((4, 10), (176, 256), (256, 512))}
MR_MATRICES = (256, 320, 384, 448, 512)   # real-size MR columns (acquisition matrices scanners use)
SIZE_NAMES = (*SIZES, "real")
# transfer syntax name -> UID, all lossless; pydicom encodes RLE itself, JPEG 2000 through pylibjpeg-openjpeg,
# JPEG-LS through pyjpegls (and decodes them through those or pylibjpeg-libjpeg)
TRANSFER_SYNTAXES = {"explicit": ExplicitVRLittleEndian, "rle": RLELossless, "jpeg2000": JPEG2000Lossless,
                     "jpegls": JPEGLSLossless}
REAL_SYNTAX_SHARES = {"explicit": 0.4, "rle": 0.2, "jpeg2000": 0.2, "jpegls": 0.2}   # size "real"'s series
# size "real"'s fine structure per patient: count, radius (mm), and for vessels their length (mm)
FINE_STRUCTURE = {"vessels": (24, (0.35, 1.0), (30.0, 80.0)), "calcifications": (16, (0.75, 2.5), None)}

VOCABULARY = {
    "hemorrhage": {
        "positive": ["acute intraparenchymal hemorrhage", "an acute parenchymal bleed", "an intraparenchymal hematoma"],
        "negative": ["no evidence of intracranial hemorrhage", "no acute bleed", "no hemorrhage is seen"],
    },
    "infarct": {
        "positive": ["an acute ischemic infarct", "an acute ischemic stroke", "a territorial infarct"],
        "negative": ["no acute infarct", "no evidence of ischemic stroke", "no territorial infarction"],
    },
    "mass": {
        "positive": [
            "a space-occupying mass with midline shift",
            "an intracranial mass causing midline shift",
            "a mass lesion with mass effect",
        ],
        "negative": ["no mass effect or midline shift", "no intracranial mass", "no space-occupying lesion"],
    },
}

# Tissue intensities. CT in HU (study-level ranges); MR relative to white matter on T1 (times a scan gain).
CT_RANGES = {
    "scalp": (-90, -60), "skull": (850, 1000), "wm": (26, 31), "gm_over_wm": (6, 9), "csf": (0, 6),
    "hemorrhage": (70, 90), "infarct": (11, 15), "mass": (52, 62),
}
MR_TABLE = {  # scalp fat is the brightest tissue in every contrast, so percentile scaling ignores the lesions
    "t1": {"scalp": 2.2, "skull": 0.1, "gm": 0.75, "wm": 1.0, "csf": 0.2, "hemorrhage": 1.7, "infarct": 0.5,
           "mass": 1.3},
    "t2": {"scalp": 2.2, "skull": 0.1, "gm": 0.95, "wm": 0.75, "csf": 1.8, "hemorrhage": 0.35, "infarct": 1.45,
           "mass": 1.2},
    "flair": {"scalp": 2.1, "skull": 0.1, "gm": 1.0, "wm": 0.8, "csf": 0.15, "hemorrhage": 0.4, "infarct": 1.5,
              "mass": 1.22},
}
# Size "real"'s fine structure (``FINE_STRUCTURE``): CT in HU (contrast-filled arteries, calcium), MR relative to
# white matter on T1 as ``MR_TABLE`` (bright arteries on T1, flow voids on T2 and FLAIR, calcium dark in all).
FINE_LEVELS = {"ct": {"vessel": (180, 260), "calcification": (400, 900)},
               "t1": {"vessel": 1.8, "calcification": 0.15}, "t2": {"vessel": 0.1, "calcification": 0.15},
               "flair": {"vessel": 0.1, "calcification": 0.15}}
MR_SEQUENCE = {  # TR, TE, TI (ms), scanning sequence
    "t1": (500.0, 10.0, None, "SE"), "t2": (4000.0, 100.0, None, "SE"), "flair": (9000.0, 120.0, 2500.0, "IR")
}
# orientation -> LPS unit vectors (row direction r, column direction c); slice normal n = r x c
ORIENTATIONS = {"ax": ((1, 0, 0), (0, 1, 0)), "cor": ((1, 0, 0), (0, 0, -1)), "sag": ((0, 1, 0), (0, 0, -1))}
RADIUS_MM = {"hemorrhage": (20, 26), "infarct": (28, 33), "mass": (24, 29)}
LESION_MARGIN_MM = 6.0   # a lesion keeps this far from the brain surface and the ventricles
UID_ROOT = "hlip-ray-synth"


@dataclass
class CorpusSummary:
    """What ``write_corpus`` wrote; ``files`` and ``bytes`` count everything but corpus.json itself."""

    studies: int
    patients: int
    scans: int
    dicom_series: int
    nifti_scans: int
    rle_series: int
    multiframe_series: int = 0
    files: int = 0
    bytes: int = 0
    prevalence: dict[str, float] = field(default_factory=dict)
    syntaxes: dict[str, int] = field(default_factory=dict)   # DICOM series per transfer syntax (``TRANSFER_SYNTAXES``)


def folder_writer(root: str | Path) -> Callable[[str, bytes], None]:
    """A ``write`` for ``write_corpus`` that stores files under the local folder ``root``."""
    root = Path(root)

    def write(relative_path: str, data: bytes) -> None:
        path = root / relative_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return write


def write_corpus(
    write: Callable[[str, bytes], None], studies: int, seed: int, size: str = "small", canary: str | None = None,
    *, transfer_syntax: str | None = None, slices: int | None = None, modality: str | None = None,
) -> CorpusSummary:
    """Write ``studies`` synthetic studies (module docstring: layout, content and sizes) through ``write``.

    ``canary``, when given, becomes the first study's PatientName and a sentence of its report (for
    tests that patient names and report text never leak); no other file changes. ``transfer_syntax``
    (a ``TRANSFER_SYNTAXES`` name): every DICOM series in it, rather than the size's mix. ``slices``: every
    scan's slice count, rather than the size's range. ``modality`` ("CT" or "MR"): every study's.
    """
    if size not in SIZE_NAMES:
        raise ValueError(f"size must be one of {list(SIZE_NAMES)}, not {size!r}")
    if transfer_syntax is not None and transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"transfer_syntax must be one of {list(TRANSFER_SYNTAXES)}, not {transfer_syntax!r}")
    if modality not in (None, "CT", "MR"):
        raise ValueError(f"modality must be 'CT' or 'MR', not {modality!r}")
    if slices is not None and slices < 2:
        raise ValueError(f"slices must be at least 2, not {slices}")
    options = {"transfer_syntax": transfer_syntax, "slices": slices, "modality": modality}
    written = {"files": 0, "bytes": 0}

    def put(path: str, data: bytes) -> None:
        write(path, data)
        written["files"] += 1
        written["bytes"] += len(data)

    rows, scans, patients, previous = [], [], {}, {}   # previous: each patient's last labels
    for index, (number, visit) in enumerate(_patient_visits(studies, seed)):
        patient = patients[number] = patients.get(number) or _draw_patient(seed, number, fine=size == "real")
        study = _draw_study(seed, index, patient, visit, previous.get(number), size, None if index else canary,
                            **options)
        previous[number] = study.present
        rows.append(_write_study(put, study))
        scans += study.scans

    for name, data in [
        ("labels.jsonl", "".join(json.dumps(row) + "\n" for row in rows)),
        ("vocabulary.json", json.dumps(VOCABULARY, indent=2)),
    ]:
        put(name, data.encode())
    dicom = [scan for scan in scans if scan.format == "dicom"]
    summary = CorpusSummary(
        studies=studies, patients=len(patients), scans=len(scans), dicom_series=len(dicom),
        nifti_scans=len(scans) - len(dicom), rle_series=sum(scan.syntax == "rle" for scan in dicom),
        multiframe_series=sum(scan.multiframe for scan in dicom), **written,
        prevalence={label: round(sum(row["labels"][label] for row in rows) / max(studies, 1), 4) for label in LABELS},
        syntaxes={name: sum(scan.syntax == name for scan in dicom) for name in TRANSFER_SYNTAXES},
    )
    chosen = {key: value for key, value in options.items() if value is not None}
    write("corpus.json", json.dumps({"seed": seed, "size": size, **chosen, **asdict(summary)}, indent=2).encode())
    return summary


# ---------------------------------------------------------------- drawing patients, studies and scans


@dataclass
class Blob:
    """An axis-aligned ellipsoid in head coordinates (mm, LPS, origin at the head centre)."""

    center: np.ndarray  # (3,)
    semi: np.ndarray    # (3,) semi-axes along x, y, z
    label: str = ""


@dataclass
class Tube:
    """A vessel: a chain of balls of one radius along a smooth curve (head coordinates, mm)."""

    points: np.ndarray  # (n, 3), each within half a radius of the next
    radius: float


@dataclass
class Patient:
    id: str
    brain: np.ndarray         # (3,) brain semi-axes, mm
    skull: float              # skull and scalp thickness, mm
    scalp: float
    ventricles: list[Blob]    # lateral and third ventricles
    shifted: list[Blob]       # the same, pushed away from the mass (when the mass is present)
    lesions: dict[str, Blob]  # where each label's lesion sits in every study that has it
    shift_mm: float
    first_visit: datetime.date
    vessels: list[Tube] = field(default_factory=list)          # fine structure (size "real" only)
    calcifications: list[Blob] = field(default_factory=list)


@dataclass
class Scan:
    name: str
    format: str               # "dicom" or "nifti"
    orientation: str          # "ax", "cor", "sag"
    contrast: str             # "ct", "t1", "t2", "flair"
    shape: tuple[int, int, int]   # [D, H, W]
    steps: np.ndarray         # (3, 3): LPS mm per voxel step along d, h, w (rows)
    origin: np.ndarray        # (3,) LPS mm of voxel (0, 0, 0), the first slice's ImagePositionPatient
    tissue: dict[str, float]  # intensity of each tissue and lesion label
    noise: float
    bias: np.ndarray          # (3,) MR relative gain change per mm (zeros for CT)
    storage: tuple[int, float] = (0, 0.0)   # DICOM PixelRepresentation and RescaleIntercept (CT)
    syntax: str = "explicit"  # a TRANSFER_SYNTAXES name (DICOM)
    top_down: bool = False
    multiframe: bool = False  # one enhanced multi-frame object rather than one file per slice
    fine: dict[str, float] = field(default_factory=dict)   # size "real": vessel and calcification intensities

    def affine(self) -> np.ndarray:
        """4x4: voxel ``(d, h, w, 1)`` -> RAS+ mm."""
        affine = np.eye(4)
        affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ self.steps.T
        affine[:3, 3] = self.origin * [-1.0, -1.0, 1.0]
        return affine


@dataclass
class Study:
    id: str
    seed: int
    index: int
    patient: Patient
    patient_name: str
    date: str
    modality: str
    present: dict[str, int]
    lesions: list[Blob]
    ventricles: list[Blob]
    head_center: np.ndarray
    scans: list[Scan]
    report: str


def _patient_visits(studies: int, seed: int) -> list[tuple[int, int]]:
    """(patient index, visit index) of each study: patients have 1-3 consecutive studies."""
    rng = np.random.default_rng([seed, 0])
    visits, patient = [], 0
    while len(visits) < studies:
        visits += [(patient, visit) for visit in range(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))]
        patient += 1
    return visits[:studies]


def _draw_patient(seed: int, index: int, fine: bool = False) -> Patient:
    """Head size, ventricles (normal and shifted) and where each label's lesion sits for patient ``index``;
    with ``fine``, also vessels and calcifications (``FINE_STRUCTURE``)."""
    rng = np.random.default_rng([seed, 1, index])
    brain = rng.uniform([62, 78, 58], [70, 88, 66])
    scale = brain / [66, 83, 62]
    ventricles = [Blob(np.array(c) * scale, np.array(s) * scale) for c, s in [
        ((-9, -4, 14), (6, 26, 9)), ((9, -4, 14), (6, 26, 9)), ((0, 4, 0), (2.5, 10, 7))]]
    mass_side, shift = rng.choice([-1.0, 1.0]), rng.uniform(5, 9)
    shifted = [Blob(v.center - [mass_side * shift, 0, 0], v.semi * ([0.5, 1, 1] if v.center[0] * mass_side > 0 else 1))
               for v in ventricles]
    lesions: dict[str, Blob] = {}
    for label in ("mass", "infarct", "hemorrhage"):  # largest first; the mass on ``mass_side``, clear of the
        avoid = shifted if label == "mass" else ventricles + shifted   # ventricles it shifts, the others of both
        lesions[label] = _place(rng, label, brain, avoid, list(lesions.values()), mass_side if label == "mass" else 0)
    first_visit = datetime.date(2023, 1, 1) + datetime.timedelta(days=int(rng.integers(365)))
    patient = Patient(f"SYNTH-P{index:04d}", brain, rng.uniform(6, 8), rng.uniform(3, 5), ventricles, shifted,
                      lesions, shift, first_visit)
    if fine:
        patient.vessels, patient.calcifications = _draw_fine_structure(np.random.default_rng([seed, 7, index]), brain)
    return patient


def _draw_fine_structure(rng, brain: np.ndarray) -> tuple[list[Tube], list[Blob]]:
    """Vessels (smooth random curves: a line plus three sinusoids, kept inside the brain) and calcifications
    (small balls) for ``FINE_STRUCTURE``; the lesions, drawn later, paint over any that cross them."""

    def inside_point(reach: float) -> np.ndarray:
        while True:
            point = rng.uniform(-reach, reach, 3) * brain
            if ((point / brain) ** 2).sum() < reach ** 2:
                return point

    count, radii, lengths = FINE_STRUCTURE["vessels"]
    vessels = []
    for _ in range(count):
        radius, length = rng.uniform(*radii), rng.uniform(*lengths)
        along = np.arange(0.0, length, radius / 2)[:, None]
        direction = rng.normal(size=3)
        curve = inside_point(0.7) + (along - length / 2) * direction / np.linalg.norm(direction)
        for k in (1, 2, 3):
            curve += np.sin(2 * np.pi * k * along / length + rng.uniform(0, 2 * np.pi)) * rng.normal(size=3) * (
                length / (10 * k))
        vessels.append(Tube(curve[((curve / brain) ** 2).sum(1) < 0.9 ** 2], float(radius)))
    count, radii, _ = FINE_STRUCTURE["calcifications"]
    calcifications = [Blob(inside_point(0.8), np.full(3, rng.uniform(*radii)), "calcification") for _ in range(count)]
    return vessels, calcifications


# test points of the unit ball: a lattice inside it and the lattice's directions on its surface
_CUBE = np.stack(np.meshgrid(*[np.linspace(-1, 1, 7)] * 3, indexing="ij"), -1).reshape(-1, 3)
_BALL = np.concatenate([_CUBE[(_CUBE ** 2).sum(1) <= 1], _CUBE / np.linalg.norm(_CUBE, axis=1).clip(1e-9)[:, None]])


def _place(rng, label: str, brain, avoid: list[Blob], placed: list[Blob], side: float) -> Blob:
    """A random ellipsoid for ``label`` inside the brain, clear of ``avoid`` and ``placed`` (rejection sampling)."""
    radius = rng.uniform(*RADIUS_MM[label])
    while True:
        for _ in range(400):
            factors = np.exp(rng.uniform(-0.1, 0.1, 3))
            semi = radius * factors / np.cbrt(factors.prod())   # the volume of a sphere of ``radius``
            center = rng.uniform(-1, 1, 3) * brain
            if side:
                center[0] = side * abs(center[0])
            points = center + (semi + LESION_MARGIN_MM) * _BALL
            if (abs(center[0]) > 12 and (((points / brain) ** 2).sum(1) < 1).all()
                    and all(((((points - blob.center) / blob.semi) ** 2).sum(1) > 1).all() for blob in avoid)
                    and all(np.linalg.norm(center - o.center) > semi.max() + o.semi.max() + 4 for o in placed)):
                return Blob(center.round(2), semi.round(2), label)
        radius *= 0.95  # rarely needed: a crowded brain


def _draw_study(
    seed: int, index: int, patient: Patient, visit: int, previous: dict | None, size: str, canary: str | None,
    transfer_syntax: str | None = None, slices: int | None = None, modality: str | None = None,
) -> Study:
    """Labels, intensities and scans of study ``index``; a follow-up keeps each finding of the previous study
    with probability FOLLOW_UP_KEEPS. Scans come from their own generator: small and medium of a seed share the
    rest. Size "real"'s own draws (series count, transfer syntaxes, fine-structure levels) come from another."""
    rng = np.random.default_rng([seed, 2, index])
    real = size == "real"
    real_rng = np.random.default_rng([seed, 8, index])
    fresh = rng.random(len(LABELS)) < PREVALENCE
    keep = rng.random(len(LABELS)) < FOLLOW_UP_KEEPS
    present = {label: int(previous[label] if previous and keep[i] else fresh[i]) for i, label in enumerate(LABELS)}
    drawn = "CT" if rng.random() < 0.5 else "MR"
    modality = modality or drawn
    count = int(rng.choice(np.arange(1, 9), p=(weights := 1 / np.arange(1, 9)) / weights.sum()))
    if real:
        fewest, most = REAL_SIZES[modality][0]
        count = int(real_rng.integers(fewest, most + 1))
    contrasts = ["ct"] * count if modality == "CT" else [str(c) for c in rng.choice(["t1", "t2", "flair"], count)]
    orientations = [str(o) for o in rng.choice(list(ORIENTATIONS), count, p=[0.6, 0.2, 0.2])]
    formats = ["nifti" if nifti else "dicom" for nifti in rng.random(count) < NIFTI_FRACTION]
    if real:   # as archives hold them: DICOM; a thin-slice CT series is acquired axially
        formats = ["dicom"] * count
        orientations = ["ax"] * count if modality == "CT" else orientations
    levels = {key: rng.uniform(*span) for key, span in CT_RANGES.items()}
    levels["gm"] = levels["wm"] + levels.pop("gm_over_wm")
    head_center = rng.uniform(-5, 5, 3).round(2)
    date = patient.first_visit + datetime.timedelta(days=120 * visit)

    geometry = np.random.default_rng([seed, 3, index])
    head = patient.brain + patient.skull + patient.scalp
    scans = [
        _draw_scan(geometry, f"{k + 1:02d}_{contrasts[k]}_{orientations[k]}", formats[k], orientations[k],
                   contrasts[k], head, patient.brain, head_center, levels, size, slices)
        for k in range(count)
    ]
    multiframe = np.random.default_rng([seed, 6, index]).random(count) < MULTIFRAME_FRACTION
    for scan, one_object in zip(scans, multiframe):
        scan.multiframe = bool(one_object) and scan.format == "dicom" and not real
    if real:
        names, shares = list(REAL_SYNTAX_SHARES), list(REAL_SYNTAX_SHARES.values())
        ct_fine = {key: float(real_rng.uniform(*span)) for key, span in FINE_LEVELS["ct"].items()}
        for scan in scans:
            scan.syntax = str(real_rng.choice(names, p=shares))
            scan.fine = ct_fine if scan.contrast == "ct" else {   # MR: relative to the scan's white matter
                key: level * scan.tissue["wm"] / MR_TABLE[scan.contrast]["wm"]
                for key, level in FINE_LEVELS[scan.contrast].items()}
    for scan in scans:
        if transfer_syntax and scan.format == "dicom":
            scan.syntax = transfer_syntax
    report = _report(np.random.default_rng([seed, 4, index]), modality, contrasts, patient, present)
    if canary is not None:
        report += f" The findings were discussed with {canary}."
    return Study(
        f"study-{index:04d}", seed, index, patient, canary or patient.id.replace("-", "^"), date.strftime("%Y%m%d"),
        modality, present, [patient.lesions[label] for label in LABELS if present[label]],
        patient.shifted if present["mass"] else patient.ventricles, head_center, scans, report,
    )


def _draw_scan(rng, name, format, orientation, contrast, head, brain, head_center, levels, size,
               slices: int | None = None) -> Scan:
    """A field of view that covers the whole brain: [D, H, W] grid, spacing, position, intensities, noise.
    ``slices``: the slice count D, rather than one drawn from the size's range."""
    if size == "real":
        _, depths, pixels = REAL_SIZES["CT" if contrast == "ct" else "MR"]
    else:
        depths, pixels = SIZES[size]
    r, c = (np.array(v, dtype=float) for v in ORIENTATIONS[orientation])
    n = np.cross(r, c)
    depth, cols = rng.integers(depths[0], depths[1] + 1), rng.integers(pixels[0], pixels[1] + 1)
    rows = cols if rng.random() < 0.7 else max(pixels[0], int(cols * rng.uniform(0.75, 0.9)))
    if size == "real":   # square, at a matrix scanners use
        rows = cols = 512 if contrast == "ct" else MR_MATRICES[int(np.abs(np.subtract(MR_MATRICES, cols)).argmin())]
    depth = slices or depth
    margin = rng.uniform(16, 80)
    pixel = round(max((2 * abs(c) @ head + margin) / rows, (2 * abs(r) @ head + margin) / cols), 3)
    coverage = max(2 * abs(n) @ head + rng.uniform(-8, 16), 2 * abs(n) @ brain + 12)
    thickness = round(coverage / depth, 3)
    steps = np.stack([n * thickness, c * pixel, r * pixel])
    center = head_center + rng.uniform(-6, 6) * c + rng.uniform(-6, 6) * r + rng.uniform(-2, 2) * n
    origin = (center - np.array([depth - 1, rows - 1, cols - 1]) / 2 @ steps).round(3)
    storage = (0, 0.0)
    if contrast == "ct":
        offset = rng.uniform(-2, 2)   # scanner calibration
        tissue = {key: value + offset for key, value in levels.items()} | {"air": -1000.0}
        noise, bias = rng.uniform(2.5, 5), np.zeros(3)
        storage = [(0, -1024.0), (1, -1024.0), (1, 0.0)][rng.integers(3)]
    else:
        gain = rng.uniform(250, 900)
        tissue = {key: value * gain * rng.uniform(0.93, 1.07) for key, value in MR_TABLE[contrast].items()}
        tissue["air"] = 0.0
        noise, bias = gain * rng.uniform(0.015, 0.03), rng.normal(size=3) * rng.uniform(0, 0.0008)
    rle, top_down = (rng.random(2) < [RLE_FRACTION, TOP_DOWN_FRACTION]) & (format == "dicom")
    return Scan(name, format, orientation, contrast, (int(depth), int(rows), int(cols)), steps, origin, tissue,
                noise, bias, storage, "rle" if rle else "explicit", bool(top_down))


# ---------------------------------------------------------------- rendering and encoding


def _render(study: Study, scan: Scan, rng) -> tuple[np.ndarray, list[np.ndarray]]:
    """Float32 ``[D, H, W]`` intensities (HU for CT) and one bool ``[D, H, W]`` mask per present lesion."""
    grids = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in scan.shape), indexing="ij", sparse=True)
    offset = (scan.origin - study.head_center).astype(np.float32)
    p = [offset[a] + sum(g * np.float32(step) for g, step in zip(grids, scan.steps[:, a]) if step)
         for a in range(3)]   # head coordinates x, y, z: each varies along one voxel axis, broadcastable to [D, H, W]

    def inside(blob_center, semi) -> np.ndarray:
        return sum(((p[a] - blob_center[a]) / semi[a]) ** 2 for a in range(3)) <= 1

    t, patient, zero = scan.tissue, study.patient, np.zeros(3)
    volume = np.full(scan.shape, t["air"], dtype=np.float32)
    volume[inside(zero, patient.brain + patient.skull + patient.scalp)] = t["scalp"]
    volume[inside(zero, patient.brain + patient.skull)] = t["skull"]
    volume[inside(zero, patient.brain)] = t["gm"]
    volume[inside(zero, patient.brain * 0.88)] = t["wm"]
    for ventricle in study.ventricles:
        volume[inside(ventricle.center, ventricle.semi)] = t["csf"]
    if scan.fine:
        _paint_fine_structure(volume, scan, offset, study.patient)
    masks = []
    for lesion in study.lesions:
        mask = inside(lesion.center, lesion.semi)
        assert 0 < mask.sum() <= MAX_LESION_FRACTION * mask.size, (study.id, scan.name, lesion.label)
        volume[mask] = t[lesion.label]
        masks.append(mask)
    if scan.bias.any():
        volume *= 1 + sum(p[a] * np.float32(scan.bias[a]) for a in range(3))
    noise = rng.standard_normal(scan.shape, dtype=np.float32)
    noise *= np.float32(scan.noise)   # in place: a real-size volume is 0.3-0.6 GB in float32
    volume += noise
    return volume, masks


def _paint_fine_structure(volume: np.ndarray, scan: Scan, offset: np.ndarray, patient: Patient) -> None:
    """Paint the patient's vessels and calcifications into ``volume`` ``[D, H, W]`` (at ``scan.fine``'s levels),
    ball by ball, each within its own bounding box of voxels. ``offset``: head coordinates of voxel (0, 0, 0)."""
    to_voxels = np.linalg.inv(scan.steps.T)   # head offset (mm) -> (d, h, w)
    voxel_mm = np.linalg.norm(scan.steps, axis=1)
    shape = np.array(scan.shape)
    balls = [(tube.points, tube.radius, scan.fine["vessel"]) for tube in patient.vessels]
    balls += [(blob.center[None], float(blob.semi[0]), scan.fine["calcification"]) for blob in patient.calcifications]
    for centers, radius, level in balls:
        reach = radius / voxel_mm
        for center, voxel in zip(centers, (centers - offset) @ to_voxels.T):
            low = np.maximum(np.ceil(voxel - reach), 0).astype(int)
            high = np.minimum(np.floor(voxel + reach).astype(int) + 1, shape)
            if (high <= low).any():
                continue
            axes = np.meshgrid(*(np.arange(a, b) for a, b in zip(low, high)), indexing="ij", sparse=True)
            squared = sum((offset[a] - center[a] + sum(axis * scan.steps[g, a] for g, axis in enumerate(axes))) ** 2
                          for a in range(3))
            volume[low[0]:high[0], low[1]:high[1], low[2]:high[2]][squared <= radius ** 2] = level


def _write_study(put: Callable[[str, bytes], None], study: Study) -> dict:
    """Render and write one study's scans, masks, report and labels.json; return its labels.jsonl row."""
    lesions = []
    for number, scan in enumerate(study.scans):
        volume, masks = _render(study, scan, np.random.default_rng([study.seed, 5, study.index, number]))
        if scan.format == "dicom":
            for k, data in enumerate(_dicom_series(study, scan, number, volume)):
                put(f"{study.id}/{scan.name}/{k + 1:04d}.dcm", data)
        else:
            put(f"{study.id}/{scan.name}/{scan.name}.nii.gz", _nifti(scan, _quantize(scan, volume)))
        for lesion, mask in zip(study.lesions, masks):
            index = LABELS.index(lesion.label)
            path = f"masks/{scan.name}_{index}.nii.gz"
            put(f"{study.id}/{path}", _nifti(scan, mask.astype(np.uint8)))
            to_voxels = np.linalg.inv(scan.steps.T)   # LPS offset -> (d, h, w)
            center = to_voxels @ (lesion.center + study.head_center - scan.origin)
            radius = np.abs(to_voxels) @ lesion.semi
            order = slice(None, None, -1) if scan.format == "nifti" else slice(None)   # (i, j, k) = (w, h, d)
            lesions.append({
                "label": lesion.label, "scan": scan.name, "location": _location(lesion, study.patient)[0],
                "appearance": "hyper" if scan.tissue[lesion.label] > scan.tissue["wm"] else "hypo",
                "center_voxel": [round(float(v), 2) for v in center[order]],
                "radius_voxels": [round(float(v), 2) for v in radius[order]], "mask": path,
            })
    put(f"{study.id}/report.txt", (study.report + "\n").encode())
    row = {"study_id": study.id, "patient_id": study.patient.id, "modality": study.modality, "labels": study.present}
    put(f"{study.id}/labels.json", json.dumps({**row, "lesions": lesions}, indent=2).encode())
    return row


def _quantize(scan: Scan, volume: np.ndarray) -> np.ndarray:
    """Stored NIfTI values: int16 HU for CT, int16 arbitrary units for MR."""
    low, high = (-1024, 3071) if scan.contrast == "ct" else (0, 32767)
    return np.clip(np.rint(volume), low, high).astype(np.int16)


def _nifti(scan: Scan, array: np.ndarray) -> bytes:
    """A .nii.gz of ``array`` ([D, H, W], written in the scan's own order) on the scan's grid."""
    affine = scan.affine()
    if scan.format == "nifti":
        array, affine = array.transpose(2, 1, 0), affine[:, [2, 1, 0, 3]]
    image = nib.Nifti1Image(np.ascontiguousarray(array), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)


def _uid(*parts) -> str:
    return generate_uid(entropy_srcs=[UID_ROOT, *map(str, parts)])


SLICE_ELEMENTS = ("SOPInstanceUID", "InstanceNumber", "ImagePositionPatient", "SliceLocation", "PixelData")


def _element_bytes(elements) -> dict[int, bytes]:
    """Explicit VR little endian encoding of each data element, by tag."""
    encoded = {}
    for element in elements:
        file = DicomBytesIO()
        file.is_little_endian, file.is_implicit_VR = True, False
        write_data_element(file, element)
        encoded[element.tag] = file.getvalue()
    return encoded


def _file_meta(meta: FileMetaDataset) -> bytes:
    """Preamble, "DICM" and the file meta group (explicit VR little endian, led by its group length)."""
    body = b"".join(_element_bytes(meta).values())
    return b"\0" * 128 + b"DICM" + struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(body)) + body


def _dicom_series(study: Study, scan: Scan, number: int, volume: np.ndarray) -> list[bytes]:
    """One DICOM file per slice, in file order (top-down series start at the last slice)."""
    ct = scan.contrast == "ct"
    if ct:
        signed, intercept = scan.storage
        stored = np.rint(volume)   # then in place: a real-size volume is 0.3-0.6 GB in float32
        np.clip(stored, -1024, 3071, out=stored)
        stored -= intercept
        stored = stored.astype(np.int16 if signed else np.uint16)
    else:
        stored = np.rint(volume)
        signed, stored = 0, np.clip(stored, 0, 65535, out=stored).astype(np.uint16)
    r, c = scan.steps[2] / np.linalg.norm(scan.steps[2]), scan.steps[1] / np.linalg.norm(scan.steps[1])
    normal = np.cross(r, c)
    series_uid = _uid(study.seed, study.id, scan.name)
    common = {
        "SOPClassUID": CTImageStorage if ct else MRImageStorage,
        "StudyInstanceUID": _uid(study.seed, study.id), "SeriesInstanceUID": series_uid,
        "FrameOfReferenceUID": _uid(study.seed, study.id, "frame"),
        "PatientName": study.patient_name, "PatientID": study.patient.id, "PatientBirthDate": "", "PatientSex": "O",
        "StudyDate": study.date, "StudyTime": "090000", "SeriesDate": study.date, "SeriesTime": f"09{number:02d}00",
        "AccessionNumber": f"SYN{study.index:06d}", "StudyID": str(study.index + 1), "Modality": study.modality,
        "StudyDescription": "CT HEAD WITHOUT CONTRAST" if ct else "MRI BRAIN WITHOUT CONTRAST",
        "SeriesDescription": f"{scan.contrast.upper()} {scan.orientation.upper()}", "SeriesNumber": number + 1,
        "Manufacturer": "hlip-ray synthetic", "BodyPartExamined": "HEAD", "BurnedInAnnotation": "NO",
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL" if scan.orientation == "ax" else "REFORMATTED"],
        "ImageOrientationPatient": [float(v) + 0.0 for v in (*r, *c)],
        "PixelSpacing": [float(abs(scan.steps[1]).sum()), float(abs(scan.steps[2]).sum())],
        "SliceThickness": float(abs(scan.steps[0]).sum()), "SpacingBetweenSlices": float(abs(scan.steps[0]).sum()),
        "SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2", "Rows": scan.shape[1],
        "Columns": scan.shape[2], "BitsAllocated": 16, "BitsStored": 16, "HighBit": 15, "PixelRepresentation": signed,
    }
    if ct:
        common |= {"RescaleIntercept": float(intercept), "RescaleSlope": 1.0, "RescaleType": "HU",
                   "WindowCenter": 40.0, "WindowWidth": 80.0, "KVP": 120.0}
    else:
        tr, te, ti, sequence = MR_SEQUENCE[scan.contrast]
        common |= {"RepetitionTime": tr, "EchoTime": te, "ScanningSequence": sequence, "SequenceVariant": "NONE",
                   "MRAcquisitionType": "2D", "MagneticFieldStrength": 3.0}
        if ti is not None:
            common["InversionTime"] = ti
    ds = Dataset()
    for key, value in common.items():
        setattr(ds, key, value)
    constant = _element_bytes(ds)   # encoded once per series; per slice only SLICE_ELEMENTS are
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\0\1"
    meta.MediaStorageSOPClassUID = common["SOPClassUID"]
    meta.TransferSyntaxUID = TRANSFER_SYNTAXES[scan.syntax]
    meta.ImplementationClassUID = _uid("implementation")
    meta.ImplementationVersionName = "HLIP_RAY_SYNTH"
    order = range(scan.shape[0] - 1, -1, -1) if scan.top_down else range(scan.shape[0])
    if scan.multiframe:
        return [_enhanced_object(study, scan, ds, meta, stored, order)]
    files = []
    for instance, d in enumerate(order, start=1):
        position = scan.origin + d * scan.steps[0]
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID = _uid(study.seed, study.id, scan.name, d)
        ds.InstanceNumber = instance
        ds.ImagePositionPatient = [round(float(v), 3) + 0.0 for v in position]
        ds.SliceLocation = round(float(position @ normal), 3) + 0.0
        if scan.syntax != "explicit":   # RLE: pydicom's and pylibjpeg's encoders give the same bytes
            ds.compress(TRANSFER_SYNTAXES[scan.syntax], stored[d], generate_instance_uid=False)
        else:
            ds.add_new("PixelData", "OW", stored[d].astype(stored.dtype.newbyteorder("<")).tobytes())
        elements = constant | _element_bytes(ds[keyword] for keyword in SLICE_ELEMENTS)
        files.append(_file_meta(meta) + b"".join(elements[tag] for tag in sorted(elements)))
    return files


def _item(**attributes) -> Dataset:
    item = Dataset()
    for key, value in attributes.items():
        setattr(item, key, value)
    return item


def _enhanced_object(study: Study, scan: Scan, ds: Dataset, meta: FileMetaDataset, stored: np.ndarray,
                     order: range) -> bytes:
    """The series as one enhanced CT/MR object: geometry and rescale in the shared functional groups,
    each frame's ImagePositionPatient in its own, frames in ``order``."""
    geometry = {key: ds.data_element(key).value for key in
                ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices", "ImageOrientationPatient")}
    rescale = {key: ds.data_element(key).value for key in ("RescaleIntercept", "RescaleSlope", "RescaleType")
               if key in ds}
    for key in (*geometry, *rescale):
        delattr(ds, key)
    shared = _item(
        PixelMeasuresSequence=Sequence([_item(**{key: geometry[key] for key in
                                                ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices")})]),
        PlaneOrientationSequence=Sequence([_item(ImageOrientationPatient=geometry["ImageOrientationPatient"])]),
    )
    if rescale:
        shared.PixelValueTransformationSequence = Sequence([_item(**rescale)])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence([
        _item(PlanePositionSequence=Sequence([_item(
            ImagePositionPatient=[round(float(v), 3) + 0.0 for v in scan.origin + d * scan.steps[0]])]))
        for d in order
    ])
    ct = scan.contrast == "ct"
    ds.SOPClassUID = meta.MediaStorageSOPClassUID = EnhancedCTImageStorage if ct else EnhancedMRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID = _uid(study.seed, study.id, scan.name, "enhanced")
    ds.ImageType = [*ds.ImageType, "NONE"]
    ds.InstanceNumber, ds.NumberOfFrames = 1, len(order)
    frames = np.ascontiguousarray(stored[list(order)])
    if scan.syntax != "explicit":
        ds.compress(TRANSFER_SYNTAXES[scan.syntax], frames, generate_instance_uid=False)
    else:
        ds.add_new("PixelData", "OW", frames.astype(frames.dtype.newbyteorder("<")).tobytes())
    elements = _element_bytes(ds)
    return _file_meta(meta) + b"".join(elements[tag] for tag in sorted(elements))


# ---------------------------------------------------------------- reports

CT_LOOKS = {  # how each lesion looks, for "<look> in the <where>, consistent with <phrase>."
    "hemorrhage": "Hyperdense focus", "infarct": "Hypodense region", "mass": "Large mildly hyperdense lesion",
}
MR_LOOKS = {  # the same on MR: (contrasts, look) pairs, the first whose contrasts the study has
    "hemorrhage": [({"t1"}, "T1 hyperintense focus"), ({"t2", "flair"}, "T2/FLAIR hypointense focus")],
    "infarct": [({"t2", "flair"}, "T2/FLAIR hyperintense region"), ({"t1"}, "T1 hypointense region")],
    "mass": [({"t1", "t2", "flair"}, "Large hyperintense lesion")],
}
FILLERS = [
    "The basal cisterns are patent.", "No extra-axial collection.", "The calvarium is intact.",
    "The visualized paranasal sinuses are clear.", "The orbits are unremarkable.",
]


def _location(lesion: Blob, patient: Patient) -> tuple[str, str]:
    """("left frontal lobe", "left") from the lesion centre (LPS: +x is the patient's left, +y posterior)."""
    side = "left" if lesion.center[0] > 0 else "right"
    ap = lesion.center[1] / patient.brain[1]
    lobe = "frontal" if ap < -0.3 else "occipital" if ap > 0.35 else "parietal"
    return f"{side} {lobe} lobe", side


def _look(modality: str, contrasts: list[str], label: str) -> str:
    """How a lesion looks in the study's scans (on MR it depends on the contrast)."""
    if modality == "CT":
        return CT_LOOKS[label]
    return next(look for shown_by, look in MR_LOOKS[label] if shown_by & set(contrasts))


def _report(rng, modality: str, contrasts: list[str], patient: Patient, present: dict[str, int]) -> str:
    """Technique line, then shuffled findings (one positive or negative sentence per label) and fillers."""
    sentences = []
    for label in LABELS:
        phrases = VOCABULARY[label]["positive" if present[label] else "negative"]
        phrase = str(rng.choice(phrases))
        if not present[label]:
            sentences.append(phrase[0].upper() + phrase[1:] + ".")
            continue
        where, side = _location(patient.lesions[label], patient)
        sentences.append(str(rng.choice([
            f"{phrase[0].upper() + phrase[1:]} in the {where}.",
            f"There is {phrase} in the {where}.",
            f"{_look(modality, contrasts, label)} in the {where}, consistent with {phrase}.",
        ])))
        if label == "mass":
            other = "right" if side == "left" else "left"
            sentences.append(f"The ventricles are displaced {patient.shift_mm:.0f} mm to the {other}; "
                             f"the {side} lateral ventricle is effaced.")
    if not present["mass"]:
        sentences.append("The ventricles are normal in size and configuration.")
    if not present["infarct"]:
        sentences.append("Grey-white matter differentiation is preserved.")
    sentences += list(rng.choice(FILLERS, rng.integers(1, 4), replace=False))
    if modality == "CT":
        technique = "Technique: non-contrast CT of the head."
    else:
        sequences = sorted(set(contrasts), key=["t1", "t2", "flair"].index)
        technique = "Technique: MRI of the brain without contrast (" + ", ".join(s.upper() for s in sequences) + ")."
    return " ".join([technique, *(sentences[i] for i in rng.permutation(len(sentences)))])
