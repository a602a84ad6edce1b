"""The model library: hierarchical study encoder, text tower, CLIP/SigLIP model, foreign weights.

Plain PyTorch (+ timm, transformers): importable without Ray, DeepSpeed, pydantic or the rest of
hlip_ray (``tests/test_layers.py``). Text-tower sources and tokenizers are in ``hlip_ray.text_source``.
"""

from hlip_ray.model.clip import StudyCLIP, build_model, build_study_encoder
from hlip_ray.model.hlip_import import HLIP_MODELS, from_hlip_checkpoint
from hlip_ray.model.inflate_2d import init_from_2d_vit
from hlip_ray.model.study_encoder import StudyEncoder
from hlip_ray.model.text import TextTower

__all__ = ["HLIP_MODELS", "StudyCLIP", "StudyEncoder", "TextTower", "build_model", "build_study_encoder",
           "from_hlip_checkpoint", "init_from_2d_vit"]
