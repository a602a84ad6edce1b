"""Gathering across workers for the contrastive loss (``hlip_ray.model.contrastive``).

Every worker computes the same loss on the same global batch: embeddings of all workers are
all-gathered (``gather_global``) so each study's negatives are every other report of the global
batch, whatever the number of workers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


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
