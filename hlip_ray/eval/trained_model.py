"""A trained model for inference: from a run checkpoint or a model file released by the HLIP authors.

A run checkpoint is a folder (local or ``s3://``) that every training worker wrote part of
(``hlip_ray/train/checkpoints.py`` writes it)::

    deepspeed/<tag>/...        the DeepSpeed engine state (ZeRO shards of every rank)
    model.safetensors          the consolidated model weights (float32)
    config.yaml                the run's config
    train_state.json           step, epoch, position, seed, world size, provenance
    rank-<r>.done              one per worker, written last: its files and their sizes

Inference needs only ``model.safetensors`` and ``config.yaml``. ``--checkpoint`` arguments take
such a folder or URI, or an HLIP release file (``.pt``/``.pth``/``.bin``/``.safetensors``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hlip_ray.config import Config, config_from_dict, read_yaml
from hlip_ray.storage import Storage, join

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
STATE_FILE = "train_state.json"
HLIP_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


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


def is_run_checkpoint(source: str, storage: Storage) -> bool:
    return storage.exists(join(source, STATE_FILE)) and storage.exists(join(source, MODEL_FILE))


def read_config(checkpoint: str, storage: Storage) -> Config:
    """The config a run checkpoint was trained with."""
    uri = join(checkpoint, CONFIG_FILE)
    return config_from_dict(read_yaml(storage.read_bytes(uri)), uri)


def load_model(source: str, storage: Storage, config: Config | None = None):
    """``(model, config)`` from a run checkpoint (folder or URI) or an HLIP release file.

    A run checkpoint brings its own config (``config`` is ignored). An HLIP file takes the text
    tower and, where the weights do not say, the attention layout from ``config``.
    """
    from safetensors.torch import load

    from hlip_ray.model import build_model, from_hlip_checkpoint

    if is_run_checkpoint(source, storage):
        config = read_config(source, storage)
        model = build_model(config, text_weights=False)
        weights = join(source, MODEL_FILE)
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
    if not source.endswith(HLIP_SUFFIXES):
        raise FileNotFoundError(
            f"{source}: neither a run checkpoint (no {STATE_FILE} and {MODEL_FILE}) nor a model file "
            f"({', '.join(HLIP_SUFFIXES)})"
        )
    if config is None:
        raise ValueError(f"{source}: an HLIP model file needs a config (text tower, attention layout)")
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch) / Path(source).name
        local.write_bytes(storage.read_bytes(source))
        model = from_hlip_checkpoint(local, attention_layout=config.model.attention_layout,
                                     text_name_or_path=config.model.text.name_or_path)
    return model, config
