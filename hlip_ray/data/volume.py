"""HLIP's volume recipe: intensity windows, resize to the model grid, uint8."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from hlip_ray.data.records import Volume

# (d, h, w) as a RAS NIfTI's (k, j, i): W runs to the right, H to anterior, D to superior.
RAS_AXES = ("S", "A", "R")


def preprocess_volume(
    volume: Volume,
    grid: tuple[int, int, int],
    windows: list[tuple[float, float]],
    mri_percentiles: tuple[float, float] = (0.5, 99.5),
    reorient_to_ras: bool = False,
    crop_foreground: bool = False,
) -> np.ndarray:
    """The model input for one volume: uint8 ``[C, D, H, W]`` with C = len(windows), (D, H, W) = grid.

    CT (``modality == "CT"``, pixels in HU): channel c is the volume clipped to ``windows[c]`` =
    (low, high) HU and scaled to [0, 1]. Any other modality: the volume clipped to its own
    ``mri_percentiles`` and scaled to [0, 1], repeated in all C channels so CT and MR batches share C.
    Then trilinear resize of the voxel grid to ``grid`` (no resampling to a physical spacing) and
    rounding of [0, 1] to 0..255. ``reorient_to_ras`` first flips/permutes the axes so that W runs
    to the right, H to anterior and D to superior (the layout of a RAS NIfTI read as (k, j, i)).
    ``crop_foreground`` first crops the volume to the bounding box of the body (voxels above
    ``FOREGROUND_HU`` for CT, above ``FOREGROUND_FRACTION`` of the upper percentile for MR), so the
    anatomy, not the air around it, fills the grid.
    """
    if not windows or any(high <= low for low, high in windows):
        raise ValueError(f"windows must be a non-empty list of (low, high) with low < high, not {windows}")
    pixels = np.asarray(volume.pixels, dtype=np.float32)
    if reorient_to_ras:
        to_ras = ornt_transform(io_orientation(volume.affine), axcodes2ornt(RAS_AXES))
        pixels = np.ascontiguousarray(apply_orientation(pixels, to_ras))
    if crop_foreground:
        pixels = _crop_to_foreground(pixels, volume.modality.upper() == "CT", mri_percentiles[1])
    if volume.modality.upper() == "CT":
        channels = np.stack([_scale(pixels, low, high) for low, high in windows])
    else:
        low, high = np.percentile(pixels, mri_percentiles)
        channels = _scale(pixels, float(low), float(high))[None]
    resized = F.interpolate(torch.from_numpy(channels)[None], size=tuple(grid), mode="trilinear", align_corners=False)
    quantised = (resized[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return quantised if len(quantised) == len(windows) else np.repeat(quantised, len(windows), axis=0)


FOREGROUND_HU = -500.0       # CT: air is about -1000 HU, soft tissue about 0
FOREGROUND_FRACTION = 0.1    # MR: a tenth of the upper percentile separates the body from background noise


def _crop_to_foreground(pixels: np.ndarray, ct: bool, upper_percentile: float) -> np.ndarray:
    """``[D, H, W]`` cropped to the bounding box of the foreground (unchanged if there is none)."""
    threshold = FOREGROUND_HU if ct else FOREGROUND_FRACTION * float(np.percentile(pixels, upper_percentile))
    foreground = pixels > threshold
    if not foreground.any():
        return pixels
    box = []
    for axis in range(3):
        present = np.flatnonzero(foreground.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return pixels[tuple(box)]


def _scale(pixels: np.ndarray, low: float, high: float) -> np.ndarray:
    """``[D, H, W]`` clipped to [low, high] and mapped to [0, 1]; all zeros when high == low (a constant volume)."""
    if high <= low:
        return np.zeros_like(pixels)
    scaled = np.clip(pixels, low, high)
    scaled -= low  # in place: volumes are large
    scaled /= high - low
    return scaled
