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

``check_target`` refuses, before any model loads, an ``--out`` of the wrong shape for the format, a file
that is already there (and, for a folder, any of the three files already in it) unless ``force``, and, even
with ``force``, any place inside a run checkpoint (a folder holding ``train_state.json``), the one being
read included.
"""

from __future__ import annotations

import io
import json
import os

import torch

from hlip_ray.config import Config, config_from_dict, dump_config, read_yaml
from hlip_ray.layouts import expand_layout
from hlip_ray.model.hlip_export import hlip_state_dict
from hlip_ray.model.hlip_import import HLIP_MODELS
from hlip_ray.run_checkpoint import CONFIG_FILE, MODEL_FILE, STATE_FILE
from hlip_ray.storage import Storage, is_s3, join

FORMATS = ("hlip", "safetensors")
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
OPEN_CLIP_CONFIG = "open_clip_config.json"
POOLERS = {"cls": "cls_last_hidden_state_pooler", "mean": "mean_pooler"}   # open_clip's names


def check_target(fmt: str, out: str, storage: Storage, force: bool = False) -> None:
    """Refuse (``ValueError``, one line naming the path) an ``out`` that ``fmt`` cannot write, one that would
    overwrite files without ``force``, and one inside a run checkpoint whatever ``force`` says. Cheap: run it
    before loading the model."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt == "hlip" and not out.endswith(TORCH_SUFFIXES):
        raise ValueError(f"--out {out}: --format hlip writes one torch file, named {' or '.join(TORCH_SUFFIXES)}")
    if fmt == "safetensors" and out.rstrip("/").endswith((*TORCH_SUFFIXES, ".safetensors", ".json", ".yaml")):
        raise ValueError(f"--out {out}: --format safetensors writes a folder ({MODEL_FILE}, {CONFIG_FILE}, "
                         f"{OPEN_CLIP_CONFIG}), not a file")
    out_exists = storage.exists(out)   # first: an unsupported URI is refused here, naming it
    checkpoint = _enclosing_run_checkpoint(out if fmt == "safetensors" else _parent(out), storage)
    if checkpoint is not None:
        raise ValueError(f"{checkpoint} is a run checkpoint: export writes no file into one; name another --out")
    if not is_s3(out) and out_exists and os.path.isdir(out.removeprefix("file://")) != (fmt == "safetensors"):
        wanted = "a folder" if fmt == "safetensors" else "one torch file"
        raise ValueError(f"--out {out} is {'a file' if fmt == 'safetensors' else 'a folder'}: "
                         f"--format {fmt} writes {wanted}")
    if force or not out_exists:
        return
    if fmt == "hlip":
        raise ValueError(f"{out} already exists: pass --force to overwrite it")
    present = [name for name in (MODEL_FILE, CONFIG_FILE, OPEN_CLIP_CONFIG) if storage.exists(join(out, name))]
    if present:
        raise ValueError(f"{out} already holds {', '.join(present)}: pass --force to overwrite them")


def export_model(model, config: Config, fmt: str, out: str, storage: Storage, force: bool = False) -> list[str]:
    """Write ``model`` (a ``StudyCLIP``) in ``fmt`` to ``out`` (module docstring); returns the URIs written.
    ``config``: the config it was loaded with (text tower, data recipe). ``out`` is refused as ``check_target``
    refuses it."""
    check_target(fmt, out, storage, force)
    state_dict = hlip_state_dict(model)
    if fmt == "hlip":
        buffer = io.BytesIO()
        torch.save({"state_dict": state_dict}, buffer)
        storage.write_bytes(out, buffer.getvalue())
        return [out]
    from safetensors.torch import save

    described = exported_config(model, config)
    files = {MODEL_FILE: save(state_dict),
             CONFIG_FILE: dump_config(described).encode(),
             OPEN_CLIP_CONFIG: (json.dumps(open_clip_config(model, described), indent=2) + "\n").encode()}
    written = []
    for name, data in files.items():
        storage.write_bytes(join(out, name), data)
        written.append(join(out, name))
    return written


def _parent(uri: str) -> str:
    """The folder a file ``uri`` goes into (``s3://bucket`` at the top of a bucket)."""
    if is_s3(uri):
        head, _, _ = uri.rstrip("/").rpartition("/")
        return head if len(head) > len("s3://") else uri.rstrip("/")
    return os.path.dirname(os.path.realpath(uri.removeprefix("file://")))


def _enclosing_run_checkpoint(folder: str, storage: Storage) -> str | None:
    """``folder`` or the nearest folder above it that is a run checkpoint (holds ``train_state.json``, complete
    or not), else ``None``. Locally, links are followed: a link to a checkpoint is the checkpoint."""
    if is_s3(folder):
        bucket, _, key = folder[len("s3://"):].rstrip("/").partition("/")
        parts = [part for part in key.split("/") if part]
        candidates = [join(f"s3://{bucket}", *parts[:depth]) for depth in range(len(parts), -1, -1)]
    else:
        path = os.path.realpath(folder.removeprefix("file://"))
        candidates = [path]
        while os.path.dirname(candidates[-1]) != candidates[-1]:
            candidates.append(os.path.dirname(candidates[-1]))
    return next((candidate for candidate in candidates if storage.exists(join(candidate, STATE_FILE))), None)


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
        "pooling": visual.pooling,
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
            "pooling": spec.pooling,
            "windows": [list(window) for window in config.data.windows],
        },
    }


def _hlip_model_name(spec, grid: list[int]) -> str | None:
    """The name HLIP registers the encoder's timm model under, where it is one of ``HLIP_MODELS`` (ViT-B,
    CLS pooling)."""
    if (spec.embed_dim, spec.depth, spec.pooling) != (768, 12, "cls"):
        return None
    for name, known in HLIP_MODELS.items():
        if (known["patch_size"], known["grid"]) == (list(spec.patch_size), grid) and \
                expand_layout(known["attention_layout"], spec.depth) == tuple(spec.attention_levels):
            return name
    return None
