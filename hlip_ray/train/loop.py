"""The training worker: what every Ray Train worker runs (``train_loop``).

Read top to bottom: build the model and its DeepSpeed engine, resume from the run's latest
checkpoint, then for each global step take this worker's share of the global batch from
``get_dataset_shard("train")``, run the gradient-cache step, step the optimizer, report; every
``train.checkpoint_every`` steps validate (zero-shot AUC) and write a checkpoint from every rank.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from hlip_ray.checkpoints import (
    DEEPSPEED_DIR,
    TrainState,
    latest_checkpoint,
    load_model,
    rank_marker,
    save_model_files,
)
from hlip_ray.config import Config, config_from_dict
from hlip_ray.data.pipeline import collate_study_batch
from hlip_ray.data.storage import Storage, join
from hlip_ray.eval.zeroshot import auc_report, class_embeddings, load_vocabulary, zeroshot_scores
from hlip_ray.model import build_model, load_tokenizer
from hlip_ray.model.randomness import study_seed
from hlip_ray.train.engine import build_engine
from hlip_ray.train.grad_cache import contrastive_step
from hlip_ray.train.tracking import STEPS_KEY, ExperimentTrackers

logger = logging.getLogger(__name__)

VAL_METRIC = "val/zeroshot_auc"
FROZEN_TEXT_CACHE = 100_000  # pooled outputs of a frozen text tower kept per worker


def train_loop(loop_config: dict) -> None:
    """Ray Train worker entry point. ``loop_config``: ``config`` (a Config as a dict), ``run_dir``
    (where this run's checkpoints are), ``train_studies``, ``init_checkpoint`` and ``provenance``."""
    config = config_from_dict(loop_config["config"], "train_loop_config")
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    storage = Storage.from_config(config.storage)
    device = _device(config)
    train = config.train
    local_batch = train.global_batch_size // world_size
    if local_batch * world_size != train.global_batch_size or local_batch % train.chunk_size:
        raise ValueError(
            f"train.global_batch_size {train.global_batch_size} does not split into {world_size} workers "
            f"x chunks of train.chunk_size {train.chunk_size}"
        )

    torch.manual_seed(train.seed)
    model = build_model(config)
    resume = latest_checkpoint(loop_config["run_dir"], storage)
    if resume is None and loop_config.get("init_checkpoint"):
        initial, _ = load_model(loop_config["init_checkpoint"], storage, config)
        model.load_state_dict(initial.state_dict())
    if config.model.text.frozen and train.zero_stage < 3:
        model.text.cache_pooled(max_entries=FROZEN_TEXT_CACHE)  # reports repeat every epoch
    model.to(device)
    resized = resume is not None and resume[1].world_size != world_size
    engine, _, scheduler = build_engine(model, config, world_size, load_universal=resized)

    state = TrainState(seed=train.seed, world_size=world_size, global_batch_size=train.global_batch_size,
                       provenance=loop_config.get("provenance", {}))
    if resume is not None:
        state = _restore(engine, resume, storage, world_size)
        # The lr is a function of the step under this run's schedule (max_steps may have grown).
        scheduler.last_epoch = state.step - 1
        scheduler.step()
        state.world_size = world_size
        logger.info("resumed from %s at step %d, position %d", resume[0], state.step, state.position)
    validator = Validator(config, storage, rank, world_size)
    trackers = ExperimentTrackers(config, rank)
    if resume is None:  # a first value, so that every report carries one
        state.val_zeroshot_auc = validator.run(engine)[VAL_METRIC]
    metrics = {VAL_METRIC: state.val_zeroshot_auc}  # reports between checkpoints carry the last value

    shard = ray.train.get_dataset_shard("train")
    batches = iter(shard.iter_torch_batches(batch_size=local_batch, collate_fn=collate_study_batch,
                                            drop_last=True, prefetch_batches=2))
    engine.train()
    unreported: list[dict] = []   # metrics of the steps since the last ray.train.report
    while state.step < train.max_steps:
        started = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            logger.warning("the training stream ended at step %d of %d", state.step, train.max_steps)
            break
        waited = time.perf_counter() - started
        positions = batch["position"]
        inputs = {key: batch[key].to(device) for key in ("pixels", "scan_mask", "input_ids", "attention_mask")}
        inputs["study_seeds"] = torch.tensor([study_seed(train.seed, state.step, int(p)) for p in positions])
        result = contrastive_step(
            engine, lambda surrogate: engine.backward(surrogate, scale_wrt_gas=False), inputs,
            loss=config.model.loss, chunk_size=train.chunk_size, text_frozen=config.model.text.frozen,
        )
        lr = scheduler.get_last_lr()[0]  # the lr this step's update uses; step() advances the schedule
        engine.step()
        all_positions = _gather(positions)
        state.step += 1
        state.position = int(all_positions.max()) + 1
        state.epoch = state.position // loop_config["train_studies"]
        seconds = time.perf_counter() - started
        metrics.update({
            "step": state.step,
            "epoch": state.epoch,
            "position": state.position,
            "loss": result.loss,
            "logit_scale": result.logit_scale,
            "lr": lr,
            "studies_per_s": train.global_batch_size / seconds,
            "data_wait_fraction": waited / seconds,
            # every step takes the next G positions of the data order, whatever the world size
            "positions_in_order": bool(torch.equal(all_positions.sort().values,
                                                   torch.arange(state.position - len(all_positions),
                                                                state.position))),
        })
        grad_norm = engine.get_global_grad_norm()  # None under ZeRO 0 (DeepSpeed does not record it)
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        checkpoint_step = state.step % train.checkpoint_every == 0 or state.step == train.max_steps
        if checkpoint_step:
            metrics.update(validator.run(engine))
            state.val_zeroshot_auc = metrics[VAL_METRIC]
        trackers.log(metrics, state.step)
        unreported.append(dict(metrics))
        if checkpoint_step:
            with tempfile.TemporaryDirectory() as folder:
                _save(engine, state, config, Path(folder), rank)
                ray.train.report({**metrics, STEPS_KEY: unreported},
                                 checkpoint=ray.train.Checkpoint.from_directory(folder),
                                 checkpoint_dir_name=f"checkpoint_{state.step:08d}")
            unreported = []
        elif state.step % train.report_every == 0:  # the last step is a checkpoint step
            ray.train.report({**metrics, STEPS_KEY: unreported})
            unreported = []
    if unreported:  # the stream ended early: the last steps still reach the logs
        ray.train.report({**metrics, STEPS_KEY: unreported})


def _device(config: Config) -> torch.device:
    if config.train.use_gpu and torch.cuda.is_available():
        return ray.train.torch.get_device()
    return torch.device("cpu")


def _gather(values: torch.Tensor) -> torch.Tensor:
    """All workers' 1-D int tensors concatenated (rank order)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    parts = [torch.empty_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, values.contiguous())
    return torch.cat(parts)


# -- checkpoints ---------------------------------------------------------------------------
def _consolidated_state_dict(engine, zero_stage: int) -> dict | None:
    """The full model weights on rank 0 (a collective under ZeRO-3); None on other ranks."""
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict() if dist.get_rank() == 0 else None


def _save(engine, state: TrainState, config: Config, folder: Path, rank: int) -> None:
    """This rank's part of a checkpoint: its DeepSpeed shards (+ on rank 0 the model, config, state)."""
    state.deepspeed_tag = f"step{state.step}"
    engine.save_checkpoint(str(folder / DEEPSPEED_DIR), tag=state.deepspeed_tag)
    weights = _consolidated_state_dict(engine, config.train.zero_stage)
    if rank == 0:
        save_model_files(folder, weights, config, state)
    (folder / rank_marker(rank)).write_text("")


def _restore(engine, found: tuple[str, TrainState], storage: Storage, world_size: int) -> TrainState:
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
    return state


# -- validation ----------------------------------------------------------------------------
class Validator:
    """Zero-shot classification of the held-out split (``val`` dataset) with the label vocabulary.

    Every worker reads the whole validation stream and encodes every ``world_size``-th study;
    the embeddings are gathered and every worker computes the same macro AUC.
    """

    def __init__(self, config: Config, storage: Storage, rank: int, world_size: int) -> None:
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.vocabulary = None
        if config.eval.vocabulary:
            self.vocabulary = load_vocabulary(storage.read_bytes(config.eval.vocabulary), config.eval.vocabulary)
            self.tokenizer = load_tokenizer(config.model.text.name_or_path)

    @torch.no_grad()
    def run(self, engine) -> dict[str, float]:
        if self.vocabulary is None:
            return {VAL_METRIC: float("nan")}
        val_shard = ray.train.get_dataset_shard("val")
        model = engine.module
        model.eval()
        try:
            with _full_parameters(engine, self.config.train.zero_stage):
                embeddings, labels = [], []
                for index, batch in enumerate(val_shard.iter_torch_batches(
                        batch_size=self.config.eval.batch_size, collate_fn=collate_study_batch)):
                    if index % self.world_size != self.rank:
                        continue
                    pixels = batch["pixels"].to(next(model.parameters()).device)
                    embeddings.append(model.encode_study(pixels, batch["scan_mask"]).float().cpu().numpy())
                    labels += batch["labels"]
                classes = class_embeddings(model, self.tokenizer, self.vocabulary,
                                           self.config.model.text.context_length)
        finally:
            model.train()
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, (embeddings, labels))
        all_embeddings = [e for part, _ in gathered for e in part]
        all_labels = [label for _, part in gathered for label in part]
        if not all_embeddings:
            return {VAL_METRIC: float("nan")}
        report = auc_report(zeroshot_scores(torch.from_numpy(np.concatenate(all_embeddings)), classes), all_labels)
        out = {VAL_METRIC: report["macro_auc"], "val/studies": report["studies"]}
        out.update({f"val/auc/{label}": auc for label, auc in report["per_label"].items()})
        return out


class _full_parameters:
    """Under ZeRO-3, gather every parameter for a forward outside the lockstep of training."""

    def __init__(self, engine, zero_stage: int) -> None:
        self.context = None
        if zero_stage == 3:
            import deepspeed

            self.context = deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)

    def __enter__(self):
        if self.context is not None:
            self.context.__enter__()

    def __exit__(self, *exc):
        if self.context is not None:
            self.context.__exit__(*exc)

