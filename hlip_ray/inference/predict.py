"""``hlip-ray predict``: zero-shot scores of one local study for a list of labels.

A study is a local folder of DICOM series and/or NIfTI files, as a PACS export or a corpus study folder
holds them: its scans are found by ``manifest.build_manifest``'s rules (``study_row``) (each subfolder holding DICOM
files one scan, DICOM files at the top the study folder itself, every ``.nii``/``.nii.gz`` file one scan;
``labels.json`` may give the modality, else the DICOM header does, else MR), decoded by the data plane's
``decode_scan`` and preprocessed by ``preprocess_volume`` at the test-time size (``eval.grid``, else
``data.grid``), keeping up to ``data.max_eval_scans`` volumes in scan-name order, as ``hlip-ray eval``
does. One study needs no Ray: it is decoded in this process. A scan that cannot be used is skipped,
its reason printed (technical facts only: never a patient field or report text).

Prompts come from the zero-shot code of ``hlip-ray eval`` (``zeroshot.py``, through ``eval.templates``):
a label of the vocabulary (``eval.vocabulary``) with its phrases; any other label with the positive phrase
``{label}`` and the negative ``no {label}``, added to the vocabulary for the prompts. When every label
asked for is in the vocabulary, the scores are the ones ``hlip-ray eval`` computes for the study.

A label's ``difference`` is the study's similarity to the label's positive class embedding minus that to
its negative one (the score ``hlip-ray eval`` ranks by); its ``probability`` is the positive side's
share of the two-way softmax at the model's logit scale, ``sigmoid(scale * difference)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from hlip_ray.config import Config
from hlip_ray.data.manifest import study_row
from hlip_ray.storage import Storage, is_s3


@dataclass
class StudyInput:
    """One study as the model takes it: ``pixels`` uint8 ``[K, C, D, H, W]`` and what became of its scans."""

    pixels: np.ndarray
    modality: str
    scans: list[str]                             # the volumes kept: scan name ("<scan> <series>" of a scan of several)
    skipped: list[dict[str, str]] = field(default_factory=list)   # {"scan", "reason", "detail"}


def parse_labels(text: str | None, vocabulary: dict | None) -> list[str]:
    """``"mass, hemorrhage"`` -> ``["mass", "hemorrhage"]`` (each once); none given: every vocabulary label."""
    if text is None:
        if not vocabulary:
            raise ValueError("name the labels to score: --labels 'mass,hemorrhage' (or set eval.vocabulary)")
        return list(vocabulary)
    labels = list(dict.fromkeys(label.strip() for label in text.split(",") if label.strip()))
    if not labels:
        raise ValueError(f"--labels {text!r}: no label in it (a comma-separated list)")
    return labels


def prompt_vocabulary(labels: list[str], vocabulary: dict | None) -> dict[str, dict[str, list[str]]]:
    """The vocabulary the prompts are built from: ``vocabulary`` and, for a label it lacks, ``{label}`` /
    ``no {label}``."""
    out = dict(vocabulary or {})
    for label in labels:
        out.setdefault(label, {"positive": [label], "negative": [f"no {label}"]})
    return out


def read_study(folder: str, config: Config, storage: Storage | None = None,
               log: Callable[[str], None] = print) -> StudyInput:
    """Find, decode and preprocess the scans of the study folder ``folder`` (module docstring).

    Raises ``FileNotFoundError`` for a missing folder, ``ValueError`` when it holds no DICOM or NIfTI file,
    or when none of its scans could be used (each one's reason is logged first).
    """
    from hlip_ray.data.sources import decode_scan, read_scan
    from hlip_ray.data.volume import preprocess_volume, recipe

    if is_s3(folder) or "://" in folder.removeprefix("file://"):
        raise ValueError(f"{folder}: predict reads a local study folder")
    study_dir = os.path.abspath(folder.removeprefix("file://")).rstrip(os.sep)
    if not os.path.isdir(study_dir):
        raise FileNotFoundError(f"{folder}: no such study folder")
    base = storage or Storage()
    row, _ = study_row(os.path.basename(study_dir), study_dir, base.list_files(study_dir), base, salt="predict")
    if row is None:
        raise ValueError(f"{folder}: no DICOM or NIfTI file in the study folder (DICOM files are found by "
                         "name: *.dcm, *.dicom, *.ima, no extension or digits only; NIfTI: *.nii, *.nii.gz)")
    data = config.data
    grid = tuple(config.eval.grid or data.grid)
    volumes, kept, skipped = [], [], []
    for number, scan in enumerate(row.scans, start=1):
        if len(volumes) >= data.max_eval_scans:
            log(f"scans {number}-{len(row.scans)} not read: data.max_eval_scans={data.max_eval_scans} volumes kept")
            break
        log(f"scan {number}/{len(row.scans)} {_relative(scan.uri, study_dir)}: decoding")
        decoded = decode_scan(read_scan(scan, base), row.modality, data.nifti_4d, data.min_slices)
        for rejection in decoded.rejections:
            where = _relative(rejection.uri, study_dir)
            skipped.append({"scan": where, "reason": rejection.reason, "detail": rejection.detail})
            log(f"  skipped {where}: {rejection.reason} ({rejection.detail})")
        notes: dict[str, int] = {}
        for note in decoded.notes:
            notes[note.reason] = notes.get(note.reason, 0) + 1
        if notes:
            log("  files left out: " + ", ".join(f"{count} {reason}" for reason, count in sorted(notes.items())))
        for volume in decoded.volumes[: data.max_eval_scans - len(volumes)]:
            volumes.append(preprocess_volume(volume, grid, **recipe(data)))
            several = len(decoded.volumes) > 1
            kept.append(f"{scan.name} {volume.series}" if several and volume.series else scan.name)
    if not volumes:
        raise ValueError(f"{folder}: no readable scan in the study folder ({len(row.scans)} found, every one "
                         "skipped: reasons above)")
    return StudyInput(np.stack(volumes), row.modality, kept, skipped)


def _relative(uri: str, study_dir: str) -> str:
    """A scan's path within the study folder (the folder's own name for the folder itself)."""
    if not uri.startswith(study_dir):
        return uri
    relative = os.path.relpath(uri, study_dir)
    return os.path.basename(study_dir) if relative == "." else relative


@torch.no_grad()
def label_classes(model, labels: list[str], vocabulary: dict | None, tokenizer, context_length: int,
                  templates) -> dict[str, torch.Tensor]:
    """``label -> [2, P]`` class embeddings of the labels asked (``zeroshot.class_embeddings`` over
    ``prompt_vocabulary``)."""
    from hlip_ray.eval.zeroshot import class_embeddings

    if model.text is None:
        raise ValueError("the model has no text tower (an HLIP model file without text.* weights): zero-shot "
                         "prompts need one")
    classes = class_embeddings(model, tokenizer, prompt_vocabulary(labels, vocabulary), context_length, templates)
    return {label: classes[label] for label in labels}


def _model_input(model, study: StudyInput) -> tuple[torch.Tensor, torch.Tensor]:
    """``pixels [1, K, C, D, H, W]`` and ``scan_mask [1, K]`` of the study, on the model's device."""
    device = next(model.parameters()).device
    pixels = torch.from_numpy(study.pixels)[None].to(device)
    return pixels, torch.ones(pixels.shape[:2], dtype=torch.bool, device=device)


@torch.no_grad()
def zero_shot_scores(model, study: StudyInput, classes: dict[str, torch.Tensor],
                     vocabulary: dict | None) -> dict[str, dict]:
    """``label -> {"probability", "difference", "prompts"}`` of the study for each label of ``classes``
    (``label_classes``; module docstring); ``prompts`` is ``vocabulary`` or ``default`` (``{label}`` /
    ``no {label}``)."""
    from hlip_ray.eval.zeroshot import zeroshot_scores

    embedding = model.encode_study(*_model_input(model, study)).float()
    differences = zeroshot_scores(embedding, classes)
    scale = float(model.scale())
    return {label: {"probability": float(torch.sigmoid(torch.tensor(scale * float(differences[label][0])))),
                    "difference": float(differences[label][0]),
                    "prompts": "vocabulary" if label in (vocabulary or {}) else "default"}
            for label in classes}


def relevance_figures(model, study: StudyInput, classes: dict[str, torch.Tensor], out_dir: str,
                      study_id: str) -> list:
    """The study's relevance figure for each label of ``classes`` in ``out_dir`` (``relevance.py``)."""
    from hlip_ray.eval import relevance

    return relevance.relevance_figures(model, *_model_input(model, study), classes, out_dir, [study_id])


def score_table(scores: dict[str, dict]) -> str:
    """The scores as an aligned text table, one label a row, in the order asked."""
    width = max(len("label"), *(len(label) for label in scores))
    lines = [f"{'label':<{width}}  probability  difference  prompts"]
    for label, score in scores.items():
        prompts = "vocabulary" if score["prompts"] == "vocabulary" else f'"{label}" vs "no {label}"'
        lines.append(f"{label:<{width}}  {score['probability']:>11.3f}  {score['difference']:>+10.4f}  {prompts}")
    return "\n".join(lines)


def predict_study(folder: str, checkpoint: str, config: Config, storage: Storage, labels: str | None = None,
                  interpret: str | None = None) -> dict:
    """``hlip-ray predict``: the study in ``folder`` decoded, the model of ``checkpoint`` loaded on
    ``eval.device``, the labels of ``labels`` (comma-separated; every vocabulary label when None) scored and,
    with ``interpret`` (a folder or s3:// prefix), each label's relevance map written there. Returns the
    study, checkpoint, modality, input shape, grid, scans used and skipped, scores and the maps written."""
    import tempfile

    from hlip_ray.eval.placement import local_device
    from hlip_ray.eval.zeroshot import load_vocabulary
    from hlip_ray.inference.trained_model import load_model
    from hlip_ray.storage import join
    from hlip_ray.text_source import load_tokenizer

    device = local_device(config)   # eval.device=cuda without CUDA fails here, before any decoding
    vocabulary = None
    if config.eval.vocabulary:
        vocabulary = load_vocabulary(storage.read_bytes(config.eval.vocabulary), config.eval.vocabulary)
    asked = parse_labels(labels, vocabulary)
    study = read_study(folder, config, storage)
    model, _ = load_model(checkpoint, storage, config)
    model = model.to(device).eval()
    classes = label_classes(model, asked, vocabulary, load_tokenizer(config.model.text.name_or_path),
                            config.model.text.context_length, config.eval.templates)
    scores = zero_shot_scores(model, study, classes, vocabulary)
    written = []
    if interpret:
        with tempfile.TemporaryDirectory() as scratch:   # drawn here, then written where ``interpret`` says
            study_id = os.path.basename(os.path.normpath(folder))
            for path in relevance_figures(model, study, classes, scratch, study_id):
                written.append(join(interpret, path.name))
                storage.write_bytes(written[-1], path.read_bytes())
    return {"study": folder, "checkpoint": checkpoint, "modality": study.modality,
            "input_shape": list(study.pixels.shape), "grid": list(config.eval.grid or config.data.grid),
            "scans": study.scans, "skipped": study.skipped, "scores": scores, "relevance_maps": written}


def predict_lines(result: dict) -> list[str]:
    """``predict_study``'s result as a person reads it: the score table, and where the maps went."""
    lines = [score_table(result["scores"])]
    if result["relevance_maps"]:
        lines.append(f"relevance maps: {', '.join(result['relevance_maps'])}")
    return lines

