"""HLIP's preprocessing recipes, checked against an independent computation written from the recipe's
description (HLIP's chest CT: resample to a voxel spacing with trilinear interpolation, window to [0, 1],
zero-pad and centre-crop to the grid), not from the pipeline's code: the expected inputs are computed here
with torch's ``interpolate`` and numpy from the geometry the test wrote into the files.
"""

from __future__ import annotations

from io import BytesIO

import nibabel
import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from hlip_ray.config import ConfigError, load_config
from hlip_ray.data.decode import decode_dicom_files, decode_nifti
from hlip_ray.data.volume import preprocess_volume, recipe

WINDOW = (-1150.0, 350.0)


def _hu(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """int16 HU ``[D, H, W]``: air, a body, bone and fine noise, so that every step of the recipe shows."""
    rng = np.random.default_rng(seed)
    d, h, w = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    hu = np.where(h**2 + w**2 < 0.7, 40.0, -1000.0)
    hu = np.where((h**2 + w**2 > 0.5) & (h**2 + w**2 < 0.7), 900.0, hu)   # a ring of bone
    hu += 120 * np.sin(9 * d) * np.cos(7 * w) + rng.normal(0, 15, shape)
    return np.round(np.clip(hu, -1024, 3000)).astype(np.int16)


def _expected(hu: np.ndarray, spacing, target, grid, fit: str) -> np.ndarray:
    """The recipe from its description: trilinear to floor(shape * spacing / target) voxels, window, then
    zero-pad and centre-crop (crop) or stretch (resize), then 0..255."""
    size = [max(1, int(n * s / t)) for n, s, t in zip(hu.shape, spacing, target)]
    resampled = F.interpolate(torch.tensor(hu, dtype=torch.float64)[None, None], size=size, mode="trilinear",
                              align_corners=False)[0, 0].numpy()
    low, high = WINDOW
    scaled = np.clip((resampled - low) / (high - low), 0, 1)
    if fit == "crop":
        for axis, out in enumerate(grid):
            extra = scaled.shape[axis] - out
            if extra > 0:
                scaled = np.take(scaled, np.arange(extra // 2, extra // 2 + out), axis=axis)
            elif extra < 0:
                pad = [(0, 0)] * 3
                pad[axis] = (-extra // 2, -extra - (-extra // 2))
                scaled = np.pad(scaled, pad)
    return np.round(scaled * 255).astype(np.uint8)


def _nifti(hu: np.ndarray, spacing) -> bytes:
    """A NIfTI whose voxel axes (i, j, k) are the array's (W, H, D) with the given (D, H, W) spacing."""
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    image = nibabel.Nifti1Image(np.ascontiguousarray(hu.transpose(2, 1, 0)), affine)
    image.header.set_slope_inter(1, 0)
    return image.to_bytes()


def _dicom_series(hu: np.ndarray, spacing) -> list[tuple[str, bytes]]:
    """An axial CT series of ``hu`` ``[D, H, W]``: slices ``spacing[0]`` mm apart, PixelSpacing (row, column)
    = (``spacing[1]``, ``spacing[2]``), stored with intercept -1024."""
    series, files = generate_uid(), []
    for index, plane in enumerate(hu):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", ds.file_meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = "CT", series, index + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, index * spacing[0]]
        ds.PixelSpacing, ds.SliceThickness = [spacing[1], spacing[2]], spacing[0]
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (plane.astype(np.int32) + 1024).astype(np.uint16).tobytes()
        buffer = BytesIO()
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        files.append((f"s3://bucket/study/ct/{index:03d}.dcm", buffer.getvalue()))
    return files[::-1]   # in no particular order: the decoder sorts along the normal


def _volume(kind: str, hu: np.ndarray, spacing):
    if kind == "nifti":
        decoded = decode_nifti("s3://bucket/study/ct.nii.gz", _nifti(hu, spacing), modality="CT")
    else:
        decoded = decode_dicom_files(_dicom_series(hu, spacing), "s3://bucket/study/ct")
    (volume,) = decoded.volumes
    return volume


CHEST = ["data.spacing=[3, 1, 1]", "data.fit=crop", "data.windows=[[-1150, 350]]"]


@pytest.mark.parametrize("kind", ["nifti", "dicom"])
@pytest.mark.parametrize("spacing, grid", [
    ((1.25, 0.7, 0.8), (8, 48, 48)),      # depth shrinks and is cropped, the plane shrinks and is padded
    ((5.0, 1.5, 1.1), (64, 32, 64)),      # depth grows and is padded; H cropped, W padded
], ids=["thin-slices", "thick-slices"])
def test_the_chest_recipe_resamples_to_its_spacing_windows_and_crops_as_described(kind, spacing, grid):
    hu = _hu((30, 50, 44))
    volume = _volume(kind, hu, spacing)
    config = load_config(None, [*CHEST, f"data.grid={list(grid)}"])
    out = preprocess_volume(volume, grid, **recipe(config.data))
    expected = _expected(hu, spacing, (3, 1, 1), grid, "crop")
    assert out.shape == (1, *grid) and out.dtype == np.uint8
    # float32 here, float64 in the expectation: a value may round to the level beside.
    assert np.abs(out[0].astype(int) - expected).max() <= 1 and np.mean(out[0] != expected) < 0.01
    assert (out[0] == 0).any() and (out[0] == 255).any()   # padding and bone both reach the input


def test_a_scan_at_another_spacing_reaches_the_model_at_the_same_physical_scale():
    """The same anatomy acquired at two spacings: with ``data.spacing`` both come out alike; stretched to
    the grid (today's default) they differ by the ratio of their fields of view."""
    fine = _hu((40, 60, 60), seed=1)
    coarse = F.interpolate(torch.tensor(fine, dtype=torch.float32)[None, None], size=(20, 30, 30),
                           mode="trilinear", align_corners=False)[0, 0].round().short().numpy()
    grid = (12, 36, 36)
    resampled = [preprocess_volume(_volume("nifti", hu, spacing), grid, **recipe(load_config(None, CHEST).data))
                 for hu, spacing in ((fine, (1.5, 1.0, 1.0)), (coarse, (3.0, 2.0, 2.0)))]
    assert np.abs(resampled[0].astype(int) - resampled[1]).mean() < 6
    cropped_only = [preprocess_volume(_volume("nifti", hu, (1.0, 1.0, 1.0)), grid, [WINDOW], fit="crop")
                    for hu in (fine, coarse)]
    assert np.abs(cropped_only[0].astype(int) - cropped_only[1]).mean() > 3 * np.abs(
        resampled[0].astype(int) - resampled[1]).mean()


def test_a_bad_spacing_or_fit_fails_naming_the_key():
    with pytest.raises(ConfigError, match="data.spacing"):
        load_config(None, ["data.spacing=[3, 0, 1]"])
    with pytest.raises(ConfigError, match="data.fit"):
        load_config(None, ["data.fit=pad"])


def test_preprocess_with_the_ct_rate_config_writes_hlips_chest_inputs(tmp_path, ray_session, monkeypatch):
    """``hlip-ray preprocess --config jobs/configs/ct_rate.yaml``, from another folder, on a NIfTI chest CT of
    4.5 x 1.4 x 1.2 mm: the shard holds the recipe's 112 x 336 x 336 input, computed here from its
    description, and the cache records the spacing and fit it was made with."""
    import json

    from hlip_ray import cli
    from hlip_ray.storage import Storage
    from tests.conftest import REPO_ROOT
    from tests.helpers import shard_records

    spacing = (4.5, 1.4, 1.2)
    hu = _hu((40, 200, 200), seed=3)
    study = tmp_path / "corpus" / "chest-1"
    study.mkdir(parents=True)
    (study / "ct.nii.gz").write_bytes(_nifti(hu, spacing))
    (study / "report.txt").write_text("Lungs are clear. No effusion.")
    (study / "labels.json").write_text(json.dumps({"modality": "CT", "labels": {}}))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["manifest", "--root", "corpus", "--out", "manifest.parquet", "data.val_fraction=0"]) == 0
    assert cli.main(["preprocess", "--config", str(REPO_ROOT / "jobs/configs/ct_rate.yaml"),
                     "--manifest", "manifest.parquet", "--out", "shards"]) == 0
    (record,) = shard_records(str(tmp_path / "shards"), Storage()).values()
    assert list(record["shape"]) == [1, 1, 112, 336, 336]
    pixels = np.frombuffer(record["pixels"], np.uint8).reshape(112, 336, 336)
    expected = _expected(hu, spacing, (3, 1, 1), (112, 336, 336), "crop")
    assert np.abs(pixels.astype(int) - expected).max() <= 1 and np.mean(pixels != expected) < 0.01
    settings = json.loads((tmp_path / "shards" / "shards.json").read_text())
    assert "[3.0, 1.0, 1.0]" in json.dumps(settings) and '"crop"' in json.dumps(settings)
