"""Inference: a trained model loaded and used. Importable without the trainer or DeepSpeed.

``trained_model.py``: the model of a run checkpoint or an HLIP release; ``embed.py``: a whole archive into
Parquet on Ray Data actors (``hlip-ray embed``); ``predict.py``: one local study (``hlip-ray predict``);
``export.py``: HLIP/open_clip and safetensors files (``hlip-ray export``). Scores, prompts, relevance maps
and where the model runs come from ``hlip_ray.eval``.
"""
