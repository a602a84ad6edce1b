"""Fixed sin-cos position embeddings, as HLIP builds them, and their resampling.

A study token's position is the sum of a 3D sin-cos embedding over its scan's token grid
``(d, h, w)`` and a 1D sin-cos embedding over scan slots (which scan of the study it is).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``[M]`` positions -> ``[M, dim]``: sines of all frequencies, then cosines."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_3d(dim: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """``[1, d, h, w, dim]``: a third of the channels each for width, height and depth (in that order)."""
    if dim % 6:
        raise ValueError(f"3D sin-cos embedding needs a width divisible by 6, got {dim}")
    depth, height, width = grid
    zz, yy, xx = torch.meshgrid(
        torch.arange(depth), torch.arange(height), torch.arange(width), indexing="ij"
    )
    part = dim // 3
    embedding = torch.cat(
        [sincos_1d(part, xx.reshape(-1)), sincos_1d(part, yy.reshape(-1)), sincos_1d(part, zz.reshape(-1))],
        dim=1,
    )
    return embedding.reshape(1, depth, height, width, dim)


def resample_spatial(pos_embed: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Trilinear resampling of ``[1, d, h, w, C]`` to a new token grid (identity when equal)."""
    if tuple(pos_embed.shape[1:4]) == tuple(grid):
        return pos_embed.float()
    channels_first = pos_embed.float().permute(0, 4, 1, 2, 3)
    resampled = F.interpolate(channels_first, size=tuple(grid), mode="trilinear")
    return resampled.permute(0, 2, 3, 4, 1)


def resample_slots(slot_embed: torch.Tensor, count: int) -> torch.Tensor:
    """Linear resampling of ``[1, S, C]`` slot embeddings to ``count`` slots (more scans than slots)."""
    resampled = F.interpolate(slot_embed.float().permute(0, 2, 1), size=count, mode="linear")
    return resampled.permute(0, 2, 1)


def spatial_from_2d(pos_embed_2d: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """A 2D ViT's ``[1, h0*w0, C]`` position embedding (no prefix rows) -> ``[1, d, h, w, C]``.

    The 2D embedding is resampled bicubically to ``(h, w)`` and a 1D sin-cos over depth added,
    which is how HLIP inflates an MAE ViT.
    """
    tokens = pos_embed_2d.shape[1]
    side = int(round(tokens**0.5))
    if side * side != tokens:
        raise ValueError(f"2D position embedding with {tokens} rows is not a square grid")
    channels = pos_embed_2d.shape[2]
    planar = pos_embed_2d.float().reshape(1, side, side, channels).permute(0, 3, 1, 2)
    depth, height, width = grid
    if (side, side) != (height, width):
        planar = F.interpolate(planar, size=(height, width), mode="bicubic", antialias=True)
    planar = planar.permute(0, 2, 3, 1)  # [1, h, w, C]
    depth_embed = sincos_1d(channels, torch.arange(depth))  # [d, C]
    return depth_embed[None, :, None, None, :] + planar[:, None]
