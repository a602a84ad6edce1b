"""A 2D (MAE) ViT inflated into the study encoder, as HLIP initialises it: one filter function
(``adapt_2d_vit_state_dict``) and its loader (``init_from_2d_vit``)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from hlip_ray.model.pos_embed import spatial_from_2d
from hlip_ray.model.study_encoder import StudyEncoder
from hlip_ray.model.weight_files import load_state_dict_file


def adapt_2d_vit_state_dict(state_dict: dict[str, torch.Tensor], encoder: StudyEncoder) -> dict[str, torch.Tensor]:
    """A timm 2D ViT's weights (e.g. ``vit_base_patch16_224.mae``) in the study encoder's shapes.

    The patch kernel ``[E, 3, ph0, pw0]`` is resized to ``(ph, pw)``, summed over RGB, shared
    evenly over the input channels and spread evenly over ``pd`` slices; the 2D position
    embedding becomes the spatial one plus a 1D sin-cos over depth (a CLS position row, if
    any, is folded into ``cls_token``); blocks and the final norm are copied; heads dropped.
    """
    out: dict[str, torch.Tensor] = {}
    depth, height, width = encoder.patch_size
    kernel = state_dict["patch_embed.proj.weight"].float()
    if tuple(kernel.shape[2:]) != (height, width):
        kernel = F.interpolate(kernel, size=(height, width), mode="bicubic", align_corners=False)
    kernel = kernel.sum(dim=1, keepdim=True) / encoder.in_channels
    kernel = kernel.expand(-1, encoder.in_channels, -1, -1).unsqueeze(2).repeat(1, 1, depth, 1, 1) / depth
    out["patch_embed.weight"] = kernel
    if "patch_embed.proj.bias" in state_dict:
        out["patch_embed.bias"] = state_dict["patch_embed.proj.bias"]

    cls_token = state_dict["cls_token"].float()
    if "pos_embed" in state_dict:
        pos = state_dict["pos_embed"].float()
        rows = pos.shape[1]
        if int(round(rows**0.5)) ** 2 != rows:  # a CLS row in front of the patch grid
            cls_token = cls_token + pos[:, :1]
            pos = pos[:, 1:]
        out["spatial_pos_embed"] = spatial_from_2d(pos, encoder.token_grid)
    out["cls_token"] = cls_token
    for key, value in state_dict.items():
        if key.startswith(("blocks.", "norm.")):
            out[key] = value
    return out


def init_from_2d_vit(encoder: StudyEncoder, source: str | Path) -> StudyEncoder:
    """Initialise ``encoder`` from a 2D ViT: a local checkpoint file, or a timm model name
    (``vit_base_patch16_224.mae``) fetched from the model hub where one is reachable."""
    if Path(source).exists():
        state_dict = load_state_dict_file(source)
    else:
        import timm

        state_dict = timm.create_model(str(source), pretrained=True).state_dict()
    adapted = adapt_2d_vit_state_dict(state_dict, encoder)
    result = encoder.load_state_dict(adapted, strict=False)
    missing_blocks = [key for key in result.missing_keys if key.startswith("blocks.")]
    if missing_blocks or result.unexpected_keys:
        raise ValueError(
            f"2D ViT {source} does not fit the study encoder: missing {missing_blocks[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}"
        )
    return encoder
