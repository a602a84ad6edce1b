"""The CLIP model: study encoder + text tower in one embedding space."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from hlip_ray.layouts import expand_layout
from hlip_ray.model.inflate_2d import init_from_2d_vit
from hlip_ray.model.study_encoder import StudyEncoder
from hlip_ray.model.text import TextTower

if TYPE_CHECKING:  # the model library runs without the config module's dependencies
    from hlip_ray.config import Config, ModelConfig

MAX_LOGIT_SCALE = math.log(100.0)


class StudyCLIP(nn.Module):
    """HLIP-style CLIP over studies and reports.

    ``loss="clip"``: learnable temperature, ``logit_scale`` initialised at ln(1/0.07).
    ``loss="siglip"``: ``logit_scale`` at ln(10) and a learnable ``logit_bias`` at -10.
    The scale is clamped at ln(100) where it is used.

    ``text`` may be None for a visual-only model (an HLIP release read without its text tower).
    """

    def __init__(
        self, visual: StudyEncoder, text: TextTower | None, projection_dim: int, loss: str = "clip"
    ) -> None:
        super().__init__()
        if loss not in ("clip", "siglip"):
            raise ValueError(f"loss must be clip or siglip, got {loss!r}")
        self.visual = visual
        self.visual_proj = nn.Linear(visual.feature_dim, projection_dim, bias=False)
        nn.init.normal_(self.visual_proj.weight, std=visual.feature_dim**-0.5)
        self.text = text
        self.loss_type = loss
        init_scale = math.log(10.0) if loss == "siglip" else math.log(1 / 0.07)
        # Shape [1], not a 0-dim scalar: DeepSpeed cannot broadcast or partition 0-dim parameters.
        self.logit_scale = nn.Parameter(torch.full((1,), init_scale))
        self.logit_bias = nn.Parameter(torch.full((1,), -10.0)) if loss == "siglip" else None

    def encode_study(
        self,
        pixels: torch.Tensor,
        scan_mask: torch.Tensor,
        study_seeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``pixels [B, K, C, D, H, W]``, ``scan_mask [B, K]`` -> L2-normalised ``[B, P]``."""
        features = self.visual(pixels, scan_mask, study_seeds)
        return F.normalize(self.visual_proj(features), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``input_ids, attention_mask [B, L]`` -> L2-normalised ``[B, P]``."""
        if self.text is None:
            raise RuntimeError("this model has no text tower")
        return F.normalize(self.text(input_ids, attention_mask), dim=-1)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), with logit_scale clamped at ln(100); a 0-dim tensor."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp().reshape(())

    def bias(self) -> torch.Tensor | None:
        """The SigLIP logit bias as a 0-dim tensor (None for CLIP)."""
        return None if self.logit_bias is None else self.logit_bias.reshape(())

    def forward(
        self,
        pixels: torch.Tensor,
        scan_mask: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        study_seeds: torch.Tensor | None = None,
        text_pooled: torch.Tensor | None = None,
        sentence_input_ids: torch.Tensor | None = None,
        sentence_attention_mask: torch.Tensor | None = None,
        sentence_pooled: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Both towers on one batch of studies and their reports (and, for the dual loss, one
        sentence of each report: ``sentence_input_ids`` / ``sentence_attention_mask``).

        ``text_pooled [B, hidden]`` is the text transformer's pooled output when already known
        (a frozen tower's, kept by the gradient cache between its passes); the transformer is
        then skipped and only the projection runs. The output carries ``text_pooled`` too, and
        ``sentence_features`` / ``sentence_pooled`` when sentences are given.
        """
        if self.text is None:
            raise RuntimeError("this model has no text tower")
        if text_pooled is None:
            text_pooled = self.text.pooled(input_ids, attention_mask)
        out = {
            "study_features": self.encode_study(pixels, scan_mask, study_seeds),
            "text_features": F.normalize(self.text.proj(text_pooled), dim=-1),
            "text_pooled": text_pooled,
            "logit_scale": self.scale(),
            "logit_bias": self.bias(),
        }
        if sentence_input_ids is not None:
            if sentence_pooled is None:
                sentence_pooled = self.text.pooled(sentence_input_ids, sentence_attention_mask)
            out["sentence_features"] = F.normalize(self.text.proj(sentence_pooled), dim=-1)
            out["sentence_pooled"] = sentence_pooled
        return out


def build_study_encoder(model: ModelConfig, grid: Sequence[int], in_channels: int) -> StudyEncoder:
    """A ``StudyEncoder`` from a ``ModelConfig``, the input grid (D, H, W) and channel count."""
    return StudyEncoder(
        grid=grid,
        patch_size=model.patch_size,
        attention_levels=expand_layout(model.attention_layout, model.depth),
        in_channels=in_channels,
        embed_dim=model.embed_dim,
        num_heads=model.num_heads,
        mlp_ratio=model.mlp_ratio,
        max_scan_slots=model.max_scan_slots,
        pixel_mean=model.pixel_mean,
        pixel_std=model.pixel_std,
        patch_dropout=model.patch_dropout,
        drop_path=model.drop_path,
        grad_checkpointing=model.grad_checkpointing,
        attention_backend=model.attention_backend,
        pooling=model.pooling,
    )


def build_model(config: Config, text_weights: bool = True) -> StudyCLIP:
    """The CLIP model a ``Config`` describes.

    The text tower loads ``model.text.name_or_path`` with its pretrained weights unless
    ``text_weights`` is False (architecture only, e.g. before loading a checkpoint). A 2D ViT
    named by ``model.init_from_2d`` initialises the study encoder.
    """
    visual = build_study_encoder(config.model, config.data.grid, config.in_channels)
    if config.model.init_from_2d:
        init_from_2d_vit(visual, config.model.init_from_2d)
    text_cfg = config.model.text
    text = TextTower.from_name_or_path(
        text_cfg.name_or_path, config.model.projection_dim, frozen=text_cfg.frozen, with_weights=text_weights,
        pooling=text_cfg.pooling, projection=text_cfg.projection,
    )
    if config.model.grad_checkpointing:
        text.set_grad_checkpointing(True)
    return StudyCLIP(visual, text, config.model.projection_dim, loss=config.model.loss)
