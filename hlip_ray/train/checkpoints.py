"""A run's checkpoints: written by every rank, consolidated, found, restored.

Layout in ``hlip_ray/eval/trained_model.py`` (which reads the model back for inference). Every
``train.checkpoint_every`` steps each worker writes its part into a local folder and reports it
with ``ray.train.report``; Ray Train merges the parts into ``run_dir/checkpoint_<step>``. A part is:
the rank's DeepSpeed shards, a ``rank-<r>.done`` marker, and on rank 0 the consolidated
``model.safetensors``, ``config.yaml`` and ``train_state.json``. A checkpoint is complete when every
rank's marker is there. A run resumes from its latest complete checkpoint, at any world size
(through DeepSpeed's universal checkpoint when the size changed).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hlip_ray.config import Config, dump_config
from hlip_ray.data.storage import Storage, join
from hlip_ray.eval.trained_model import CONFIG_FILE, MODEL_FILE, STATE_FILE

logger = logging.getLogger(__name__)

DEEPSPEED_DIR = "deepspeed"


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


def checkpoint_at(uri: str, storage: Storage) -> tuple[str, TrainState]:
    """The checkpoint at ``uri`` (a ``checkpoint_*`` folder), which must be complete."""
    uri = uri.rstrip("/")
    try:
        files = {file[len(uri) + 1 :] for file in storage.list_files(uri)}
        state = TrainState.from_json(storage.read_bytes(join(uri, STATE_FILE)))
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint at {uri}") from None
    if not is_complete(files, state):
        raise FileNotFoundError(f"the checkpoint at {uri} is incomplete (a rank's part or the model is missing)")
    return uri, state


def resume_point(run_dir: str, storage: Storage, resume_from: str | None = None) -> tuple[str, TrainState] | None:
    """Where a run (re)starts: its own latest complete checkpoint, else ``resume_from`` (another run's
    checkpoint it continues, as a PBT trial continues a leading trial's), else nowhere."""
    found = latest_checkpoint(run_dir, storage)
    if found is None and resume_from:
        found = checkpoint_at(resume_from, storage)
    return found


# -- writing -------------------------------------------------------------------------------
def report_checkpoint(engine, state: TrainState, config: Config, rank: int, metrics: dict) -> None:
    """Write this rank's part of the checkpoint at ``state.step`` and report it with ``metrics``.

    Every rank must call it at the same step: ZeRO shards are per rank, and consolidating the weights
    is a collective.
    """
    import ray.train

    state.deepspeed_tag = f"step{state.step}"
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        engine.save_checkpoint(str(folder / DEEPSPEED_DIR), tag=state.deepspeed_tag)
        weights = _consolidated_weights(engine, folder / "consolidated")
        if rank == 0:
            (folder / MODEL_FILE).write_bytes(weights)
            (folder / CONFIG_FILE).write_text(dump_config(config))
            (folder / STATE_FILE).write_text(state.to_json())
        (folder / rank_marker(rank)).write_text("")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                         checkpoint_dir_name=checkpoint_dir_name(state.step))


def _consolidated_weights(engine, scratch: Path) -> bytes | None:
    """The whole model's weights as float32 safetensors bytes on rank 0 (None elsewhere), through
    DeepSpeed's ``save_16bit_model`` (under ZeRO-3 a collective that gathers the partitions)."""
    from safetensors.torch import save

    name = "model.bin"
    engine.save_16bit_model(str(scratch), name)
    path = scratch / name
    if not path.is_file():   # not rank 0
        return None
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    return save({key: value.detach().float().contiguous() for key, value in state_dict.items()})


# -- restoring -----------------------------------------------------------------------------
def restore_checkpoint(engine, found: tuple[str, TrainState], storage: Storage, world_size: int) -> TrainState:
    """Load the engine state of a checkpoint; one written at another world size goes through
    DeepSpeed's universal checkpoint format first (ZeRO shards are tied to the world size)."""
    uri, state = found
    with tempfile.TemporaryDirectory() as folder:
        prefix = join(uri, DEEPSPEED_DIR)
        for file_uri in storage.list_files(prefix):
            local = Path(folder) / file_uri[len(prefix) + 1 :]
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(storage.read_bytes(file_uri))
        tag = state.deepspeed_tag
        if state.world_size != world_size:
            logger.info("checkpoint written by %d workers, resuming with %d: converting it to universal",
                        state.world_size, world_size)
            subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                            "--input_folder", f"{folder}/{tag}", "--output_folder", f"{folder}/{tag}_universal",
                            "--inject_missing_state"], check=True, capture_output=True)
            tag = f"{tag}_universal"
        path, _ = engine.load_checkpoint(folder, tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {uri}")
    state.world_size = world_size
    return state
