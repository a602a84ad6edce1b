"""The training worker: what every Ray Train worker runs (``train_loop``).

Read top to bottom: ``start`` builds the model and its DeepSpeed engine and resumes from the run's
latest checkpoint; every global step then takes this worker's share of the global batch from
``get_dataset_shard("train")`` and runs the gradient-cache step (``train_step``); every
``train.validate_every`` steps all workers validate (the evaluation code's own path), every
``train.checkpoint_every`` steps they write a checkpoint (both also at the last step), and between
those a flat report goes to Ray every ``train.report_every`` steps. ``Reclaim`` watches for a reclaim
notice (a drain of a node of the run) and checkpoints before the node goes. Rank 0 sends every step's
metrics to the run's log (``tracking.RunLog``: ``metrics.jsonl``, TensorBoard, the console's progress
lines). A worker whose peer is gone (killed, its node lost) stops with one line (``PeerLost``), and Ray
Train restarts the group.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import ray.train
import torch

from hlip_ray.config import Config, config_from_dict
from hlip_ray.data.streams import collate_study_batch
from hlip_ray.eval.held_out import evaluate
from hlip_ray.eval.zeroshot import load_vocabulary
from hlip_ray.inference.trained_model import load_model
from hlip_ray.model import build_model
from hlip_ray.model.randomness import study_seed
from hlip_ray.run_checkpoint import TrainState, checkpoint_dir_name, resume_point
from hlip_ray.storage import Storage, join
from hlip_ray.text_source import load_tokenizer
from hlip_ray.train.checkpoints import report_checkpoint, restore_checkpoint
from hlip_ray.train.engine import build_engine, continue_schedule
from hlip_ray.train.gather import gather_global
from hlip_ray.train.grad_cache import SENTENCE_TENSORS, contrastive_step
from hlip_ray.train.tracking import ExperimentTrackers, StepLog, quiet_worker_console

logger = logging.getLogger(__name__)

VAL_METRIC = "val/zeroshot_auc"
FROZEN_TEXT_CACHE = 100_000  # pooled outputs of a frozen text tower kept per worker
RECLAIM_MARGIN_S = 5.0   # kept free before a reclaim deadline, beyond a step and a checkpoint


@dataclass(frozen=True)
class LoopConfig:
    """What the driver hands every worker (``TorchTrainer``'s ``train_loop_config`` holds ``as_dict()``)."""

    config: dict                         # the run's Config, as a dict
    run_dir: str                         # where this run's checkpoints are
    train_studies: int                   # studies in the training split: an epoch
    run_log: Any = None                  # the RunLog actor (tracking.py); None: no metrics sent
    init_checkpoint: str | None = None   # initial weights of a new run (a run checkpoint or an HLIP file)
    resume_from: str | None = None       # another run's checkpoint this one continues (a PBT trial's)
    provenance: dict = field(default_factory=dict)
    validate: bool = False               # whether there is a val split to validate on

    def as_dict(self) -> dict:
        """The fields as they are (no copies: ``run_log`` is an actor handle)."""
        return {item.name: getattr(self, item.name) for item in fields(self)}


def train_loop(loop_config: dict) -> None:
    """Ray Train worker entry point: ``loop_config`` is a ``LoopConfig.as_dict()``."""
    quiet_worker_console()
    context = ray.train.get_context()
    with stop_on_lost_peer(context.get_world_rank(), context.get_world_size()):
        train(LoopConfig(**loop_config))


def train(loop: LoopConfig) -> None:
    """The training loop of one worker (``train_loop``)."""
    worker = Worker.create(loop)
    engine, scheduler, state, resumed = start(worker, loop)
    validate = Validation(worker, loop.validate)
    log = StepLog(loop.run_log, worker.rank, ExperimentTrackers(worker.config, worker.rank))
    train = worker.config.train
    validate_every = train.validate_every or train.checkpoint_every
    validation = state.validation or {VAL_METRIC: state.val_zeroshot_auc}   # steps carry the latest validation
    if not resumed:
        validation = validate(engine, state)
    batches = training_batches(worker)
    reclaim = Reclaim(worker, train.preemption_check_every)
    resumed_from = state.step   # where this worker group started: every step says so
    while state.step < train.max_steps:
        started = time.perf_counter()
        metrics = train_step(worker, engine, scheduler, state, batches)
        if metrics is None:
            logger.warning("the training stream ended at step %d of %d", state.step, train.max_steps)
            break
        reclaim.step_s = time.perf_counter() - started
        last = state.step == train.max_steps
        # Under a reclaim notice only the steps and checkpoints that fit before the deadline run.
        validated = last or (state.step % validate_every == 0 and reclaim.deadline is None)
        if validated:
            validation = validate(engine, state)
        metrics.update(validation, resumed_from=resumed_from)
        checkpoint = state.step % train.checkpoint_every == 0 or last
        checkpoint = reclaim.check(state.step) or checkpoint
        if checkpoint:
            started = time.perf_counter()
            log.step(metrics, checkpoint=join(loop.run_dir, checkpoint_dir_name(state.step)))
            report_checkpoint(engine, state, worker.config, worker.rank, metrics)
            reclaim.checkpoint_s = time.perf_counter() - started
            if reclaim.holding and not last:
                reclaim.hold(state.step)
        else:
            log.step(metrics)
            if validated or state.step % train.report_every == 0:
                ray.train.report(metrics)
    log.close()


class PeerLost(RuntimeError):
    """This worker stops because a peer of its worker group is gone (its process killed, its node lost): a
    collective failed on the lost connection, or Ray Train, restarting the group, shut the process group down
    under it (DeepSpeed then asserts "backend not set"). Its message is one line, which is all the console
    shows of it (``tracking.quiet_worker_console``); Ray's worker log keeps the collective's traceback."""


@contextmanager
def stop_on_lost_peer(rank: int, world_size: int):
    """A failure inside that means a lost peer (``lost_peer``) raised again as ``PeerLost``; any other as it is."""
    try:
        yield
    except Exception as error:
        cause = lost_peer(error, world_size)
        if cause is None:
            raise
        raise PeerLost(f"worker rank {rank} of {world_size} stops: a peer of the worker group is gone ({cause}); "
                       "Ray Train restarts the group from its latest checkpoint while train.max_failures allows"
                       ) from error


def lost_peer(error: BaseException, world_size: int) -> str | None:
    """Why ``error`` means a peer of the worker group is gone, or None where it does not: the process group
    shut down under this worker (Ray Train initialises it before the loop starts and destroys it when it
    stops the group), or a collective's connection to a peer failed (gloo's TCP transport, torch's network
    errors)."""
    import torch.distributed as dist

    if world_size < 2 or isinstance(error, PeerLost):
        return None
    if not dist.is_initialized():
        return "the worker group's process group was shut down"
    text = str(error)
    if isinstance(error, dist.DistNetworkError) or "gloo/transport/" in text:
        # "[.../gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:34189: Connection reset by peer. This is ..."
        return text.split("] ", 1)[-1].split(". ", 1)[0].strip() or type(error).__name__
    return None


class Reclaim:
    """A reclaim notice as the training loop sees it: Ray draining a node of the run (``hlip-ray
    spot-watch`` passed the cloud's notice on), read through ``ray.train.get_preemption_info()``.

    On the notice every rank writes a checkpoint at once. Training then goes on while one more step and
    a checkpoint still fit before the node's deadline (twice their last durations, plus
    ``RECLAIM_MARGIN_S``); at the last step that fits, a last checkpoint, and the workers wait for Ray
    to restart them without the node. The restart resumes from that checkpoint: no step is lost. A drain
    without a deadline gets the first checkpoint and the wait at once.
    """

    def __init__(self, worker: Worker, every: int) -> None:
        self.worker = worker
        self.every = every
        self.deadline: float | None = None   # epoch seconds; inf when the drain gave none
        self.holding = False                 # the last checkpoint before the deadline is due or written
        self.step_s = self.checkpoint_s = 0.0

    def check(self, step: int) -> bool:
        """Whether a checkpoint is due at ``step`` because of a reclaim. Every rank calls it at every
        step and gets the same answer (both queries are collectives)."""
        if self.deadline is None:
            if step % self.every:
                return False
            info = ray.train.get_preemption_info()   # a barrier: every rank asks at the same steps
            if info is None:
                return False
            self.deadline = info.deadline_ms / 1000 if info.deadline_ms else math.inf
            left = self.deadline - time.time()
            logger.warning("reclaim notice: node(s) %s of this run are being drained, %s left; checkpoint at "
                           "step %d now", sorted(info.preempted_node_to_ranks),
                           f"{left:.0f} s" if math.isfinite(left) else "no deadline", step)
            self.holding = not math.isfinite(self.deadline) or not self._another_step_fits()
            return True
        if not self.holding and not self._another_step_fits():
            logger.warning("reclaim: the last step before the deadline; checkpoint at step %d", step)
            self.holding = True
            return True
        return False

    def _another_step_fits(self) -> bool:
        """Whether a step and a checkpoint fit before the deadline, agreed by all ranks (the smallest
        time left wins)."""
        needed = 2 * (self.step_s + self.checkpoint_s) + RECLAIM_MARGIN_S
        fits = torch.tensor([float(self.deadline - time.time() > needed)], device=self.worker.device)
        if self.worker.world_size > 1:
            torch.distributed.all_reduce(fits, op=torch.distributed.ReduceOp.MIN)
        return bool(fits.item())

    def hold(self, step: int) -> None:
        """Wait, checkpoint written, until Ray restarts the workers (at the deadline, or sooner when the
        node goes)."""
        logger.warning("reclaim: checkpoint at step %d written; waiting for the restart", step)
        while True:
            time.sleep(1)


@dataclass
class Worker:
    """This worker's place in the run: config, rank, world size, device, share of the global batch."""

    config: Config
    storage: Storage
    rank: int
    world_size: int
    device: torch.device
    local_batch: int
    train_studies: int

    @classmethod
    def create(cls, loop: LoopConfig) -> Worker:
        config = config_from_dict(loop.config, "train_loop_config")
        context = ray.train.get_context()
        rank, world_size = context.get_world_rank(), context.get_world_size()
        train = config.train
        local_batch = train.global_batch_size // world_size
        if local_batch * world_size != train.global_batch_size or local_batch % train.chunk_size:
            raise ValueError(
                f"train.global_batch_size {train.global_batch_size} does not split into {world_size} workers "
                f"x chunks of train.chunk_size {train.chunk_size}"
            )
        use_gpu = train.use_gpu and torch.cuda.is_available()
        device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
        return cls(config, Storage.from_config(config.storage), rank, world_size, device, local_batch,
                   loop.train_studies)


def start(worker: Worker, loop: LoopConfig):
    """``(engine, scheduler, state, resumed)``: the model in its DeepSpeed engine, at the run's latest
    checkpoint if it has one, else at the initial weights (``init_checkpoint``, or fresh)."""
    config, train = worker.config, worker.config.train
    torch.manual_seed(train.seed)
    model = build_model(config)
    found = resume_point(loop.run_dir, worker.storage, loop.resume_from)
    if found is None and loop.init_checkpoint:
        initial, _ = load_model(loop.init_checkpoint, worker.storage, config)
        model.load_state_dict(initial.state_dict())
    if config.model.text.frozen and train.zero_stage < 3:
        model.text.cache_pooled(max_entries=FROZEN_TEXT_CACHE)  # reports repeat every epoch
    model.to(worker.device)
    resized = found is not None and found[1].world_size != worker.world_size
    engine, _, scheduler = build_engine(model, config, worker.world_size, load_universal=resized)
    if found is None:
        state = TrainState(seed=train.seed, world_size=worker.world_size, global_batch_size=train.global_batch_size,
                           provenance=loop.provenance)
        return engine, scheduler, state, False
    state = restore_checkpoint(engine, found, worker.storage, worker.world_size)
    continue_schedule(engine, scheduler, config, state.step)
    logger.info("resumed from %s at step %d, position %d", found[0], state.step, state.position)
    return engine, scheduler, state, True


def training_batches(worker: Worker) -> Iterator[dict]:
    """This worker's share of each global batch, in the data order."""
    shard = ray.train.get_dataset_shard("train")
    return iter(shard.iter_torch_batches(batch_size=worker.local_batch, collate_fn=collate_study_batch,
                                         drop_last=True, prefetch_batches=2))


def train_step(worker: Worker, engine, scheduler, state: TrainState, batches: Iterator[dict]) -> dict | None:
    """One optimizer step on the next global batch (gradient cache, then DeepSpeed's step); advances
    ``state`` and returns the step's metrics, or None when the stream has ended."""
    config, train = worker.config, worker.config.train
    started = time.perf_counter()
    batch = next(batches, None)
    if batch is None:
        return None
    waited = time.perf_counter() - started
    positions = batch["position"]
    inputs = {key: batch[key].to(worker.device) for key in ("pixels", "scan_mask", "input_ids", "attention_mask",
                                                              *SENTENCE_TENSORS) if key in batch}
    inputs["study_seeds"] = torch.tensor([study_seed(train.seed, state.step, int(p)) for p in positions])
    result = contrastive_step(
        engine, lambda surrogate: engine.backward(surrogate, scale_wrt_gas=False), inputs,
        loss=config.model.loss, chunk_size=train.chunk_size, text_frozen=config.model.text.frozen,
        sentence_weight=config.model.sentence_loss_weight,
    )
    lr = scheduler.get_last_lr()[0]  # the lr this step's update uses; step() advances the schedule
    engine.step()
    all_positions = torch.cat(gather_global(positions.to(worker.device))).cpu()
    state.step += 1
    state.position = int(all_positions.max()) + 1
    state.epoch = state.position // worker.train_studies
    seconds = time.perf_counter() - started
    metrics = {
        "step": state.step,
        "workers": worker.world_size,
        "epoch": state.epoch,
        "position": state.position,
        "loss": result.loss,
        "logit_scale": result.logit_scale,
        "lr": lr,
        "studies_per_s": train.global_batch_size / seconds,
        "data_wait_fraction": waited / seconds,
        # every step takes the next G positions of the data order, whatever the world size
        "positions_in_order": bool(torch.equal(all_positions.sort().values,
                                               torch.arange(state.position - len(all_positions), state.position))),
    }
    grad_norm = engine.get_global_grad_norm()  # None under ZeRO 0 (DeepSpeed does not record it)
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    return metrics


class Validation:
    """The held-out split (the ``val`` dataset) through the evaluation code's ``evaluate``: contrastive
    loss and study<->report retrieval always, zero-shot AUC with a label vocabulary. Every worker reads
    the whole stream and encodes its share; the gathered result is the same on every worker."""

    def __init__(self, worker: Worker, has_val: bool) -> None:
        self.worker = worker
        self.has_val = has_val
        self.vocabulary = self.tokenizer = None
        vocabulary = worker.config.eval.vocabulary
        if vocabulary:
            self.vocabulary = load_vocabulary(worker.storage.read_bytes(vocabulary), vocabulary)
            self.tokenizer = load_tokenizer(worker.config.model.text.name_or_path)

    def __call__(self, engine, state: TrainState) -> dict[str, float]:
        """Validate the engine's model at ``state.step``; the result is also kept in ``state``."""
        metrics = {**self.measure(engine), "val/step": state.step}
        state.val_zeroshot_auc, state.validation = metrics[VAL_METRIC], metrics
        return metrics

    def measure(self, engine) -> dict[str, float]:
        if not self.has_val:
            return {VAL_METRIC: float("nan")}
        config, worker = self.worker.config, self.worker
        batches = ray.train.get_dataset_shard("val").iter_torch_batches(batch_size=config.eval.batch_size,
                                                                         collate_fn=collate_study_batch)
        model = engine.module
        model.eval()
        try:
            with full_parameters(engine, config.train.zero_stage):
                report = evaluate(model, batches, vocabulary=self.vocabulary, tokenizer=self.tokenizer,
                                  context_length=config.model.text.context_length, templates=config.eval.templates,
                                  share=(worker.rank, worker.world_size), gather=gather_global)
        finally:
            model.train()
        metrics = {VAL_METRIC: report.get("macro_auc", float("nan")), "val/loss": report["loss"],
                   "val/studies": report["studies"]}
        metrics.update({f"val/retrieval_{name}": value for name, value in report["retrieval"].items()})
        metrics.update({f"val/auc/{label}": auc for label, auc in report.get("per_label", {}).items()})
        if self.vocabulary:   # the labels an AUC was asked for (those of one class in val have none)
            metrics["val/labels"] = len(self.vocabulary)
        return metrics


class full_parameters:
    """Under ZeRO-3, every parameter gathered on every worker, for forwards outside training's lockstep."""

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
