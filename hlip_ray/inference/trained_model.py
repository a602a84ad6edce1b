"""A trained model for inference: from a run checkpoint (its format: ``hlip_ray/run_checkpoint.py``) or a
model file released by the HLIP authors (``.pt``/``.pth``/``.bin``/``.safetensors``), as ``--checkpoint``
arguments take them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hlip_ray.config import Config
from hlip_ray.run_checkpoint import model_weights, read_config
from hlip_ray.storage import Storage


def inference_config(config: Config) -> Config:
    """``config`` as inference runs it: at the test-time size ``eval.grid`` where one is set. A shard cache
    holds studies at the training size, so at another size studies are decoded from the manifest."""
    if config.eval.grid is None or list(config.eval.grid) == list(config.data.grid):
        return config
    if config.data.shards and not config.data.manifest:
        raise ValueError(f"eval.grid {config.eval.grid} differs from data.grid {config.data.grid}: studies are "
                         "decoded again at that size from data.manifest (data.shards holds the training size)")
    data = config.data.model_copy(update={"grid": list(config.eval.grid), "shards": None})
    return config.model_copy(update={"data": data})


def load_model(source: str, storage: Storage, config: Config | None = None):
    """``(model, config)`` from a run checkpoint (folder or URI) or an HLIP release file.

    A run checkpoint brings its own config (``config`` is ignored). An HLIP file takes the text
    tower and, where the weights do not say, the attention layout from ``config``.
    """
    from safetensors.torch import load

    from hlip_ray.model import build_model, from_hlip_checkpoint

    weights, from_run = model_weights(source, storage)
    if from_run:
        config = read_config(source, storage)
        model = build_model(config, text_weights=False)
        try:
            state_dict = load(storage.read_bytes(weights))
        except Exception as error:   # safetensors' own errors: a truncated or foreign file
            raise ValueError(f"{weights}: not a readable safetensors file ({error})") from None
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as error:
            first = str(error).splitlines()[0]
            raise ValueError(f"{weights}: weights that do not fit the model of its config.yaml ({first})") from None
        return model, config
    if config is None:
        raise ValueError(f"{source}: an HLIP model file needs a config (text tower, attention layout)")
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch) / Path(source).name
        local.write_bytes(storage.read_bytes(source))
        model = from_hlip_checkpoint(local, attention_layout=config.model.attention_layout,
                                     text_name_or_path=config.model.text.name_or_path)
    return model, config
