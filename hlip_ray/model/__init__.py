"""The model library: hierarchical study encoder, text tower, CLIP/SigLIP model, checkpoint import.

Plain PyTorch (+ timm, transformers): importable without Ray or DeepSpeed.
"""

from hlip_ray.model.checkpoints import HLIP_MODELS, from_hlip_checkpoint, init_from_2d_vit
from hlip_ray.model.clip import StudyCLIP, build_model, build_study_encoder
from hlip_ray.model.study_encoder import StudyEncoder
from hlip_ray.model.text import TextTower, load_tokenizer, resolve_text_source

__all__ = [
    "HLIP_MODELS",
    "StudyCLIP",
    "StudyEncoder",
    "TextTower",
    "build_model",
    "build_study_encoder",
    "from_hlip_checkpoint",
    "init_from_2d_vit",
    "load_tokenizer",
    "resolve_text_source",
]
