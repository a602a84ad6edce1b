"""The hierarchical-attention ViT over whole radiology studies (HLIP's visual encoder).

A study is ``K`` 3D scans, some of them padding. Only real scans are embedded; each block
attends within a slice group, a scan, or the whole study (see ``hierarchy.py``), and the
study's CLS token after the last block is its feature (``pooling="cls"``), or that token beside the
mean of the study's patch tokens (``pooling="cls_patch_mean"``, DINO.txt's pooling, which HLIP's
authors report improved their results since the 2025 paper).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.models.vision_transformer import Block

from hlip_ray.model import randomness
from hlip_ray.model.hierarchy import PackedSequences, TokenGroups
from hlip_ray.model.pos_embed import resample_slots, resample_spatial, sincos_1d, sincos_3d

LayerNorm = partial(nn.LayerNorm, eps=1e-6)
POOLINGS = ("cls", "cls_patch_mean")


def flash_varlen_kernel(q, k, v, cu_seqlens, max_seqlen, softmax_scale):
    """flash-attn's varlen kernel over packed ``[T, H, Dh]`` sequences (the ``gpu`` extra)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as error:  # pragma: no cover - only with the gpu extra
        raise ImportError(
            "model.attention_backend=flash_varlen needs flash-attn: pip install 'hlip-ray[gpu]'"
        ) from error
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=softmax_scale
    )


def _attention(attn: nn.Module, x: torch.Tensor, packed: PackedSequences, backend: str) -> torch.Tensor:
    """Self-attention of timm ``Attention`` within each packed sequence: ``[T, E] -> [T, E]``.

    The projections run once over all tokens, whatever the number of sequence lengths: every
    submodule is called once per block, as ZeRO-3 needs (it gathers a module's parameters on
    each call, and the workers' calls must match one for one).
    """
    tokens, width = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).view(tokens, 3, heads, width // heads)
    q, k, v = qkv.unbind(1)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if backend == "sdpa":
        dropout = attn.attn_drop.p if attn.training else 0.0
        outputs = []
        for first, count, length in packed.buckets:
            span = slice(first, first + count * length)
            q_b, k_b, v_b = (t[span].view(count, length, heads, -1).transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q_b, k_b, v_b, dropout_p=dropout, scale=attn.scale)
            outputs.append(out.transpose(1, 2).reshape(count * length, heads, -1))
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
    else:
        out = flash_varlen_kernel(q, k, v, packed.cu_seqlens, packed.max_seqlen, attn.scale)
    return attn.proj_drop(attn.proj(attn.norm(out.reshape(tokens, width))))


def _block_forward(
    block: Block,
    x: torch.Tensor,
    packed: PackedSequences,
    backend: str,
    keep_attn: torch.Tensor | None,
    keep_mlp: torch.Tensor | None,
) -> torch.Tensor:
    """A timm ``Block`` over a packed sequence; ``keep_*`` ``[T, 1]`` are drop-path scales."""
    update = block.ls1(_attention(block.attn, block.norm1(x), packed, backend))
    x = x + (update if keep_attn is None else update * keep_attn)
    update = block.ls2(block.mlp(block.norm2(x)))
    return x + (update if keep_mlp is None else update * keep_mlp)


class StudyEncoder(nn.Module):
    """Hierarchical ViT: ``pixels [B, K, C, D, H, W]``, ``scan_mask [B, K]`` -> ``[B, E]``.

    Args:
        grid: the input size ``(D, H, W)`` the position embedding is built for; other sizes are
            accepted and the embedding resampled trilinearly.
        patch_size: ``(pd, ph, pw)``.
        attention_levels: ``slice``, ``scan`` or ``study`` for each block.
        max_scan_slots: rows of the 1D scan-slot embedding (HLIP: 40); 1 means none
            (single-scan models).
        pixel_mean, pixel_std: per channel, in the [0, 1] scale (uint8 / 255).
        patch_dropout: fraction of each slice group's (or scan's) tokens dropped in training.
        drop_path: per-study stochastic depth rate, the same at every block.
        attention_backend: ``sdpa`` (dense buckets) or ``flash_varlen`` (flash-attn).
        pooling: ``cls``: the study's CLS token, ``[B, E]``. ``cls_patch_mean``: the CLS token and the
            mean of the study's patch tokens (every real scan's, after the final norm) concatenated,
            then a LayerNorm (``fc_norm``): ``[B, 2E]``. ``feature_dim`` says which.
    """

    num_prefix_tokens = 1

    def __init__(
        self,
        *,
        grid: Sequence[int],
        patch_size: Sequence[int],
        attention_levels: Sequence[str],
        in_channels: int = 1,
        embed_dim: int = 768,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        max_scan_slots: int = 40,
        pixel_mean: Sequence[float] = (0.5,),
        pixel_std: Sequence[float] = (0.5,),
        patch_dropout: float = 0.0,
        drop_path: float = 0.0,
        grad_checkpointing: bool = False,
        attention_backend: str = "sdpa",
        pooling: str = "cls",
    ) -> None:
        super().__init__()
        self.patch_size = tuple(int(p) for p in patch_size)
        self.token_grid = tuple(int(g) // p for g, p in zip(grid, self.patch_size))
        self.attention_levels = tuple(attention_levels)
        self.embed_dim = embed_dim
        self.in_channels = in_channels
        self.patch_dropout = patch_dropout
        self.drop_path = drop_path
        self.grad_checkpointing = grad_checkpointing
        self.attention_backend = attention_backend
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.pooling = pooling
        self.feature_dim = embed_dim * (2 if pooling == "cls_patch_mean" else 1)

        self.patch_embed = nn.Conv3d(in_channels, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("spatial_pos_embed", sincos_3d(embed_dim, self.token_grid))
        if max_scan_slots > 1:
            slots = sincos_1d(embed_dim, torch.arange(max_scan_slots))[None]
            self.register_buffer("slot_pos_embed", slots)
        else:
            self.slot_pos_embed = None
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
            for _ in self.attention_levels
        )
        self.norm = LayerNorm(embed_dim)
        self.fc_norm = LayerNorm(self.feature_dim) if pooling == "cls_patch_mean" else None
        mean = torch.tensor(_per_channel(pixel_mean, in_channels, "pixel_mean"))
        std = torch.tensor(_per_channel(pixel_std, in_channels, "pixel_std"))
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """Xavier-uniform linear layers, as MAE and timm's "jax" ViT init: from scratch, small models fit far
        sooner than with trunc_normal(0.02)."""
        nn.init.normal_(self.cls_token, std=1e-6)
        weight = self.patch_embed.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------------------------
    def normalize_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 -> [0, 1]; then ``(x - mean) / std`` per channel. ``[S, C, D, H, W]``."""
        x = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
        shape = (1, -1, 1, 1, 1)
        x = (x - self.pixel_mean.float().view(shape)) / self.pixel_std.float().view(shape)
        return x.to(self.patch_embed.weight.dtype)

    def _slot_embedding(self, scans_per_study: list[int], study_seeds: list[int] | None) -> torch.Tensor:
        """``[S, E]`` the scan-slot embedding of each real scan.

        Training: a random subset of slots per study, without repeats. Evaluation: the first
        n slots in scan order (interpolated when a study has more scans than slots).
        """
        table = self.slot_pos_embed[0]
        slots = table.shape[0]
        rows = []
        for study, count in enumerate(scans_per_study):
            if study_seeds is not None:
                if count > slots:
                    raise ValueError(f"a training study has {count} scans; the model has {slots} scan slots")
                gen = randomness.generator(study_seeds[study], randomness.SLOTS)
                rows.append(table[torch.randperm(slots, generator=gen)[:count].to(table.device)])
            elif count > slots:
                rows.append(resample_slots(self.slot_pos_embed, count)[0])
            else:
                rows.append(table[:count])
        return torch.cat(rows, dim=0).float()

    def _patch_dropout_index(
        self, scans_per_study: list[int], units: int, unit_tokens: int, keep: int, study_seeds: list[int]
    ) -> torch.Tensor:
        """``[S, U, keep]`` indices of the tokens each unit keeps, drawn per study."""
        index = []
        for study, count in enumerate(scans_per_study):
            gen = randomness.generator(study_seeds[study], randomness.PATCH_DROPOUT)
            scores = torch.rand(count * units, unit_tokens, generator=gen)
            index.append(scores.argsort(dim=1)[:, :keep].sort(dim=1).values.view(count, units, keep))
        return torch.cat(index, dim=0)

    def _drop_path_scales(self, study_seeds: list[int], device: torch.device) -> torch.Tensor:
        """``[depth, 2, B]``: 0 or 1/(1-p) per study, for each block's attention and MLP branch."""
        keep_prob = 1.0 - self.drop_path
        draws = torch.tensor(
            [
                [torch.rand(2, generator=randomness.generator(seed, randomness.DROP_PATH, block)).tolist()
                 for seed in study_seeds]
                for block in range(len(self.blocks))
            ]
        ).permute(0, 2, 1)
        return ((draws < keep_prob).float() / keep_prob).to(device)

    # ------------------------------------------------------------------------------------
    def forward(
        self,
        pixels: torch.Tensor,
        scan_mask: torch.Tensor,
        study_seeds: torch.Tensor | Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Study features ``[B, feature_dim]``: the study-level CLS token after the last block, normed
        (and with ``cls_patch_mean`` pooling the mean of its patch tokens beside it).

        Args:
            pixels: ``[B, K, C, D, H, W]`` uint8 or float.
            scan_mask: ``[B, K]`` bool, true for a real scan. Padded scans are never computed.
            study_seeds: ``[B]`` integers keying each study's random draws in training (slot
                sampling, patch dropout, drop-path); drawn from torch's RNG when omitted.
        """
        tokens = self.forward_tokens(pixels, scan_mask, study_seeds)
        study_tokens = tokens.groups.regroup(tokens.packed, tokens.level, "study")
        if self.fc_norm is None:
            prefix, _ = tokens.groups.unpack(study_tokens, "study")
            return self.norm(prefix[:, 0])
        groups = tokens.groups
        prefix, body = groups.unpack(self.norm(study_tokens), "study")
        per_scan = body.view(groups.num_scans, -1, body.shape[-1]).mean(dim=1)   # scans hold equal token counts
        sums = per_scan.new_zeros(groups.num_studies, per_scan.shape[-1]).index_add(0, groups.scan_study, per_scan)
        patch_mean = sums / groups.scans_per_study.clamp(min=1)[:, None].to(sums.dtype)
        return self.fc_norm(torch.cat([prefix[:, 0], patch_mean], dim=-1))

    def forward_tokens(
        self,
        pixels: torch.Tensor,
        scan_mask: torch.Tensor,
        study_seeds: torch.Tensor | Sequence[int] | None = None,
        num_blocks: int | None = None,
    ) -> EncodedTokens:
        """Run the first ``num_blocks`` blocks (all by default) and return the tokens as they are."""
        if pixels.dim() != 6:
            raise ValueError(f"pixels must be [B, K, C, D, H, W], got shape {tuple(pixels.shape)}")
        batch, scans_max = pixels.shape[:2]
        if scan_mask.shape != (batch, scans_max):
            raise ValueError(
                f"scan_mask shape {tuple(scan_mask.shape)} does not match pixels {tuple(pixels.shape[:2])}"
            )
        scan_mask = scan_mask.to(device=pixels.device, dtype=torch.bool)
        scans_per_study = scan_mask.sum(dim=1).tolist()
        if min(scans_per_study) == 0:
            empty = [row for row, count in enumerate(scans_per_study) if count == 0]
            raise ValueError(f"studies at batch rows {empty} have no real scan (scan_mask all false)")
        seeds = None
        if self.training:
            if study_seeds is None:
                study_seeds = torch.randint(0, 2**62, (batch,))
            seeds = [int(seed) for seed in study_seeds]

        real = pixels[scan_mask]  # [S, C, D, H, W], only real scans from here on
        tokens = self.patch_embed(self.normalize_pixels(real))  # [S, E, d, h, w]
        tokens = tokens.permute(0, 2, 3, 4, 1)  # [S, d, h, w, E]
        num_scans, depth, height, width, embed = tokens.shape
        pos = resample_spatial(self.spatial_pos_embed, (depth, height, width))
        if self.slot_pos_embed is not None:
            slot = self._slot_embedding(scans_per_study, seeds)
            pos = pos + slot[:, None, None, None, :]
        tokens = tokens + pos.to(tokens.dtype)

        units = depth if "slice" in self.attention_levels else 1
        unit_tokens = depth * height * width // units
        body = tokens.reshape(num_scans, units, unit_tokens, embed)
        if self.training and self.patch_dropout > 0:
            keep = max(1, int(unit_tokens * (1.0 - self.patch_dropout)))
            index = self._patch_dropout_index(scans_per_study, units, unit_tokens, keep, seeds)
            index = index.to(body.device)[..., None].expand(-1, -1, -1, embed)
            body = body.gather(2, index)
            unit_tokens = keep
        scan_study = torch.repeat_interleave(
            torch.arange(batch, device=pixels.device), torch.as_tensor(scans_per_study, device=pixels.device)
        )
        groups = TokenGroups(scan_study, batch, units, unit_tokens, self.num_prefix_tokens)

        drop_path = None
        if self.training and self.drop_path > 0:
            drop_path = self._drop_path_scales(seeds, body.device).to(body.dtype)

        level = self.attention_levels[0]
        prefix = self.cls_token.to(body.dtype).expand(groups.num_groups(level), -1, -1)
        x = groups.pack(prefix, body.reshape(-1, embed), level)
        blocks = list(zip(self.blocks, self.attention_levels))[:num_blocks]
        for index, (block, block_level) in enumerate(blocks):
            x = groups.regroup(x, level, block_level)
            level = block_level
            keep_attn = keep_mlp = None
            if drop_path is not None:
                token_study = groups.token_study(level)
                keep_attn = drop_path[index, 0][token_study][:, None]
                keep_mlp = drop_path[index, 1][token_study][:, None]
            packed = groups.packed(level)
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(
                    _block_forward, block, x, packed, self.attention_backend, keep_attn, keep_mlp,
                    use_reentrant=False,
                )
            else:
                x = _block_forward(block, x, packed, self.attention_backend, keep_attn, keep_mlp)
        return EncodedTokens(packed=x, level=level, groups=groups)


@dataclass
class EncodedTokens:
    """Tokens between blocks: ``packed [T, E]`` grouped at ``level`` (see ``TokenGroups``)."""

    packed: torch.Tensor
    level: str
    groups: TokenGroups

    def scan_tokens(self) -> torch.Tensor:
        """``[S, U*t, E]`` the body tokens of each real scan, in batch order."""
        _, body = self.groups.unpack(self.packed, self.level)
        return body.view(self.groups.num_scans, -1, body.shape[-1])


def _per_channel(values: Sequence[float], channels: int, name: str) -> list[float]:
    values = [float(v) for v in values]
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ValueError(f"{name} has {len(values)} values for {channels} input channels")
    return values
