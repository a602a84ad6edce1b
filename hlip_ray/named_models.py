"""Named models: HLIP's geometries by name, as open_clip and timm name theirs (``ViT-B-16``).

Plain Python, shared by the config (``model.name`` fills these keys, each overridable) and the model
(``from_hlip_checkpoint(name=...)`` takes what a released file's weights cannot say from here). Each
entry gives the study encoder's width, depth, heads, patch, attention layout, scan slots and pooling,
and the input grid (``data.grid``) it was built for. ``hlip-ray config --reference`` lists them.

The first four are the models HLIP's authors released with the 2025 paper (their timm names). The
``dinotxt`` ones are the ViT-B geometries of HLIP's 2026 configs (``src/hlip/model_configs/
clip_vit_base_{scan_study,slice_scan_study}_dualdinotxt1568.json``): 6 x 16 x 16 patches on 48 x 224 x 224
(1568 tokens a scan) and DINO.txt pooling; HLIP's own also carry a register token, which these leave out, so
its weights do not load into them. HLIP's ViT-L configs are left out: their width (1024) does not split into
the three sin-cos axes this encoder builds from scratch (HLIP builds them from a pretrained 2D MAE's table).
"""

from __future__ import annotations

from typing import Any

_VIT_B = {"embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0}

NAMED_MODELS: dict[str, dict[str, Any]] = {
    "vit_base_singlescan_h2_token2744": {
        "summary": "HLIP 2025, chest CT (CT-RATE): one scan, slice/slice/study, 8x24x24 on 112x336x336",
        "model": {**_VIT_B, "attention_layout": "chest", "patch_size": [8, 24, 24], "max_scan_slots": 1,
                  "pooling": "cls"},
        "grid": [112, 336, 336],
        "released": True,
    },
    "vit_base_multiscan_h2_token588": {
        "summary": "HLIP 2025, brain MRI: scan/scan/study, 16x16x16 on 48x224x224",
        "model": {**_VIT_B, "attention_layout": "h2", "patch_size": [16, 16, 16], "max_scan_slots": 40,
                  "pooling": "cls"},
        "grid": [48, 224, 224],
        "released": True,
    },
    "vit_base_multiscan_h2_token1176": {
        "summary": "HLIP 2025, brain MRI: scan/scan/study, 8x16x16 on 48x224x224",
        "model": {**_VIT_B, "attention_layout": "h2", "patch_size": [8, 16, 16], "max_scan_slots": 40,
                  "pooling": "cls"},
        "grid": [48, 224, 224],
        "released": True,
    },
    "vit_base_multiscan_h3_token1176": {
        "summary": "HLIP 2025, brain MRI: slice/scan/study, 8x16x16 on 48x224x224",
        "model": {**_VIT_B, "attention_layout": "h3", "patch_size": [8, 16, 16], "max_scan_slots": 40,
                  "pooling": "cls"},
        "grid": [48, 224, 224],
        "released": True,
    },
    "vit_base_scan_study_dinotxt1568": {
        "summary": "HLIP 2026, brain MRI: scan/scan/study, 6x16x16 on 48x224x224, CLS + patch-mean pooling",
        "model": {**_VIT_B, "attention_layout": "h2", "patch_size": [6, 16, 16], "max_scan_slots": 40,
                  "pooling": "cls_patch_mean"},
        "grid": [48, 224, 224],
        "released": False,
    },
    "vit_base_slice_scan_study_dinotxt1568": {
        "summary": "HLIP 2026, brain MRI: slice/scan/study, 6x16x16 on 48x224x224, CLS + patch-mean pooling",
        "model": {**_VIT_B, "attention_layout": "h3", "patch_size": [6, 16, 16], "max_scan_slots": 40,
                  "pooling": "cls_patch_mean"},
        "grid": [48, 224, 224],
        "released": False,
    },
}


def named_model(name: str) -> dict[str, Any]:
    """The entry of ``name``; a ValueError listing the known names otherwise."""
    if name not in NAMED_MODELS:
        raise ValueError(f"unknown model name {name!r}; known: {', '.join(NAMED_MODELS)}")
    return NAMED_MODELS[name]


def named_config_tree(name: str) -> dict[str, Any]:
    """The config keys ``model.name: NAME`` stands for, as a tree: ``{"model": {...}, "data": {"grid": ...}}``."""
    entry = named_model(name)
    return {"model": dict(entry["model"]), "data": {"grid": list(entry["grid"])}}
