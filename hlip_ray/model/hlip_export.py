"""This package's model in HLIP's released layout (open_clip ``CustomTextCLIP``): the inverse of
``hlip_import.hlip_state_dict_filter``, so that ``from_hlip_checkpoint`` and HLIP's own code read an
export back."""

from __future__ import annotations

import re

import torch

from hlip_ray.model.clip import StudyCLIP

# This package's key prefixes -> HLIP's, tried in order (the first that matches renames a key).
_RENAMES = [
    (r"^visual\.patch_embed\.", "visual.trunk.patch_embed.proj."),
    (r"^visual\.spatial_pos_embed$", "visual.trunk.spatial_posemb"),
    (r"^visual\.slot_pos_embed$", "visual.trunk.sequential_posemb"),
    (r"^visual\.", "visual.trunk."),
    (r"^visual_proj\.", "visual.head.proj."),
]


def hlip_state_dict(model: StudyCLIP) -> dict[str, torch.Tensor]:
    """The model's weights under HLIP/open_clip keys, on the CPU, without ``module.`` prefixes.

    ``visual.patch_embed`` becomes ``visual.trunk.patch_embed.proj``, ``spatial_pos_embed`` /
    ``slot_pos_embed`` become ``visual.trunk.spatial_posemb`` / ``sequential_posemb``, every other
    encoder key ``visual.trunk.*``, ``visual_proj`` becomes ``visual.head.proj``; ``text.*`` keep their
    keys; ``logit_scale`` and ``logit_bias`` become 0-dim tensors, as open_clip holds them. Tensors keep
    their dtype and are copies (no storage shared with the model).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu().clone()
        if key in ("logit_scale", "logit_bias"):
            out[key] = value.reshape(())
            continue
        for pattern, replacement in _RENAMES:
            key, hits = re.subn(pattern, replacement, key)
            if hits:
                break
        out[key] = value
    return out
