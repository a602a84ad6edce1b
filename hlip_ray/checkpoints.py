"""Run checkpoints: what a training checkpoint holds, finding the latest, reading its model.

A checkpoint is a folder (local or ``s3://``) written by every training worker and merged by
Ray Train::

    deepspeed/<tag>/...        the DeepSpeed engine state (ZeRO shards of every rank)
    model.safetensors          the consolidated model weights (float32)
    config.yaml                the run's config
    train_state.json           step, epoch, position, seed, world size, provenance
    rank-<r>.done              one per worker: its part is complete

``--checkpoint`` arguments take such a folder or URI, or a model file released by the HLIP
authors (``.pt``/``.bin``/``.safetensors``).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hlip_ray.config import Config, config_from_dict, dump_config
from hlip_ray.data.storage import Storage, join

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
STATE_FILE = "train_state.json"
DEEPSPEED_DIR = "deepspeed"
HLIP_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def rank_marker(rank: int) -> str:
    return f"rank-{rank}.done"


@dataclass
class TrainState:
    """Where a run stands. ``position``: studies consumed, over all workers, since the run began
    (the next global position of the data order)."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    seed: int = 0
    world_size: int = 1
    global_batch_size: int = 0
    deepspeed_tag: str = ""
    val_zeroshot_auc: float = float("nan")
    provenance: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> TrainState:
        return cls(**json.loads(text))


def is_complete(files: set[str], state: TrainState) -> bool:
    """Every worker's marker and the consolidated model are there (names relative to the folder)."""
    needed = {STATE_FILE, MODEL_FILE, CONFIG_FILE, *(rank_marker(r) for r in range(state.world_size))}
    return needed <= files


def latest_checkpoint(run_dir: str, storage: Storage) -> tuple[str, TrainState] | None:
    """The complete checkpoint with the highest step under a run folder (``checkpoint_*`` folders)."""
    try:
        uris = storage.list_files(run_dir)
    except FileNotFoundError:
        return None
    folders: dict[str, set[str]] = {}
    root = run_dir.rstrip("/")
    for uri in uris:
        relative = uri[len(root) + 1 :]
        parts = relative.split("/")
        if len(parts) >= 2 and parts[0].startswith("checkpoint_"):
            folders.setdefault(parts[0], set()).add("/".join(parts[1:]))
    best = None
    for name, files in folders.items():
        if STATE_FILE not in files:
            continue
        state = TrainState.from_json(storage.read_bytes(join(root, name, STATE_FILE)))
        if is_complete(files, state) and (best is None or state.step > best[1].step):
            best = (join(root, name), state)
    return best


def is_run_checkpoint(source: str, storage: Storage) -> bool:
    return storage.exists(join(source, STATE_FILE)) and storage.exists(join(source, MODEL_FILE))


def read_config(checkpoint: str, storage: Storage) -> Config:
    import yaml

    uri = join(checkpoint, CONFIG_FILE)
    return config_from_dict(yaml.safe_load(storage.read_bytes(uri)), uri)


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
        model.load_state_dict(load(storage.read_bytes(join(source, MODEL_FILE))))
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


def save_model_files(folder: Path, state_dict: dict, config: Config, state: TrainState) -> None:
    """Write ``model.safetensors`` (float32), ``config.yaml`` and ``train_state.json`` into a local folder."""
    from safetensors.torch import save

    tensors = {key: value.detach().float().contiguous().cpu() for key, value in state_dict.items()}
    (folder / MODEL_FILE).write_bytes(save(tensors))
    (folder / CONFIG_FILE).write_text(dump_config(config))
    (folder / STATE_FILE).write_text(state.to_json())

