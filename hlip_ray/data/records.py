"""Records that pass between the data plane's stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

# Why a scan or study was skipped; the ``reason`` of a Rejection is one of these.
REJECTION_REASONS = (
    "corrupt",                    # unreadable, truncated, or pixel data that does not decode
    "unsupported_transfer_syntax",  # compressed with a codec no installed plugin decodes
    "not_an_image",               # a DICOM object without pixels (RT plan, structured report, ...)
    "secondary_capture",          # a screenshot-like secondary capture, not an acquisition
    "burned_in_annotation",       # BurnedInAnnotation == YES: text may identify the patient
    "inconsistent_slice_shapes",  # slices of one series disagree in rows/columns
    "conflicting_slices",         # one position holds different slices, not evenly (not echoes/time points)
    "localizer",                  # a scout: ImageType LOCALIZER, or slice orientations that disagree
    "too_few_slices",             # fewer slices than data.min_slices (after duplicates were dropped)
    "non_finite_values",          # NaN or Inf voxels
    "empty_axis",                 # an axis of length zero
    "missing_object",             # the file or prefix does not exist
    "unreadable",                 # an I/O error reading it: permission, a link loop, S3 failing after retries
    "unsupported_format",         # neither DICOM nor NIfTI
    "too_large",                  # a DICOM file over decode.MAX_DICOM_FILE_BYTES: refused from its head, never read
    "empty_report",               # the study has no report text
    "no_usable_scan",             # every scan of the study was rejected
)


@dataclass(frozen=True)
class Rejection:
    """One skipped input. ``detail`` is for engineers: it never holds patient fields or report text."""

    REASONS: ClassVar[tuple[str, ...]] = REJECTION_REASONS
    uri: str
    reason: str
    detail: str = ""
    study_id: str = ""

    def __post_init__(self) -> None:
        if self.reason not in self.REASONS:
            raise ValueError(f"unknown {type(self).__name__.lower()} reason {self.reason!r}")


# Why a file was left out of a scan that was still decoded; the ``reason`` of a Note is one of these.
NOTE_REASONS = (
    "skipped_file",     # not DICOM (no DICM magic and does not parse), zero bytes, or a DICOMDIR
    "duplicate_slice",  # same SOPInstanceUID, or same position and identical pixels, as a slice kept
)


@dataclass(frozen=True)
class Note(Rejection):
    """One file left out of a scan that was not refused for it (a stray file, a duplicate slice). It goes
    to the quarantine like a Rejection, told apart by its reason. ``detail`` names files and counts only."""

    REASONS: ClassVar[tuple[str, ...]] = NOTE_REASONS


@dataclass
class Volume:
    """One decoded 3D scan.

    ``pixels`` is ``[D, H, W]``: D runs along the slice normal for DICOM (ordered by position), along the
    third voxel axis for NIfTI. Its values are as stored, mapped to physical ones (HU for CT) by
    ``rescale`` = ``(slope, intercept)``: ``values()`` = pixels * slope + intercept, in float32. DICOM keeps
    the stored integers (int16 for most CT: half the memory of float32) with the series' RescaleSlope and
    RescaleIntercept; NIfTI, and DICOM series whose slices differ in rescale, hold float32 physical values
    with rescale (1, 0). ``affine`` maps a voxel index ``(d, h, w, 1)`` to RAS+ world millimetres.
    ``spacing`` is ``(D, H, W)`` mm.
    """

    pixels: np.ndarray
    affine: np.ndarray
    modality: str
    uri: str
    series: str = ""
    spacing: tuple[float, float, float] = field(default=(1.0, 1.0, 1.0))
    rescale: tuple[float, float] = (1.0, 0.0)

    def values(self) -> np.ndarray:
        """float32 ``[D, H, W]`` physical values (HU for CT): a new array unless ``pixels`` already are them."""
        slope, intercept = self.rescale
        if (slope, intercept) == (1.0, 0.0):
            return np.asarray(self.pixels, dtype=np.float32)
        return (self.pixels * slope + intercept).astype(np.float32)


@dataclass
class Decoded:
    """What decoding one manifest scan gave: zero or more volumes, what was rejected, and the files left
    out of what was kept (``notes``)."""

    volumes: list[Volume] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
