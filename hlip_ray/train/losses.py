"""Contrastive losses over the global batch, and the gathering of embeddings across workers.

Every worker computes the same loss on the same global batch: embeddings of all workers are
all-gathered (``gather_global``) so each study's negatives are every other report of the global
batch, whatever the number of workers. Shapes: ``study, report [G, P]`` L2-normalised, row i of
one matching row i of the other.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
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


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_global(local: torch.Tensor) -> list[torch.Tensor]:
    """All workers' ``[n_r, ...]`` tensors, in rank order, without gradient (one per rank).

    The one gather across workers: embeddings for the loss, data positions, validation's
    embeddings and labels. Workers may hold different numbers of rows ``n_r`` (validation's shares
    of the held-out split); every other dimension must match. The tensor's device must be the
    process group's (CUDA under NCCL).
    """
    _, world_size = world()
    if world_size == 1:
        return [local.detach()]
    rows = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(world_size)]
    dist.all_gather(rows, torch.tensor([len(local)], dtype=torch.long, device=local.device))
    counts = [int(count) for count in rows]
    padded = local.detach()
    if len(padded) < max(counts):
        padded = torch.cat([padded, padded.new_zeros(max(counts) - len(padded), *padded.shape[1:])])
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded.contiguous())
    return [part[:count] for part, count in zip(parts, counts)]


def with_local_leaf(parts: list[torch.Tensor], leaf: torch.Tensor) -> torch.Tensor:
    """``[G, ...]``: the gathered parts with this worker's part replaced by ``leaf`` (which has grad)."""
    rank, _ = world()
    return torch.cat([leaf if index == rank else part for index, part in enumerate(parts)])
