"""A run checkpoint's format, in one place: its file names, its state, when it is complete, finding the
latest, and reading it. The trainer writes through it (``hlip_ray/train/checkpoints.py``); evaluation and
inference read through it (``hlip_ray/inference/trained_model.py``, ``embed.py``, ``export.py``, the command line).

A run checkpoint is a folder (local or ``s3://``), ``run_dir/checkpoint_<step>``, that every training
worker wrote part of::

    deepspeed/<tag>/...        the DeepSpeed engine state (ZeRO shards of every rank)
    model.safetensors          the consolidated model weights (float32)
    config.yaml                the run's config
    train_state.json           step, epoch, position, seed, world size, provenance
    rank-<r>.done              one per worker, written last: its files and their sizes

A checkpoint is complete when every rank's marker is there and every file it lists is there at its
size, so a save a crash cut short is never picked up. Inference needs only ``model.safetensors`` and
``config.yaml``. The other kind of model source is a file released by the HLIP authors
(``HLIP_SUFFIXES``). Standard library, the config and storage only: no torch, no Ray.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from hlip_ray.config import Config, config_from_dict, read_yaml
from hlip_ray.storage import Storage, join

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
STATE_FILE = "train_state.json"
DEEPSPEED_DIR = "deepspeed"
HLIP_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def rank_marker(rank: int) -> str:
    return f"rank-{rank}.done"


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


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
    validation: dict = field(default_factory=dict)   # the latest validation's metrics, carried by every step
    provenance: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> TrainState:
        return cls(**json.loads(text))


# -- finding -------------------------------------------------------------------------------
def _files_in(uri: str, sizes: dict[str, int]) -> dict[str, int]:
    """``{name relative to the folder: size}`` of the files under ``uri`` among ``sizes`` (a listing)."""
    root = uri.rstrip("/") + "/"
    return {name[len(root):]: size for name, size in sizes.items() if name.startswith(root)}


def complete_state(uri: str, files: dict[str, int], storage: Storage) -> TrainState | None:
    """The state of the checkpoint at ``uri`` if it is complete, else None. ``files``: its files and their
    sizes. Complete: every rank's marker is there and every file a marker lists is there at the size
    the marker gives (a save cut short leaves a marker out, or a file short), so a checkpoint a crash
    interrupted is never picked up."""
    def listed(rank: int) -> dict[str, int] | None:
        name = rank_marker(rank)
        if name not in files:
            return None
        try:
            manifest = json.loads(storage.read_bytes(join(uri, name)))
        except (ValueError, FileNotFoundError):
            return None
        ok = isinstance(manifest, dict) and all(files.get(file) == size for file, size in manifest.items())
        return manifest if ok else None

    first = listed(0)
    if first is None or not {STATE_FILE, MODEL_FILE, CONFIG_FILE} <= set(first):
        return None
    try:
        state = TrainState.from_json(storage.read_bytes(join(uri, STATE_FILE)))
    except (ValueError, TypeError, FileNotFoundError):
        return None
    if any(listed(rank) is None for rank in range(1, state.world_size)):
        return None
    return state


def latest_checkpoint(run_dir: str, storage: Storage) -> tuple[str, TrainState] | None:
    """The complete checkpoint with the highest step under a run folder (``checkpoint_*`` folders)."""
    try:
        sizes = storage.file_sizes(run_dir)
    except FileNotFoundError:
        return None
    root = run_dir.rstrip("/")
    names = {uri[len(root) + 1:].split("/")[0] for uri in sizes}
    for name in sorted((name for name in names if name.startswith("checkpoint_")), reverse=True):
        uri = join(root, name)
        state = complete_state(uri, _files_in(uri, sizes), storage)
        if state is not None:
            return uri, state
    return None


def checkpoint_at(uri: str, storage: Storage) -> tuple[str, TrainState]:
    """The checkpoint at ``uri`` (a ``checkpoint_*`` folder), which must be complete."""
    uri = uri.rstrip("/")
    try:
        files = _files_in(uri, storage.file_sizes(uri))
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint at {uri}") from None
    if STATE_FILE not in files:
        raise FileNotFoundError(f"no checkpoint at {uri}")
    state = complete_state(uri, files, storage)
    if state is None:
        raise FileNotFoundError(f"the checkpoint at {uri} is incomplete (a rank's part or the model is missing)")
    return uri, state


def resume_point(run_dir: str, storage: Storage, resume_from: str | None = None) -> tuple[str, TrainState] | None:
    """Where a run (re)starts: its own latest complete checkpoint, else ``resume_from`` (another run's
    checkpoint it continues, as a PBT trial continues a leading trial's), else nowhere."""
    found = latest_checkpoint(run_dir, storage)
    if found is None and resume_from:
        found = checkpoint_at(resume_from, storage)
    return found


def is_run_checkpoint(source: str, storage: Storage) -> bool:
    """Whether ``source`` is a run checkpoint (its state and model are there) rather than a model file."""
    return storage.exists(join(source, STATE_FILE)) and storage.exists(join(source, MODEL_FILE))


def model_weights(source: str, storage: Storage) -> tuple[str, bool]:
    """``(weights file, is it a run checkpoint's)`` of a model source as ``--checkpoint`` takes it: a run
    checkpoint (its ``model.safetensors``) or an HLIP model file (itself); anything else is refused here,
    naming both kinds."""
    if is_run_checkpoint(source, storage):
        return join(source, MODEL_FILE), True
    if source.endswith(HLIP_SUFFIXES):
        return source, False
    raise FileNotFoundError(f"{source}: neither a run checkpoint (no {STATE_FILE} and {MODEL_FILE}) nor a model "
                            f"file ({', '.join(HLIP_SUFFIXES)})")


def read_state(checkpoint: str, storage: Storage) -> TrainState:
    """The state a run checkpoint was written with (step, epoch, position, ...)."""
    return TrainState.from_json(storage.read_bytes(join(checkpoint, STATE_FILE)))


def read_config(checkpoint: str, storage: Storage) -> Config:
    """The config a run checkpoint was trained with."""
    uri = join(checkpoint, CONFIG_FILE)
    return config_from_dict(read_yaml(storage.read_bytes(uri)), uri)
