"""A run's checkpoints as the trainer writes and restores them: by every rank, consolidated.

The format (file names, state, completeness, finding the latest) is ``hlip_ray/run_checkpoint.py``'s. Every
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
from pathlib import Path

import torch

from hlip_ray.config import Config, dump_config
from hlip_ray.run_checkpoint import (
    CONFIG_FILE,
    DEEPSPEED_DIR,
    MODEL_FILE,
    STATE_FILE,
    TrainState,
    checkpoint_dir_name,
    rank_marker,
)
from hlip_ray.storage import Storage, join

logger = logging.getLogger(__name__)


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
