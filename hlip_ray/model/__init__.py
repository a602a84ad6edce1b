"""The model library: hierarchical study encoder, text tower, CLIP/SigLIP model, checkpoint import.

Plain PyTorch (+ timm, transformers): importable without Ray or DeepSpeed. Names load on first
use, so that a process which only tokenizes (``hlip_ray.model.tokenizer``, on Ray Data's CPU
workers) never imports torch and timm.
"""

import importlib

_EXPORTS = {
    "HLIP_MODELS": "checkpoints",
    "from_hlip_checkpoint": "checkpoints",
    "init_from_2d_vit": "checkpoints",
    "StudyCLIP": "clip",
    "build_model": "clip",
    "build_study_encoder": "clip",
    "StudyEncoder": "study_encoder",
    "TextTower": "text",
    "load_tokenizer": "tokenizer",
    "resolve_text_source": "tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return __all__
