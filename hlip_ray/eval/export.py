"""``hlip-ray export``: a trained model in HLIP's released layout, for HLIP's own code and open_clip.

Two formats, the same weights (``model.hlip_export.hlip_state_dict``: ``visual.trunk.*``,
``visual.head.proj.*``, ``text.*``, 0-dim ``logit_scale``)::

    --format hlip          FILE.pt     torch.save({"state_dict": ...}), as open_clip writes checkpoints
    --format safetensors   DIR/        model.safetensors   the same state dict, bare (as HLIP's hub releases)
                                       config.yaml         the config, its model.* and data.grid as the weights say
                                       open_clip_config.json

``open_clip_config.json`` holds what HLIP and open_clip need around the weights: ``model_cfg`` (open_clip's
model config: projection size, ``vision_cfg`` naming HLIP's timm model where the weights are one of
``HLIP_MODELS``, ``text_cfg`` naming the text tower), ``preprocess_cfg`` (the pixel mean and std on the
[0, 1] scale) and ``hlip``: attention levels, patch size, grid and widths, its first keys the arguments
``from_hlip_checkpoint`` needs to rebuild this very model (``attention_layout``, ``num_heads``,
``pixel_mean``, ``pixel_std``, ``text_name_or_path``). Either file reads back with ``from_hlip_checkpoint``
(and ``--checkpoint`` takes it, with a ``--config`` for the text tower).
"""

from __future__ import annotations

import io
import json

import torch

from hlip_ray.config import Config, config_from_dict, dump_config, read_yaml
from hlip_ray.data.storage import Storage, join
from hlip_ray.eval.trained_model import CONFIG_FILE, MODEL_FILE
from hlip_ray.layouts import expand_layout
from hlip_ray.model.hlip_export import hlip_state_dict
from hlip_ray.model.hlip_import import HLIP_MODELS

FORMATS = ("hlip", "safetensors")
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
OPEN_CLIP_CONFIG = "open_clip_config.json"
POOLERS = {"cls": "cls_last_hidden_state_pooler", "mean": "mean_pooler"}   # open_clip's names


def export_model(model, config: Config, fmt: str, out: str, storage: Storage) -> list[str]:
    """Write ``model`` (a ``StudyCLIP``) in ``fmt`` to ``out`` (module docstring); returns the URIs written.
    ``config``: the config it was loaded with (text tower, data recipe)."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    state_dict = hlip_state_dict(model)
    if fmt == "hlip":
        if not out.endswith(TORCH_SUFFIXES):
            raise ValueError(f"--out {out}: --format hlip writes one torch file, named {' or '.join(TORCH_SUFFIXES)}")
        buffer = io.BytesIO()
        torch.save({"state_dict": state_dict}, buffer)
        storage.write_bytes(out, buffer.getvalue())
        return [out]
    from safetensors.torch import save

    if out.endswith((*TORCH_SUFFIXES, ".safetensors", ".json", ".yaml")):
        raise ValueError(f"--out {out}: --format safetensors writes a folder ({MODEL_FILE}, {CONFIG_FILE}, "
                         f"{OPEN_CLIP_CONFIG}), not a file")
    described = exported_config(model, config)
    files = {MODEL_FILE: save(state_dict),
             CONFIG_FILE: dump_config(described).encode(),
             OPEN_CLIP_CONFIG: (json.dumps(open_clip_config(model, described), indent=2) + "\n").encode()}
    written = []
    for name, data in files.items():
        storage.write_bytes(join(out, name), data)
        written.append(join(out, name))
    return written


def exported_config(model, config: Config) -> Config:
    """``config`` with ``model.*`` and ``data.grid`` as the model's weights say (an HLIP model file is read
    with a config that need not describe it)."""
    visual = model.visual
    facts = {
        "attention_layout": list(visual.attention_levels),
        "patch_size": list(visual.patch_size),
        "embed_dim": visual.embed_dim,
        "depth": len(visual.blocks),
        "num_heads": visual.blocks[0].attn.num_heads,
        "mlp_ratio": visual.blocks[0].mlp.fc1.out_features / visual.embed_dim,
        "projection_dim": model.visual_proj.out_features,
        "max_scan_slots": 1 if visual.slot_pos_embed is None else visual.slot_pos_embed.shape[1],
        "pixel_mean": [float(value) for value in visual.pixel_mean],
        "pixel_std": [float(value) for value in visual.pixel_std],
        "loss": model.loss_type,
    }
    tree = read_yaml(dump_config(config))
    tree["model"].update(facts)
    tree["data"]["grid"] = [tokens * patch for tokens, patch in zip(visual.token_grid, visual.patch_size)]
    return config_from_dict(tree, "the exported model")


def open_clip_config(model, config: Config) -> dict:
    """The ``open_clip_config.json`` of ``model``, whose ``config`` is ``exported_config``'s (module docstring)."""
    spec, text = config.model, config.model.text
    grid = list(config.data.grid)
    timm_name = _hlip_model_name(spec, grid)
    has_projection = model.text is not None and isinstance(model.text.proj, torch.nn.Linear)
    return {
        "model_cfg": {
            "embed_dim": spec.projection_dim,
            "vision_cfg": {"timm_model_name": timm_name, "timm_pool": "token", "timm_proj": "linear"},
            "text_cfg": None if model.text is None else {
                "hf_model_name": text.name_or_path, "hf_tokenizer_name": text.name_or_path,
                "hf_pooler_type": POOLERS[text.pooling], "hf_proj_type": "linear" if has_projection else None,
                "context_length": text.context_length},
        },
        "preprocess_cfg": {"mean": list(spec.pixel_mean), "std": list(spec.pixel_std)},
        "hlip": {
            "attention_layout": list(spec.attention_levels), "num_heads": spec.num_heads,
            "pixel_mean": list(spec.pixel_mean), "pixel_std": list(spec.pixel_std),
            "text_name_or_path": text.name_or_path if model.text is not None else None,
            "patch_size": list(spec.patch_size), "grid": grid, "embed_dim": spec.embed_dim, "depth": spec.depth,
            "mlp_ratio": spec.mlp_ratio, "max_scan_slots": spec.max_scan_slots,
            "in_channels": model.visual.in_channels, "projection_dim": spec.projection_dim, "loss": spec.loss,
            "windows": [list(window) for window in config.data.windows],
        },
    }


def _hlip_model_name(spec, grid: list[int]) -> str | None:
    """The name HLIP registers the encoder's timm model under, where it is one of ``HLIP_MODELS`` (ViT-B)."""
    if (spec.embed_dim, spec.depth) != (768, 12):
        return None
    for name, known in HLIP_MODELS.items():
        if (known["patch_size"], known["grid"]) == (list(spec.patch_size), grid) and \
                expand_layout(known["attention_layout"], spec.depth) == tuple(spec.attention_levels):
            return name
    return None
