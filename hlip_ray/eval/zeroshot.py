"""Zero-shot classification of studies from a label vocabulary, scored by ROC AUC.

A vocabulary maps each label to the phrases a report uses for it (``vocabulary.json`` of the
synthetic corpus; write one for a real label set)::

    {"hemorrhage": {"positive": ["acute intraparenchymal hemorrhage", ...],
                    "negative": ["no evidence of intracranial hemorrhage", ...]}, ...}

A label's prompts are short reports, as the text tower saw in training: a sentence of one of the
label's phrases, then one sentence for every other label, all of them negative in one prompt and all
positive in its twin. The other labels are so balanced between the label's positive and negative
prompts, and the difference of the two sides is the label's own direction: a lone phrase
("An acute ischemic stroke.") also lies along the findings it shares words and meaning with (a
hemorrhage), and scores them as the label. The label's own sentence is written through each template
(``eval.templates``, ``{finding}`` standing for the phrase; the default ``{finding}.`` is the bare phrase
as a sentence), and every template gives its own prompts. The prompts of each side are averaged into a
class embedding, and a study's score for the label is the difference of its similarity to the two (the
logit of the two-way softmax up to the temperature). AUC is computed per label over the studies
that carry the label; the macro AUC is their mean.

The pieces here are used by ``held_out.evaluate``, the one evaluation path.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_TEMPLATES = ("{finding}.",)
"""The label's phrase as a sentence of its own: the prompts of ``prompt``."""


def load_vocabulary(data: bytes | str, where: str = "vocabulary") -> dict[str, dict[str, list[str]]]:
    """Parse and check a vocabulary (JSON text); errors name ``where`` and the label."""
    try:
        vocabulary = json.loads(data)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON: {error}") from None
    if not isinstance(vocabulary, dict) or not vocabulary:
        raise ValueError(f"{where}: expected a non-empty mapping of label -> {{positive, negative}}")
    for label, phrases in vocabulary.items():
        for side in ("positive", "negative"):
            values = phrases.get(side) if isinstance(phrases, dict) else None
            if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
                raise ValueError(f"{where}: label {label!r} needs a non-empty list of {side} phrases")
    return vocabulary


def prompt(phrase: str, template: str = DEFAULT_TEMPLATES[0]) -> str:
    """A phrase as a report sentence through ``template`` (``{finding}`` stands for the phrase, its final
    period dropped), first letter capitalised: ``no acute infarct`` -> ``No acute infarct.``;
    with ``This study shows: {finding}.`` -> ``This study shows: no acute infarct.``"""
    sentence = template.replace("{finding}", phrase.strip().rstrip("."))
    return sentence[:1].upper() + sentence[1:]


def label_prompts(vocabulary: dict, label: str, side: str,
                  templates: Sequence[str] = DEFAULT_TEMPLATES) -> list[str]:
    """The report-like prompts of one side (``positive`` or ``negative``) of ``label`` (module docstring):
    ``2 * len(templates) * len(phrases)`` of them."""
    others = [other for other in vocabulary if other != label]
    prompts = []
    for template in templates:
        for index, phrase in enumerate(vocabulary[label][side]):
            for others_side in ("negative", "positive"):
                sentences = [prompt(phrase, template)] + [
                    prompt(vocabulary[other][others_side][index % len(vocabulary[other][others_side])])
                    for other in others
                ]
                prompts.append(" ".join(sentences))
    return prompts


@torch.no_grad()
def class_embeddings(model, tokenizer, vocabulary: dict, context_length: int,
                     templates: Sequence[str] = DEFAULT_TEMPLATES) -> dict[str, torch.Tensor]:
    """``label -> [2, P]``: the normalised mean embedding of its negative (row 0) and positive (row 1) prompts
    (``label_prompts`` through ``templates``)."""
    device = next(model.parameters()).device   # the prompts go where the model is (a GPU worker's validation)
    out = {}
    for label in vocabulary:
        rows = []
        for side in ("negative", "positive"):
            tokens = tokenizer(label_prompts(vocabulary, label, side, templates), padding="max_length", truncation=True,
                               max_length=context_length, return_tensors="pt")
            embeddings = model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device)).float()
            rows.append(F.normalize(embeddings.mean(dim=0), dim=-1))
        out[label] = torch.stack(rows)
    return out


def zeroshot_scores(study_embeddings: torch.Tensor, classes: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """``study_embeddings [N, P]`` -> label -> ``[N]`` scores (higher: more likely positive)."""
    studies = study_embeddings.float()
    scores = {}
    for label, pair in classes.items():
        similarity = studies @ pair.to(studies.device).T  # [N, 2]
        scores[label] = (similarity[:, 1] - similarity[:, 0]).float().cpu().numpy()
    return scores


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve (scikit-learn's); NaN when one class is absent."""
    from sklearn.metrics import roc_auc_score  # here: scikit-learn's import takes seconds

    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        return float("nan")
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


def auc_report(scores: dict[str, np.ndarray], labels: Sequence[dict[str, int]]) -> dict:
    """``{"macro_auc", "per_label": {label: auc}, "studies"}`` over the studies labelled for each label.

    Labels absent from a study's label map are left out for that label; a label whose studies
    are all of one class gets NaN and stays out of the macro mean.
    """
    per_label = {}
    for label, values in scores.items():
        keep = [i for i, study in enumerate(labels) if label in study]
        per_label[label] = roc_auc(values[keep], [labels[i][label] for i in keep])
    finite = [auc for auc in per_label.values() if np.isfinite(auc)]
    return {"macro_auc": float(np.mean(finite)) if finite else float("nan"), "per_label": per_label,
            "studies": len(labels)}


def mean_intensity(pixels: torch.Tensor, scan_mask: torch.Tensor) -> torch.Tensor:
    """The baseline score: each study's mean voxel value over its real scans. ``[B, K, C, D, H, W]`` -> ``[B]``."""
    per_scan = pixels.float().flatten(2).mean(dim=2)  # [B, K]
    mask = scan_mask.float()
    return (per_scan * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


@torch.no_grad()
def label_matrix(labels: Sequence[dict[str, int]], names: Sequence[str]) -> torch.Tensor:
    """Studies' label maps as ``[N, len(names)]`` int8: the label's value, or -1 where a study lacks it."""
    return torch.tensor([[study.get(name, -1) for name in names] for study in labels],
                        dtype=torch.int8).reshape(len(labels), len(names))


def label_dicts(matrix: torch.Tensor, names: Sequence[str]) -> list[dict[str, int]]:
    """The inverse of ``label_matrix``."""
    return [{name: int(value) for name, value in zip(names, row) if value >= 0} for row in matrix.tolist()]
