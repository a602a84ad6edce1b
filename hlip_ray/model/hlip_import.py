"""Models released by the HLIP authors (open_clip ``CustomTextCLIP``), adapted by one filter
function (``hlip_state_dict_filter``) and loaded by ``from_hlip_checkpoint``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from hlip_ray.layouts import expand_layout
from hlip_ray.model.clip import StudyCLIP
from hlip_ray.model.study_encoder import StudyEncoder
from hlip_ray.model.text import TextTower
from hlip_ray.model.weight_files import load_state_dict_file
from hlip_ray.named_models import NAMED_MODELS

# HLIP's released models: attention layout, patch size and the input grid they were trained at.
HLIP_MODELS: dict[str, dict[str, Any]] = {
    name: {"attention_layout": entry["model"]["attention_layout"], "patch_size": entry["model"]["patch_size"],
           "grid": entry["grid"]}
    for name, entry in NAMED_MODELS.items() if entry["released"]
}
HLIP_TEXT_MODEL = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext"
# Overrides from_hlip_checkpoint passes on to the study encoder.
ENCODER_OPTIONS = ("num_heads", "pixel_mean", "pixel_std", "patch_dropout", "drop_path",
                   "grad_checkpointing", "attention_backend")


def hlip_state_dict_filter(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """HLIP/open_clip keys -> this package's, split by tower: ``{"visual", "text", "clip"}``.

    ``module.`` prefixes are dropped; ``visual.trunk.patch_embed.proj`` becomes
    ``visual.patch_embed``, ``spatial_posemb``/``sequential_posemb`` become
    ``spatial_pos_embed``/``slot_pos_embed``, ``visual.head.proj`` becomes ``visual_proj``.
    """
    towers: dict[str, dict[str, torch.Tensor]] = {"visual": {}, "text": {}, "clip": {}}
    renames = [
        (r"^visual\.trunk\.patch_embed\.proj\.", "visual.patch_embed."),
        (r"^visual\.trunk\.spatial_posemb$", "visual.spatial_pos_embed"),
        (r"^visual\.trunk\.sequential_posemb$", "visual.slot_pos_embed"),
        (r"^visual\.trunk\.", "visual."),
        (r"^visual\.head\.proj\.", "visual_proj."),
    ]
    for key, value in state_dict.items():
        while key.startswith("module."):
            key = key[len("module.") :]
        for pattern, replacement in renames:
            key, hits = re.subn(pattern, replacement, key)
            if hits:
                break
        if key.startswith("visual"):
            towers["visual"][key] = value
        elif key.startswith("text."):
            towers["text"][key] = value
        elif key in ("logit_scale", "logit_bias"):
            towers["clip"][key] = value.reshape(1)  # 0-dim in open_clip, [1] here
    if "visual.cls_token" not in towers["visual"]:
        raise ValueError("not an HLIP checkpoint: no visual.trunk.cls_token")
    return towers


def from_hlip_checkpoint(path: str | Path, **overrides: Any) -> StudyCLIP:
    """Load a model released by the HLIP authors.

    Shapes (width, depth, patch size, token grid, scan slots, projection) are read from the
    weights. What the weights cannot say comes from ``name`` (one of ``HLIP_MODELS``) or from
    overrides: ``attention_layout``, ``num_heads`` (default: width / 64), ``text_name_or_path``
    (hub name or local folder of the BERT config; default HLIP's BiomedBERT), ``text_frozen``,
    and the encoder options in ``ENCODER_OPTIONS`` (``patch_dropout``, ``grad_checkpointing``...).
    Pixels are taken as HLIP's [0, 1] scale (``pixel_mean=[0]``, ``pixel_std=[1]``) unless
    overridden. A checkpoint without text weights gives a model without a text tower.
    """
    towers = hlip_state_dict_filter(load_state_dict_file(path))
    visual = towers["visual"]
    name = overrides.pop("name", None)
    if name and name not in HLIP_MODELS:
        raise ValueError(f"unknown HLIP model {name!r}; known: {', '.join(HLIP_MODELS)}")
    known = HLIP_MODELS.get(name, {})

    patch_weight = visual["visual.patch_embed.weight"]
    embed_dim, in_channels = patch_weight.shape[:2]
    patch_size = list(patch_weight.shape[2:])
    token_grid = list(visual["visual.spatial_pos_embed"].shape[1:4])
    depth = 1 + max(int(key.split(".")[2]) for key in visual if key.startswith("visual.blocks."))
    slots = visual["visual.slot_pos_embed"].shape[1] if "visual.slot_pos_embed" in visual else 1
    mlp_hidden = visual["visual.blocks.0.mlp.fc1.weight"].shape[0]
    projection_dim = visual["visual_proj.weight"].shape[0]
    grid = [g * p for g, p in zip(token_grid, patch_size)]
    if known and (known["patch_size"], known["grid"]) != (patch_size, grid):
        raise ValueError(
            f"{path}: weights have patch {patch_size} on grid {grid}, but {name} is "
            f"patch {known['patch_size']} on grid {known['grid']}"
        )

    text_source = overrides.pop("text_name_or_path", HLIP_TEXT_MODEL)
    text_frozen = overrides.pop("text_frozen", False)
    layout = overrides.pop("attention_layout", known.get("attention_layout"))
    if layout is None:
        raise ValueError(
            "the attention layout of an HLIP checkpoint is not in its weights: pass name= "
            f"(one of {', '.join(HLIP_MODELS)}) or attention_layout="
        )
    options = dict(
        grid=grid,
        patch_size=patch_size,
        in_channels=in_channels,
        embed_dim=embed_dim,
        num_heads=max(1, embed_dim // 64),
        mlp_ratio=mlp_hidden / embed_dim,
        max_scan_slots=slots,
        pixel_mean=[0.0],
        pixel_std=[1.0],
        # a LayerNorm over the CLS token and the patch mean side by side (twice the width)
        pooling="cls_patch_mean" if "visual.fc_norm.weight" in visual else "cls",
    )
    unknown = set(overrides) - set(ENCODER_OPTIONS)
    if unknown:
        raise TypeError(f"unknown override(s) {sorted(unknown)}; accepted: {', '.join(ENCODER_OPTIONS)}")
    options.update(overrides)
    encoder = StudyEncoder(attention_levels=expand_layout(layout, depth), **options)
    text = None
    if towers["text"]:
        text = TextTower.from_name_or_path(text_source, projection_dim, text_frozen, with_weights=False)
    loss = "siglip" if "logit_bias" in towers["clip"] else "clip"
    model = StudyCLIP(encoder, text, projection_dim, loss=loss)
    state = {**visual, **towers["text"], **towers["clip"]}
    result = model.load_state_dict(state, strict=False)
    missing = [key for key in result.missing_keys if text is not None or not key.startswith("text.")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path}: checkpoint does not fit the model: missing {missing[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}"
        )
    return model
