"""The synthetic corpus: deterministic, real DICOM/NIfTI, labels = masks = reports, no global-intensity leak."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless

from hlip_ray.data.decode import decode_dicom_files
from hlip_ray.demo import synth
from hlip_ray.demo.synth import (
    LABELS,
    MAX_LESION_FRACTION,
    MR_MATRICES,
    REAL_SIZES,
    SIZES,
    TRANSFER_SYNTAXES,
    VOCABULARY,
    CorpusSummary,
    folder_writer,
    write_corpus,
)

STUDIES, SEED = 60, 0
# Against white matter, by contrast: an early subacute hematoma is dark on T2 and FLAIR, an acute infarct bright.
EXPECTED_APPEARANCE = {
    "ct": {"hemorrhage": "hyper", "infarct": "hypo", "mass": "hyper"},
    "t1": {"hemorrhage": "hyper", "infarct": "hypo", "mass": "hyper"},
    "t2": {"hemorrhage": "hypo", "infarct": "hyper", "mass": "hyper"},
    "flair": {"hemorrhage": "hypo", "infarct": "hyper", "mass": "hyper"},
}


def expected_appearance(label: str, scan_name: str) -> str:
    return EXPECTED_APPEARANCE[scan_name.split("_")[1]][label]   # <index>_<contrast or ct>_<orientation>


def files_of(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def read_scan(folder: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """A scan in its masks' voxel order, that order's affine (voxel -> RAS+ mm) and facts about its files.

    DICOM: ``[D, H, W]`` sorted by position along the slice normal, rescaled (HU for CT); NIfTI: ``(i, j, k)``.
    """
    paths = sorted(folder.glob("*.dcm"))
    if not paths:
        image = nib.load(next(folder.glob("*.nii.gz")))
        normal_axis = int(np.abs(image.affine[:3, 2]).argmax())
        return np.asarray(image.dataobj, np.float32), image.affine, {"format": "nifti", "normal_axis": normal_axis}
    files = [pydicom.dcmread(path) for path in paths]
    first_file = files[0]
    if "NumberOfFrames" in first_file:  # one enhanced object: geometry in its functional groups
        assert len(files) == 1
        shared = first_file.SharedFunctionalGroupsSequence[0]
        orientation = shared.PlaneOrientationSequence[0].ImageOrientationPatient
        measures = shared.PixelMeasuresSequence[0]
        rescale = shared.get("PixelValueTransformationSequence", [{}])[0]
        frames = first_file.pixel_array.reshape(int(first_file.NumberOfFrames), first_file.Rows, first_file.Columns)
        slices = [(np.array(group.PlanePositionSequence[0].ImagePositionPatient, dtype=float), frame)
                  for group, frame in zip(first_file.PerFrameFunctionalGroupsSequence, frames)]
    else:
        assert len({(ds.Rows, ds.Columns, ds.SeriesInstanceUID, ds.PatientID) for ds in files}) == 1
        orientation, measures, rescale = first_file.ImageOrientationPatient, first_file, first_file
        slices = [(np.array(ds.ImagePositionPatient, dtype=float), ds.pixel_array) for ds in files]
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, col)
    order = np.argsort([float(normal @ position) for position, _ in slices])
    slices = [slices[i] for i in order]
    slope, intercept = float(rescale.get("RescaleSlope", 1)), float(rescale.get("RescaleIntercept", 0))
    pixels = np.stack([frame * slope + intercept for _, frame in slices]).astype(np.float32)
    first, (dy, dx) = slices[0][0], map(float, measures.PixelSpacing)
    step = slices[1][0] - first if len(slices) > 1 else normal * float(measures.SliceThickness)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = step, col * dy, row * dx, first
    facts = {
        "format": "dicom", "normal_axis": int(np.abs(normal).argmax()),
        "rle": first_file.file_meta.TransferSyntaxUID == RLELossless, "top_down": bool(order[0] > order[-1]),
        "multiframe": "NumberOfFrames" in first_file,
        "modality": first_file.Modality, "patient": (str(first_file.PatientID), str(first_file.PatientName)),
    }
    return pixels, np.diag([-1.0, -1, 1, 1]) @ lps, facts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, CorpusSummary]:
    root = tmp_path_factory.mktemp("synth")
    return root, write_corpus(folder_writer(root), STUDIES, SEED)


@pytest.fixture(scope="module")
def studies(corpus) -> dict[str, dict]:
    """study_id -> {"labels": labels.json, "report": text, "scans": {name: (pixels, affine, facts)}}."""
    root, _ = corpus
    rows = [json.loads(line) for line in (root / "labels.jsonl").read_text().splitlines()]
    return {
        row["study_id"]: {
            "labels": json.loads((root / row["study_id"] / "labels.json").read_text()),
            "report": (root / row["study_id"] / "report.txt").read_text(),
            "scans": {folder.name: read_scan(folder) for folder in sorted((root / row["study_id"]).iterdir())
                      if folder.is_dir() and folder.name != "masks"},
        }
        for row in rows
    }


def test_same_seed_gives_identical_bytes_another_seed_differs(tmp_path):
    summaries = [write_corpus(folder_writer(tmp_path / name), 3, seed) for name, seed in [("a", 5), ("b", 5), ("c", 6)]]
    first, again, other = (files_of(tmp_path / name) for name in "abc")
    assert first == again and summaries[0] == summaries[1]
    assert first != other
    assert summaries[0].files == len(first) - 1 and summaries[0].bytes == sum(map(len, first.values())) - len(
        first["corpus.json"])


def test_canary_reaches_only_its_study_report_and_patient_name(tmp_path):
    canary = "Zebulon^Canaryfield"
    write_corpus(folder_writer(tmp_path / "plain"), 3, 5)
    write_corpus(folder_writer(tmp_path / "canary"), 3, 5, canary=canary)
    plain, marked = files_of(tmp_path / "plain"), files_of(tmp_path / "canary")
    assert plain.keys() == marked.keys()
    changed = {path for path in plain if plain[path] != marked[path]} - {"corpus.json"}   # corpus.json: its byte count
    assert all(path.startswith("study-0000/") for path in changed) and "study-0000/report.txt" in changed
    assert {path for path, data in marked.items() if canary.encode() in data} == changed
    assert plain["study-0000/report.txt"].decode().strip() in marked["study-0000/report.txt"].decode()
    for path in changed - {"study-0000/report.txt"}:
        assert path.endswith(".dcm") and str(pydicom.dcmread(tmp_path / "canary" / path).PatientName) == canary


def test_files_decode_to_plausible_values_with_varied_formats(corpus, studies):
    root, summary = corpus
    counts, orientations = Counter(), Counter()
    for study in studies.values():
        for pixels, _, facts in study["scans"].values():
            counts[facts["format"]] += 1
            counts["rle"] += facts.get("rle", False)
            counts["top_down"] += facts.get("top_down", False)
            counts["multiframe"] += facts.get("multiframe", False)
            orientations[facts["normal_axis"]] += 1
            depth, rows, cols = pixels.shape if facts["format"] == "dicom" else pixels.shape[::-1]
            (low, high), (small, large) = SIZES["small"]
            assert low <= depth <= high and small <= cols <= large and rows <= large
            if study["labels"]["modality"] == "CT":
                assert pixels.min() >= -1024 and np.median(pixels) < -500        # air around the head
                assert 0.05 < np.mean((pixels > 0) & (pixels < 80)) < 0.6    # brain in the brain window
                assert pixels.max() > 700                                      # skull
            else:
                assert pixels.min() >= 0 and np.percentile(pixels, 99) > 100
            if facts["format"] == "dicom":
                assert facts["modality"] == study["labels"]["modality"]
                assert facts["patient"][0] == study["labels"]["patient_id"]
    assert counts["dicom"] == summary.dicom_series and counts["nifti"] == summary.nifti_scans > 0
    assert counts["rle"] == summary.rle_series > 0 and counts["top_down"] > 0
    assert 0 < counts["multiframe"] == summary.multiframe_series < summary.dicom_series   # both layouts
    assert set(orientations) == {0, 1, 2}   # sagittal (normal along x), coronal (y), axial (z)
    assert summary.scans == sum(len(study["scans"]) for study in studies.values()) > STUDIES
    corpus_json = json.loads((root / "corpus.json").read_text())
    assert corpus_json["seed"] == SEED and corpus_json["studies"] == STUDIES == summary.studies


def lesion_and_surroundings(root: Path, study_id: str, lesion: dict, scan: tuple) -> tuple[np.ndarray, np.ndarray]:
    """The lesion's mask and a one-voxel in-plane shell around it (bool arrays on the scan's grid)."""
    pixels, affine, facts = scan
    image = nib.load(root / study_id / lesion["mask"])
    mask = np.asarray(image.dataobj).astype(bool)
    assert mask.shape == pixels.shape and np.allclose(image.affine, affine, atol=1e-3)
    shell = mask.copy()
    for axis in (1, 2) if facts["format"] == "dicom" else (0, 1):
        shell |= np.roll(mask, 1, axis) | np.roll(mask, -1, axis)
    return mask, shell & ~mask


def test_masks_match_labels_geometry_and_contrast(corpus, studies):
    root, _ = corpus
    for study_id, study in studies.items():
        labels, ct = study["labels"], study["labels"]["modality"] == "CT"
        present = {label for label, value in labels["labels"].items() if value}
        scans_per_label = Counter(lesion["label"] for lesion in labels["lesions"])
        assert scans_per_label == {label: len(study["scans"]) for label in present}   # every scan shows each lesion
        for lesion in labels["lesions"]:
            pixels = study["scans"][lesion["scan"]][0]
            mask, shell = lesion_and_surroundings(root, study_id, lesion, study["scans"][lesion["scan"]])
            assert 0 < mask.sum() <= MAX_LESION_FRACTION * mask.size
            assert mask[tuple(np.round(lesion["center_voxel"]).astype(int))] and min(lesion["radius_voxels"]) > 1
            expected = expected_appearance(lesion["label"], lesion["scan"])
            assert lesion["appearance"] == expected
            inside, around = np.median(pixels[mask]), np.median(pixels[shell])
            contrast = inside - around if ct else (inside - around) / around
            threshold = 10 if ct else 0.15   # HU, or relative
            assert contrast > threshold if expected == "hyper" else contrast < -threshold, (study_id, lesion)


def test_reports_state_presence_and_absence_with_vocabulary_phrases(corpus, studies):
    root, _ = corpus
    assert json.loads((root / "vocabulary.json").read_text()) == VOCABULARY
    phrases = [phrase for entry in VOCABULARY.values() for kind in entry.values() for phrase in kind]
    assert not [(a, b) for a in phrases for b in phrases if a != b and a in b]   # no phrase hides in another
    for study in studies.values():
        text = study["report"].lower()
        for label in LABELS:
            positive = any(phrase in text for phrase in VOCABULARY[label]["positive"])
            negative = any(phrase in text for phrase in VOCABULARY[label]["negative"])
            assert (positive, negative) == ((True, False) if study["labels"]["labels"][label] else (False, True))
        for lesion in study["labels"]["lesions"]:
            assert lesion["location"] in text


def auc(scores, positives) -> float:
    scores, positives = np.asarray(scores), np.asarray(positives, bool)
    pos, neg = scores[positives][:, None], scores[~positives][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


def test_mean_intensity_does_not_predict_labels(corpus, studies):
    root, _ = corpus
    lesions = [(study_id, lesion, *lesion_and_surroundings(root, study_id, lesion, study["scans"][lesion["scan"]]))
               for study_id, study in studies.items() for lesion in study["labels"]["lesions"]]
    mr_ranges = {(study_id, name): np.percentile(pixels, [0.5, 99.5]) for study_id, study in studies.items()
                 for name, (pixels, _, _) in study["scans"].items() if study["labels"]["modality"] == "MR"}

    def scaled(study_id, name, window):   # CT: the window; MR: its 0.5-99.5 percentile range
        low, high = mr_ranges.get((study_id, name), window)
        return np.clip((studies[study_id]["scans"][name][0] - low) / (high - low), 0, 1)

    for window in [(0, 80), (-1150, 350)]:   # brain window, and the demo config's wide window
        scan_means = {(study_id, name): scaled(study_id, name, window).mean()
                      for study_id, study in studies.items() for name in study["scans"]}
        scores = [np.mean([scan_means[study_id, name] for name in study["scans"]]) for study_id, study in
                  studies.items()]
        for label in LABELS:
            positives = [study["labels"]["labels"][label] for study in studies.values()]
            assert 0.2 < np.mean(positives) < 0.7
            assert 0.35 <= auc(scores, positives) <= 0.65, (window, label)
        # and why: a lesion moves its scan's mean far less than scans vary, and never sets an MR scan's scale
        spread = np.std(list(scan_means.values()))
        for study_id, lesion, mask, shell in lesions:
            image = scaled(study_id, lesion["scan"], window)
            assert abs(image[mask].mean() - np.median(image[shell])) * mask.mean() < 0.2 * spread
            if (study_id, lesion["scan"]) in mr_ranges:
                pixels = studies[study_id]["scans"][lesion["scan"]][0]
                assert np.median(pixels[mask]) < 0.9 * mr_ranges[study_id, lesion["scan"]][1]


def test_patients_have_several_studies_with_consistent_identity(studies):
    per_patient = Counter(study["labels"]["patient_id"] for study in studies.values())
    assert max(per_patient.values()) <= 3 and sum(count > 1 for count in per_patient.values()) >= 5
    for study in studies.values():
        patient = study["labels"]["patient_id"]
        for _, _, facts in study["scans"].values():
            if facts["format"] == "dicom":
                assert facts["patient"] == (patient, patient.replace("-", "^"))


def test_medium_size_doubles_the_grid_and_keeps_the_content(tmp_path):
    small, medium = (write_corpus(folder_writer(tmp_path / size), 1, 2, size) for size in ("small", "medium"))
    assert (small.scans, small.prevalence) == (medium.scans, medium.prevalence)
    for size in ("small", "medium"):
        (low, high), (small_side, large_side) = SIZES[size]
        for folder in (tmp_path / size / "study-0000").iterdir():
            if folder.is_dir() and folder.name != "masks":
                pixels, _, facts = read_scan(folder)
                depth, _, cols = pixels.shape if facts["format"] == "dicom" else pixels.shape[::-1]
                assert low <= depth <= high and small_side <= cols <= large_side
    reports = [(tmp_path / size / "study-0000" / "report.txt").read_text() for size in ("small", "medium")]
    assert reports[0] == reports[1]


# -- size "real": studies as archives hold them, in the transfer syntaxes PACS exports use

REAL_SLICES = 10   # the real grids in-plane; few slices, so that a test writes them in seconds


def test_real_size_draws_archive_sizes_and_a_mix_of_transfer_syntaxes():
    """Drawn without rendering: CT one axial series of 300-600 slices at 512x512, MR 4-10 series of 176-256 slices
    at 256-512 pixels; every series DICOM, one file per slice, every transfer syntax among them."""
    syntaxes, counts = Counter(), {"CT": set(), "MR": set()}
    for index in range(24):
        patient = synth._draw_patient(3, index, fine=True)
        assert len(patient.vessels) == 24 and len(patient.calcifications) == 16
        study = synth._draw_study(3, index, patient, 0, None, "real", None)
        (fewest, most), (low, high), (small, large) = REAL_SIZES[study.modality]
        assert fewest <= len(study.scans) <= most
        counts[study.modality].add(len(study.scans))
        for scan in study.scans:
            depth, rows, cols = scan.shape
            assert low <= depth <= high and small <= cols <= large and rows == cols
            assert scan.format == "dicom" and not scan.multiframe and set(scan.fine) == {"vessel", "calcification"}
            assert study.modality == "MR" or (scan.orientation == "ax" and cols == 512)
            assert study.modality == "CT" or cols in MR_MATRICES
            syntaxes[scan.syntax] += 1
    assert set(syntaxes) == set(TRANSFER_SYNTAXES) and counts["CT"] == {1} and len(counts["MR"]) > 2
    with pytest.raises(ValueError, match="transfer_syntax"):
        write_corpus(folder_writer("unused"), 1, 0, "real", transfer_syntax="jpeg")


@pytest.fixture(scope="module")
def real_corpora(tmp_path_factory) -> dict[tuple[str, str], tuple[Path, CorpusSummary]]:
    """(modality, transfer syntax) -> a one-study real-size corpus of ``REAL_SLICES`` slices per series."""
    root = tmp_path_factory.mktemp("real")
    return {(modality, syntax): (root / modality / syntax, write_corpus(
                folder_writer(root / modality / syntax), 1, 4, "real", transfer_syntax=syntax, slices=REAL_SLICES,
                modality=modality))
            for modality in ("CT", "MR") for syntax in TRANSFER_SYNTAXES}


def decoded_series(study: Path) -> dict[str, tuple[np.ndarray, list]]:
    """scan folder name -> ([D, H, W] pixels from the pipeline's DICOM decoder, the files' datasets)."""
    out = {}
    for folder in sorted(path for path in study.iterdir() if path.is_dir() and path.name != "masks"):
        paths = sorted(folder.glob("*.dcm"))
        decoded = decode_dicom_files([(str(path), path.read_bytes()) for path in paths], str(folder))
        assert not decoded.rejections and len(decoded.volumes) == 1, decoded.rejections
        out[folder.name] = decoded.volumes[0].pixels, [pydicom.dcmread(path, stop_before_pixels=True) for path in paths]
    return out


def test_real_size_writes_what_it_says_and_lossless_syntaxes_decode_to_the_uncompressed_pixels(real_corpora):
    """Each series: one file per slice, ``REAL_SLICES`` of them, at its modality's grid, 16-bit, in the transfer
    syntax asked for; and through ``decode_dicom_files`` RLE, JPEG 2000 and JPEG-LS give the uncompressed
    series' pixels exactly (JPEG-LS by CharLS, the fastest plugin installed). CT shows its fine structure
    (contrast-filled vessels at 180-260 HU)."""
    from hlip_ray.data.decode import JPEGLSLossless, _fastest_plugin

    assert _fastest_plugin(JPEGLSLossless) == "pyjpegls"
    for modality in ("CT", "MR"):
        uncompressed = decoded_series(real_corpora[modality, "explicit"][0] / "study-0000")
        (fewest, most), _, (small, large) = REAL_SIZES[modality]
        assert fewest <= len(uncompressed) <= most
        for syntax, uid in TRANSFER_SYNTAXES.items():
            folder, summary = real_corpora[modality, syntax]
            assert summary.syntaxes == {name: len(uncompressed) * (name == syntax) for name in TRANSFER_SYNTAXES}
            assert json.loads((folder / "corpus.json").read_text())["transfer_syntax"] == syntax
            series = decoded_series(folder / "study-0000")
            assert series.keys() == uncompressed.keys()
            for name, (pixels, datasets) in series.items():
                assert len(datasets) == REAL_SLICES and pixels.shape[0] == REAL_SLICES
                assert {ds.file_meta.TransferSyntaxUID for ds in datasets} == {uid}
                assert {(ds.Modality, ds.Rows, ds.Columns, ds.BitsAllocated) for ds in datasets} == {
                    (modality, pixels.shape[1], pixels.shape[2], 16)}
                assert small <= pixels.shape[2] <= large and pixels.shape[1] == pixels.shape[2]
                np.testing.assert_array_equal(pixels, uncompressed[name][0], err_msg=f"{modality} {syntax} {name}")
        if modality == "CT":
            (folder,) = (path for path in (real_corpora[modality, "explicit"][0] / "study-0000").iterdir()
                         if path.is_dir() and path.name != "masks")
            hounsfield = read_scan(folder)[0]
            assert 0 < np.mean((hounsfield > 150) & (hounsfield < 300)) < 0.005   # vessels: nothing else is there

