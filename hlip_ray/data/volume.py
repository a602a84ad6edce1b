"""HLIP's volume recipe: resize to the model grid, intensity windows, uint8.

A volume is read as stored (``Volume.pixels``, int16 for most CT, with its ``rescale``) and a few slices at a
time: no full-resolution float copy of it is made, whatever the number of windows. For each window, its
slices are clipped to the window as they are read and averaged into the grid's depth, then each plane is
resized; one pass over the volume per window.
"""

from __future__ import annotations

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from hlip_ray.data.records import Volume

# (d, h, w) as a RAS NIfTI's (k, j, i): W runs to the right, H to anterior, D to superior.
RAS_AXES = ("S", "A", "R")
FOREGROUND_HU = -500.0       # CT: air is about -1000 HU, soft tissue about 0
FOREGROUND_FRACTION = 0.1    # MR: a tenth of the upper percentile separates the body from background noise
CHUNK_SLICES = 16            # slices converted to float32 at a time where a whole volume is scanned


def recipe(data) -> dict:
    """``preprocess_volume``'s options from a config's ``data`` section (all but the grid: evaluation may
    use its own)."""
    return {"windows": [tuple(window) for window in data.windows], "mri_percentiles": tuple(data.mri_percentiles),
            "reorient_to_ras": data.reorient_to_ras, "crop_foreground": data.crop_foreground,
            "spacing": tuple(data.spacing) if data.spacing else None, "fit": data.fit}


def preprocess_volume(
    volume: Volume,
    grid: tuple[int, int, int],
    windows: list[tuple[float, float]],
    mri_percentiles: tuple[float, float] = (0.5, 99.5),
    reorient_to_ras: bool = False,
    crop_foreground: bool = False,
    spacing: tuple[float, float, float] | None = None,
    fit: str = "resize",
) -> np.ndarray:
    """The model input for one volume: uint8 ``[C, D, H, W]`` with C = len(windows), (D, H, W) = grid.

    With ``spacing`` (mm, D, H, W), HLIP's recipe: the volume's values are first resampled to that voxel
    spacing (trilinear, to ``floor(shape * volume spacing / spacing)`` voxels, as torch's ``interpolate``
    with ``align_corners=False``), then windowed (CT) or clipped to the percentiles (MR) and scaled to
    [0, 1], then fitted to ``grid``. ``fit``: ``resize`` stretches the volume to the grid (below); ``crop``
    keeps its voxels, zero-pads (after scaling: the window's low end) and centre-crops each axis to the
    grid, the same number of voxels more before the volume than after, or one fewer.

    CT (``modality == "CT"``): channel c is the volume's values (``Volume.values()``: HU) clipped to
    ``windows[c]`` = (low, high), resized to ``grid``, and scaled to [0, 1]. Any other modality: clipped to
    the volume's own ``mri_percentiles`` (of its voxels before resizing), resized and scaled to [0, 1],
    repeated in all C channels so CT and MR batches share C. Last, [0, 1] is rounded to 0..255. The resize
    (``resize``) is an area average along each axis that shrinks, linear interpolation along one that grows;
    no resampling to a physical spacing. Until issue #34 it sampled trilinearly, which aliases fine
    structure (docs/data.md, "Resizing to the grid"). ``reorient_to_ras`` first flips/permutes the axes so
    that W runs to the right, H to anterior and D to superior (the layout of a RAS NIfTI read as (k, j, i)).
    ``crop_foreground`` first crops the volume to the bounding box of the body (voxels above
    ``FOREGROUND_HU`` for CT, above ``FOREGROUND_FRACTION`` of the upper percentile for MR), so the
    anatomy, not the air around it, fills the grid.

    Memory beyond the volume: a few of its slices in float32, the grid, and for MR a copy of the stored
    values (percentiles partition it).
    """
    if not windows or any(high <= low for low, high in windows):
        raise ValueError(f"windows must be a non-empty list of (low, high) with low < high, not {windows}")
    pixels, rescale = np.asarray(volume.pixels), tuple(volume.rescale)
    if reorient_to_ras:  # flips and a transpose: a view
        pixels = apply_orientation(pixels, ornt_transform(io_orientation(volume.affine), axcodes2ornt(RAS_AXES)))
    ct = volume.modality.upper() == "CT"
    if crop_foreground:
        pixels = pixels[_foreground_box(pixels, rescale, ct, mri_percentiles[1])]
    bounds = [(float(low), float(high)) for low, high in windows] if ct else [
        _percentiles(pixels, rescale, mri_percentiles)]
    if spacing is not None:
        pixels, rescale = _resampled(pixels, rescale, _spacing_of(volume, reorient_to_ras), spacing), (1.0, 0.0)
    if fit == "crop":
        box, placed = _centre(pixels.shape, grid)
        channels = np.zeros((len(bounds), *grid), np.uint8)
        for channel, (low, high) in zip(channels, bounds):
            channel[placed] = _quantised(_values(pixels[box], rescale), low, high)
    else:
        channels = np.stack([_quantised(_windowed(pixels, rescale, grid, low, high), low, high)
                             for low, high in bounds])
    return channels if len(channels) == len(windows) else np.repeat(channels, len(windows), axis=0)


def _spacing_of(volume: Volume, reorient_to_ras: bool) -> np.ndarray:
    """The voxel spacing (mm) along the axes of ``volume.pixels`` as ``preprocess_volume`` reads them: the
    lengths of the affine's columns, permuted as reorientation permutes the axes."""
    spacing = np.linalg.norm(np.asarray(volume.affine, float)[:3, :3], axis=0)
    if not reorient_to_ras:
        return spacing
    to_ras = ornt_transform(io_orientation(volume.affine), axcodes2ornt(RAS_AXES))
    out = np.empty(3)
    out[to_ras[:, 0].astype(int)] = spacing
    return out


def _resampled(pixels: np.ndarray, rescale: tuple[float, float], spacing: np.ndarray,
               target: tuple[float, float, float]) -> np.ndarray:
    """float32 physical values resampled from ``spacing`` to ``target`` mm: linear interpolation along each
    axis to ``floor(size * spacing / target)`` voxels (at least 1), as trilinear ``interpolate``. The product
    is rounded to 1e-3 voxel first: a NIfTI header's 0.7 mm is float32's 0.69999999, and 50 voxels of it
    are 35 at 1 mm, not 34."""
    shape = tuple(max(1, int(round(size * have / want, 3))) for size, have, want in zip(pixels.shape, spacing, target))
    values = resize(pixels, shape, linear=True).astype(np.float64)
    slope, intercept = rescale
    return (values * slope + intercept).astype(np.float32)


def _centre(shape: tuple[int, ...], grid: tuple[int, int, int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Centre crop and zero-pad of ``shape`` to ``grid``: (the part of the volume kept, where it goes in the
    grid). An axis longer than the grid loses ``(size - out) // 2`` voxels before and the rest after; a shorter
    one is padded by ``(out - size) // 2`` before and the rest after."""
    box, placed = [], []
    for size, out in zip(shape, grid):
        start = max(size - out, 0) // 2
        before = max(out - size, 0) // 2
        kept = min(size, out)
        box.append(slice(start, start + kept))
        placed.append(slice(before, before + kept))
    return tuple(box), tuple(placed)


def _windowed(pixels: np.ndarray, rescale: tuple[float, float], grid: tuple[int, int, int], low: float,
              high: float) -> np.ndarray:
    """float32 physical values on ``grid``, each input voxel clipped to [low, high] before ``resize`` averages
    it (the window bounds mapped to stored values, so the stored volume is read as it is): a voxel of bone
    beside brain counts as the window's top, not as 1000 HU spread over the brain around it."""
    slope, intercept = rescale
    clip = tuple(sorted(((low - intercept) / slope, (high - intercept) / slope))) if slope else None
    values = resize(pixels, grid, clip).astype(np.float64)
    return (values * slope + intercept).astype(np.float32)  # as Volume.values() rounds, on the grid only


# How ``resize`` brings a volume to the grid, as the shard cache records it (``preprocessing_settings``): a
# cache made before issue #34 sampled trilinearly and records none.
RESIZE_METHOD = "area"


def resize(pixels: np.ndarray, grid: tuple[int, int, int], clip: tuple[float, float] | None = None,
           linear: bool = False) -> np.ndarray:
    """float32 ``grid`` from ``pixels`` ``[D, H, W]`` (any real dtype; a strided view is read as it is), each
    input voxel first clipped to ``clip`` = (low, high) when given. ``linear``: linear interpolation along
    every axis, shrinking too (trilinear ``interpolate``, ``align_corners=False``), instead of the average.

    Separable, one axis at a time. An axis that shrinks is box-filtered: output voxel i is the mean of the
    input over its extent [i, i + 1) x in/out, input voxels cut by its edges weighted by the part inside
    (area averaging: every input voxel counts, by the share of it an output voxel covers, so fine structure
    is averaged rather than sampled and does not alias). An axis that grows, or keeps its size, is
    interpolated linearly, as torch's ``trilinear`` with ``align_corners=False`` does. Each output slice
    is the average of the few input slices it covers (converted to float32 as they are read), then resized
    in its plane.
    """
    depth, rows, columns = (_taps(size, out, linear) for size, out in zip(pixels.shape, grid))
    if grid[0] > pixels.shape[0]:  # more slices: resize the planes first, then interpolate between them
        planes = np.concatenate([_plane(_float32(pixels[start : start + CHUNK_SLICES], clip), rows, columns)
                                 for start in range(0, len(pixels), CHUNK_SLICES)])
        return np.stack(list(_along_depth(planes, depth)))
    out = np.empty(grid, np.float32)
    for index, average in enumerate(_along_depth(pixels, depth, clip)):  # each output slice's average, its plane
        out[index] = _plane(average[None], rows, columns)[0]
    return out


def _taps(size: int, out: int, linear: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Resampling ``size`` voxels to ``out`` along one axis: ``(start [out], weight [out, K])``, output i being
    ``sum_k weight[i, k] * input[start[i] + k]`` (``resize``)."""
    starts, weights = [], []
    if out < size and not linear:  # box: output i covers input [i, i + 1) * size / out
        for i in range(out):
            low, high = i * size / out, (i + 1) * size / out
            first, last = int(np.floor(low)), min(int(np.ceil(high)), size)
            cover = np.minimum(np.arange(first + 1, last + 1), high) - np.maximum(np.arange(first, last), low)
            starts.append(first)
            weights.append(cover / cover.sum())
    else:  # linear, torch's align_corners=False: the centre of output i lies at (i + 0.5) * size / out - 0.5
        for i in range(out):
            source = min(max((i + 0.5) * size / out - 0.5, 0.0), size - 1)
            first = min(int(source), max(size - 2, 0))  # the last voxel is the right one of the last pair
            right = source - first
            starts.append(first)
            weights.append(np.array([1.0 - right, right]) if size > 1 else np.ones(1))
    width = max(len(w) for w in weights)
    start = np.minimum(np.array(starts), size - width)  # every output reads `width` voxels inside the axis
    weight = np.zeros((out, width))
    for i, (first, w) in enumerate(zip(starts, weights)):
        weight[i, first - start[i] : first - start[i] + len(w)] = w
    return start, weight.astype(np.float32)


def _float32(pixels: np.ndarray, clip: tuple[float, float] | None, out: np.ndarray | None = None) -> np.ndarray:
    """``pixels`` as float32 (into ``out`` when given), clipped to ``clip`` when given; never ``pixels`` itself
    when clipped."""
    if out is None:
        out = np.array(pixels, np.float32) if clip else np.asarray(pixels, np.float32)
    else:
        np.copyto(out, pixels, casting="unsafe")
    if clip:
        np.clip(out, clip[0], clip[1], out=out)
    return out


def _along_depth(pixels: np.ndarray, taps: tuple[np.ndarray, np.ndarray], clip: tuple[float, float] | None = None):
    """Each output slice, float32 ``[H, W]``, of axis 0 resampled by ``taps``: a weighted sum of the few input
    slices it reads, each converted to float32 as it is added; the slices a box covers whole share one weight,
    applied once to their sum. (Elementwise on one thread: BLAS's threads made this sum slower, not faster, on
    a busy node.)"""
    start, weight = taps
    term = np.empty(pixels.shape[1:], np.float32)
    clipped = np.empty(pixels.shape[1:], np.float32) if clip else None
    for first, w in zip(start, weight):
        used = np.flatnonzero(w)
        common = w[used].max()
        average = np.zeros(pixels.shape[1:], np.float32)
        for k in used:
            slice_ = pixels[first + k] if clip is None else _float32(pixels[first + k], clip, clipped)
            if w[k] == common:
                np.add(average, slice_, out=average, dtype=np.float32)
            else:
                np.multiply(slice_, w[k] / common, out=term, dtype=np.float32)
                average += term
        average *= common
        yield average


def _plane(slices: np.ndarray, rows: tuple[np.ndarray, np.ndarray],
           columns: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """float32 ``[n, H', W']``: axes 1 and 2 of ``slices`` ``[n, H, W]`` resampled by ``rows`` and ``columns``."""
    for axis, (start, weight) in ((1, rows), (2, columns)):
        shape = [1, 1, 1]
        shape[axis] = -1
        out = None
        for k in range(weight.shape[1]):
            term = np.take(slices, start + k, axis=axis).astype(np.float32, copy=False)
            term *= weight[:, k].reshape(shape)
            out = term if out is None else np.add(out, term, out=out)
        slices = out
    return slices


def _values(pixels: np.ndarray, rescale: tuple[float, float]) -> np.ndarray:
    """float32 physical values of stored ``pixels``, as ``Volume.values()`` computes them."""
    slope, intercept = rescale
    if (slope, intercept) == (1.0, 0.0):
        return np.asarray(pixels, dtype=np.float32)
    return (pixels * slope + intercept).astype(np.float32)


def _percentiles(pixels: np.ndarray, rescale: tuple[float, float], percentiles) -> tuple[float, ...]:
    """The ``percentiles`` of the physical values. Taken of the stored values and rescaled (a rescale with a
    positive slope keeps their order), so that no float copy of the volume is made: they may differ from
    those of float32 values in the last bit (numpy interpolates integers in float64, float32 in float32)."""
    slope, intercept = rescale
    if slope <= 0:
        return tuple(float(p) for p in np.percentile(_values(pixels, rescale), percentiles))
    return tuple(float(p) * slope + intercept for p in np.percentile(pixels, percentiles))


def _foreground_box(pixels: np.ndarray, rescale: tuple[float, float], ct: bool,
                    upper_percentile: float) -> tuple[slice, slice, slice]:
    """The bounding box of the foreground of ``[D, H, W]`` (all of it if there is none), scanned a few slices
    at a time."""
    threshold = FOREGROUND_HU if ct else FOREGROUND_FRACTION * _percentiles(pixels, rescale, [upper_percentile])[0]
    present = [np.zeros(size, bool) for size in pixels.shape]
    for start in range(0, len(pixels), CHUNK_SLICES):
        foreground = _values(pixels[start : start + CHUNK_SLICES], rescale) > threshold
        present[0][start : start + len(foreground)] = foreground.any(axis=(1, 2))
        present[1] |= foreground.any(axis=(0, 2))
        present[2] |= foreground.any(axis=(0, 1))
    if not present[0].any():
        return (slice(None),) * 3
    return tuple(slice(int(np.flatnonzero(p)[0]), int(np.flatnonzero(p)[-1]) + 1) for p in present)


def _quantised(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """uint8: ``values`` clipped to [low, high], mapped to [0, 1] and rounded to 0..255; all zeros when
    high <= low (a constant volume's percentiles)."""
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    scaled = np.clip(values, low, high)
    scaled -= low
    scaled /= high - low
    scaled *= 255
    return np.round(scaled).astype(np.uint8)
