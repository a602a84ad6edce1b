"""A run's checkpoints: written by every rank, consolidated, found, restored.

Layout in ``hlip_ray/eval/trained_model.py`` (which reads the model back for inference). Every
``train.checkpoint_every`` steps each worker writes its part into a local folder and reports it
with ``ray.train.report``; Ray Train merges the parts into ``run_dir/checkpoint_<step>``. A part is:
the rank's DeepSpeed shards, a ``rank-<r>.done`` marker, and on rank 0 the consolidated
``model.safetensors``, ``config.yaml`` and ``train_state.json``. Each rank writes its marker last; it
lists the rank's files and their sizes. A checkpoint is complete when every rank's marker is there and
every file it lists is there at its size, so a save a crash cut short is never picked up. A run
resumes from its latest complete checkpoint, at any world size (through DeepSpeed's universal
checkpoint when the size changed).
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
from hlip_ray.eval.trained_model import CONFIG_FILE, MODEL_FILE, STATE_FILE
from hlip_ray.storage import Storage, join

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


# -- writing -------------------------------------------------------------------------------
def report_checkpoint(engine, state: TrainState, config: Config, rank: int, metrics: dict) -> None:
    """Write this rank's part of the checkpoint at ``state.step`` and report it with ``metrics``.

    Every rank must call it at the same step: ZeRO shards are per rank, and consolidating the weights
    is a collective.
    """
    import ray.train

    state.deepspeed_tag = f"step{state.step}-{state.world_size}w"   # the shards of one world size apart
    with tempfile.TemporaryDirectory() as scratch, tempfile.TemporaryDirectory() as work:
        folder = Path(scratch)
        engine.save_checkpoint(str(folder / DEEPSPEED_DIR), tag=state.deepspeed_tag)
        weights = _consolidated_weights(engine, Path(work))
        if rank == 0:
            (folder / MODEL_FILE).write_bytes(weights)
            (folder / CONFIG_FILE).write_text(dump_config(config))
            (folder / STATE_FILE).write_text(state.to_json())
        # Last: the marker lists this rank's files and sizes (``complete_state`` checks them).
        files = {str(path.relative_to(folder)): path.stat().st_size for path in folder.rglob("*") if path.is_file()}
        (folder / rank_marker(rank)).write_text(json.dumps(files, sort_keys=True))
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
        tag = state.deepspeed_tag
        prefix = join(uri, DEEPSPEED_DIR, tag)
        for file_uri in storage.list_files(prefix):
            local = Path(folder) / tag / file_uri[len(prefix) + 1 :]
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(storage.read_bytes(file_uri))
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
