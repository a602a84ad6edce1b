"""The one evaluation path: a model on held-out studies and their reports (and labels, where there are).

- **Contrastive loss** over the whole held-out set: the model's own loss (CLIP's InfoNCE or SigLIP's,
  at its logit scale), every other report of the set a negative.
- **Retrieval**, study -> report and report -> study: the share of queries whose own match ranks in
  the top 1, 5 or 10 of the set (scikit-learn's ``top_k_accuracy_score``), and the mean of the two ways.
- **Zero-shot classification** (``zeroshot.py``), when a label vocabulary is given and studies carry
  labels: per-label and macro ROC AUC, beside the mean-intensity baseline.

So a corpus of studies and reports without a label anywhere is validated too (loss and retrieval).
``evaluate`` is ``encode`` then ``summarize``: ``hlip-ray eval`` (``evaluate.py``) calls the two in one process
(keeping the embeddings for its further figures, ``metrics.py``); validation during training calls
``evaluate`` on every worker,
each encoding a share of the batches, with the trainer's gather bringing the parts together so that
every worker returns the same report.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hlip_ray.eval.zeroshot import (
    DEFAULT_TEMPLATES,
    auc_report,
    class_embeddings,
    label_dicts,
    label_matrix,
    mean_intensity,
    zeroshot_scores,
)
from hlip_ray.model.contrastive import contrastive_loss

RECALL_AT = (1, 5, 10)


@dataclass
class Encoded:
    """A held-out set as the model sees it, row ``i`` of each tensor one study (on the CPU)."""

    study: torch.Tensor
    """``[N, P]`` study embeddings."""
    report: torch.Tensor
    """``[N, P]`` embeddings of the studies' own reports."""
    intensity: torch.Tensor
    """``[N]`` mean intensity (the baseline's score)."""
    labels: torch.Tensor
    """``[N, L]`` int8: label ``l`` of the vocabulary's order, -1 where a study lacks it."""


def evaluate(model, batches: Iterable[dict], *, vocabulary: dict | None = None, tokenizer=None,
             context_length: int = 128, templates: Sequence[str] = DEFAULT_TEMPLATES, share: tuple[int, int] = (0, 1),
             gather: Callable[[torch.Tensor], list[torch.Tensor]] | None = None) -> dict:
    """``{"studies", "loss", "retrieval": {...}}`` of ``model`` on the studies of ``batches``, and with a
    ``vocabulary`` also ``"macro_auc", "per_label", "baseline"`` (prompts through ``templates``).

    ``batches``: collated study batches (``pixels [B, K, C, D, H, W]``, ``scan_mask [B, K]``,
    ``input_ids``, ``attention_mask``, ``labels``). Under data parallelism every worker passes the whole
    stream with ``share=(rank, world_size)`` and encodes every ``world_size``-th batch; ``gather`` (all
    workers' ``[n_r, ...]`` tensors in rank order) brings the parts together. The caller sets the
    model's mode (``eval()``).
    """
    names = list(vocabulary or {})
    encoded = encode(model, batches, names, share=share, gather=gather)
    classes = None
    if vocabulary and (encoded.labels >= 0).any():
        classes = class_embeddings(model, tokenizer, vocabulary, context_length, templates)
    return summarize(model, encoded, names, classes)


def encode(model, batches: Iterable[dict], names: Sequence[str], *, share: tuple[int, int] = (0, 1),
           gather: Callable[[torch.Tensor], list[torch.Tensor]] | None = None) -> Encoded:
    """The studies of ``batches`` (``evaluate``'s arguments) encoded, with labels ``names`` read off."""
    rank, world_size = share
    device = next(model.parameters()).device
    width = model.visual_proj.out_features
    parts: dict[str, list[torch.Tensor]] = {
        "study": [torch.zeros(0, width, device=device)], "report": [torch.zeros(0, width, device=device)],
        "intensity": [torch.zeros(0, device=device)],
        "labels": [torch.zeros(0, len(names), dtype=torch.int8, device=device)]}
    with torch.no_grad():
        for index, batch in enumerate(batches):
            if index % world_size != rank:
                continue
            pixels, scan_mask = batch["pixels"].to(device), batch["scan_mask"].to(device)
            parts["study"].append(model.encode_study(pixels, scan_mask).float())
            parts["report"].append(model.encode_text(batch["input_ids"].to(device),
                                                     batch["attention_mask"].to(device)).float())
            parts["intensity"].append(mean_intensity(pixels, scan_mask))
            parts["labels"].append(label_matrix(batch["labels"], names).to(device))
    joined = {key: torch.cat(values) for key, values in parts.items()}
    if gather is not None:
        joined = {key: torch.cat(gather(value)) for key, value in joined.items()}
    return Encoded(**{key: value.cpu() for key, value in joined.items()})


def summarize(model, encoded: Encoded, names: Sequence[str], classes: dict[str, torch.Tensor] | None) -> dict:
    """``evaluate``'s report of an encoded set; ``classes``: the vocabulary's class embeddings
    (``zeroshot.class_embeddings``), None without a vocabulary or without a labelled study."""
    study, report = encoded.study, encoded.report
    out: dict = {"studies": len(study), "loss": float("nan"), "retrieval": {}}
    if len(study) > 2:   # a smaller set ranks nothing
        with torch.no_grad():
            bias = model.bias()
            out["loss"] = float(contrastive_loss(model.loss_type, study, report, model.scale().cpu(),
                                                 None if bias is None else bias.cpu()))
        out["retrieval"] = retrieval_report(study, report)
    if names:
        out.update(_zeroshot(encoded, names, classes))
    return out


def retrieval_report(study: torch.Tensor, report: torch.Tensor, ks: tuple[int, ...] = RECALL_AT) -> dict[str, float]:
    """Recall at k both ways over the set (row i of ``study`` matches row i of ``report``), and their mean:
    ``{"study_to_report_r@1": ..., "report_to_study_r@1": ..., "r@1": ..., ...}``. A k of the set's
    size or more is left out (every query would count)."""
    from sklearn.metrics import top_k_accuracy_score

    similarity = (study @ report.T).numpy()
    count = len(similarity)
    truth = np.arange(count)
    out: dict[str, float] = {}
    for k in ks:
        if k >= count:
            continue
        ways = [top_k_accuracy_score(truth, scores, k=k, labels=truth) for scores in (similarity, similarity.T)]
        out[f"study_to_report_r@{k}"], out[f"report_to_study_r@{k}"] = (float(way) for way in ways)
        out[f"r@{k}"] = float(sum(ways) / 2)
    return out


def _zeroshot(encoded: Encoded, names: Sequence[str], classes: dict[str, torch.Tensor] | None) -> dict:
    studies = label_dicts(encoded.labels, names)
    if classes is None:
        nothing = {"macro_auc": math.nan, "per_label": {}, "studies": len(studies)}
        return {"macro_auc": math.nan, "per_label": {}, "baseline": nothing}
    out = auc_report(zeroshot_scores(encoded.study, classes), studies)
    out["baseline"] = auc_report({name: encoded.intensity.numpy() for name in names}, studies)
    out.pop("studies", None)
    return out
