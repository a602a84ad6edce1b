"""The contrastive losses of a study batch against its reports: CLIP's InfoNCE and SigLIP's sigmoid loss.

Shapes: ``study, report [G, P]`` L2-normalised, row i of one matching row i of the other. Training
computes them over the global batch (embeddings gathered from every worker); validation over the
held-out split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(study: torch.Tensor, report: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """InfoNCE both ways (CLIP): mean over the batch of cross-entropy study->report and report->study.

    ``logit_scale`` is the multiplier itself (exp of the learnt log-scale), a scalar tensor.
    """
    logits = logit_scale * study @ report.T  # [G, G]
    targets = torch.arange(len(study), device=study.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def siglip_loss(
    study: torch.Tensor, report: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    """Sigmoid loss (SigLIP): every (study, report) pair is a binary match / no-match decision.

    ``-sum_ij log sigmoid(z_ij * (scale * <s_i, r_j> + bias)) / G`` with ``z_ii = 1``, ``z_ij = -1``.
    """
    logits = logit_scale * study @ report.T + logit_bias
    signs = 2 * torch.eye(len(study), device=study.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(signs * logits).sum() / len(study)


def contrastive_loss(
    kind: str,
    study: torch.Tensor,
    report: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``kind`` is ``clip`` or ``siglip`` (``model.loss``); computed in float32."""
    study, report, logit_scale = study.float(), report.float(), logit_scale.float()
    if kind == "clip":
        return clip_loss(study, report, logit_scale)
    if kind == "siglip":
        if logit_bias is None:
            raise ValueError("the siglip loss needs a logit bias")
        return siglip_loss(study, report, logit_scale, logit_bias.float())
    raise ValueError(f"unknown loss {kind!r}: use clip or siglip")
