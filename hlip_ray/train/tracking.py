"""Where training metrics go: ``metrics.jsonl``, TensorBoard and the console (always), MLflow / W&B
(when configured).

Rank 0 sends every step's metrics (``StepLog``) to the run's ``RunLog`` actor, which the driver
starts on its own node: it appends them to ``log_dir/metrics.jsonl``, writes TensorBoard events to
``log_dir/tensorboard`` (``tensorboard --logdir runs``) and composes progress lines, which the
driver prints (``print_progress``): one every ``PROGRESS_SECONDS`` with step, loss, studies/s,
data-wait share and ETA, and one per checkpoint with the validation AUC. ``ray.train.report``
carries flat scalars only (the loop's reports, for Ray and Tune). MLflow and Weights & Biases are
reached through Ray's own integrations from the rank-0 worker (``ExperimentTrackers``). Metrics
are numbers only: no report text or patient field is ever logged.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
import warnings
from pathlib import Path

import ray
from ray.train.v2.api.callback import UserCallback

from hlip_ray.config import Config
from hlip_ray.progress import Progress, duration, is_terminal

PROGRESS_SECONDS = 30.0   # at most one progress line per this many seconds (checkpoint lines apart)
COPY_SECONDS = 60.0       # at most one copy of the metrics to shared storage per this many seconds (checkpoints apart)


def numeric(metrics: dict) -> dict[str, float]:
    """The finite numeric metrics (booleans as 0/1)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            out[key] = float(value)
        elif isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)
    return out


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)   # restarted on its node if it crashes
class RunLog:
    """The run's metrics on the driver's node: ``metrics.jsonl`` (one line per step), TensorBoard,
    and the progress lines the driver prints (``take_lines``)."""

    def __init__(self, log_dir: str, max_steps: int, copy_to: str | None = None, storage_config: dict | None = None
                 ) -> None:
        self.log_dir = Path(log_dir)
        self.max_steps = max_steps
        # Where the files are copied to (``copy_to``: the run's folder on S3 or a shared mount, which outlives
        # the cluster): at every checkpoint, at most every COPY_SECONDS between, and at the end. That copy is
        # the run's record: a run resumed on another cluster (or a run of the same name on other storage)
        # starts its local metrics.jsonl from it, so the copy keeps every step of the run and no other's.
        self.copy_to, self.storage_config, self.copied = copy_to, storage_config, 0.0
        if copy_to:
            self._take_up_copy()
        self.lines: list[str] = []
        self.started = self.last_line = None
        self.first_step = 0
        self.losses: list[float] = []
        self.latest: dict[str, float] | None = None   # the last step's figures, for a bar in a terminal
        self._writer = None

    def log_step(self, values: dict[str, float], at: float, checkpoint: str | None = None) -> None:
        """One step's metrics (``numeric``), ``at`` the time (``time.time()`` on rank 0) the step ended."""
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(str(self.log_dir / "tensorboard"))
        with open(self.log_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps({**values, "time": round(at, 3), "checkpoint": checkpoint}) + "\n")
        step = int(values["step"])
        for key, value in values.items():
            self._writer.add_scalar(key, value, step)
        self._progress(values, at, checkpoint)
        if self.copy_to and (checkpoint is not None or time.monotonic() - self.copied >= COPY_SECONDS):
            self._copy()

    def _storage(self):
        from hlip_ray.config import StorageConfig
        from hlip_ray.storage import Storage

        return Storage.from_config(StorageConfig.model_validate(self.storage_config or {}))

    def _take_up_copy(self) -> None:
        """The local metrics.jsonl as the copy has it (empty where there is none yet), unless it goes on from
        the copy (this actor restarted on its node: the lines since the last copy are kept)."""
        from hlip_ray.storage import join

        storage, uri = self._storage(), join(self.copy_to, "metrics.jsonl")
        copy = storage.read_bytes(uri) if storage.exists(uri) else b""
        local = self.log_dir / "metrics.jsonl"
        if copy and local.is_file() and local.read_bytes().startswith(copy):
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        local.write_bytes(copy)

    def _copy(self) -> None:
        """``metrics.jsonl`` and the TensorBoard event files, whole, to ``copy_to`` (same names below it)."""
        from hlip_ray.storage import join

        if self._writer is not None:
            self._writer.flush()
        storage = self._storage()
        for path in sorted(self.log_dir.rglob("*")):
            if path.is_file():
                storage.write_bytes(join(self.copy_to, *path.relative_to(self.log_dir).parts), path.read_bytes())
        self.copied = time.monotonic()

    def _progress(self, values: dict[str, float], now: float, checkpoint: str | None) -> None:
        step = int(values["step"])
        if self.started is None:   # the clock starts at the first step this run log sees
            self.started, self.last_line, self.first_step = now, now, step
        self.losses.append(values["loss"])
        self.latest = {key: values[key] for key in ("step", "loss", "lr", "studies_per_s", "data_wait_fraction")}
        due = step == self.first_step or step == self.max_steps or now - self.last_line >= PROGRESS_SECONDS
        if due:
            self.lines.append(progress_line(values, sum(self.losses) / len(self.losses), self.max_steps,
                                            elapsed=now - self.started, steps_done=step - self.first_step))
            self.last_line, self.losses = now, []
        if checkpoint is not None:
            self.lines.append(checkpoint_line(values, checkpoint))
        elif values.get("val/step") == step:
            self.lines.append(f"validation at step {step}: {validation_text(values)}")

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()
        if self.copy_to and self._writer is not None:
            self._copy()

    def take(self) -> tuple[list[str], dict[str, float] | None]:
        """The lines composed since the last call, and the last step's figures."""
        lines, self.lines = self.lines, []
        return lines, self.latest


def start_run_log(log_dir: Path, max_steps: int, copy_to: str | None = None, storage_config: dict | None = None):
    """A ``RunLog`` on this (the driver's) node, where ``log_dir`` is; with ``copy_to``, its files are copied
    there too (``storage_config``: the config's ``storage`` section, as JSON)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return RunLog.options(scheduling_strategy=here).remote(str(log_dir), max_steps, copy_to, storage_config)


def progress_line(values: dict[str, float], mean_loss: float, max_steps: int, *, elapsed: float,
                  steps_done: int) -> str:
    """``step 120/800 (15%)  loss 2.413  lr 3.0e-03  29.1 studies/s  data wait 2%  elapsed 1m05s  ETA 6m08s``
    (the loss is the mean over the steps since the previous line; ``elapsed`` runs from the first
    step, and the ETA is the rate since then, validations included)."""
    step = int(values["step"])
    eta = elapsed / steps_done * (max_steps - step) if steps_done else float("nan")
    return (f"step {step}/{max_steps} ({100 * step / max_steps:.0f}%)  loss {mean_loss:.3f}  lr {values['lr']:.1e}  "
            f"{values['studies_per_s']:.1f} studies/s  data wait {100 * values['data_wait_fraction']:.0f}%  "
            f"elapsed {duration(elapsed)}  ETA {duration(eta)}")


def checkpoint_line(values: dict[str, float], checkpoint: str) -> str:
    """``checkpoint at step 100: val zero-shot AUC 0.712 (hemorrhage 0.70, ...); val loss 2.31, R@1/5/10
    0.12/0.41/0.63 -> URI`` (the AUC where there is a label vocabulary), or ``checkpoint at step 100
    (latest validation at step 50: ...)`` between validations."""
    step, measured = int(values["step"]), values.get("val/step")
    if measured is not None and int(measured) != step:
        return f"checkpoint at step {step} (latest validation at step {int(measured)}: {validation_text(values)}) " \
               f"-> {checkpoint}"
    return f"checkpoint at step {step}: {validation_text(values)} -> {checkpoint}"


def validation_text(values: dict[str, float]) -> str:
    """A validation's metrics as a person reads them, and which are undefined and why. ``values`` are
    ``numeric``: an undefined figure (NaN) is absent. ``val/studies`` is there whenever a val split was
    validated, ``val/labels`` (the vocabulary's size) whenever a zero-shot AUC was asked for."""
    if "val/studies" not in values:
        return "no validation (no val split)"
    studies, labels = int(values["val/studies"]), values.get("val/labels")
    shown = []
    auc = values.get("val/zeroshot_auc")
    if auc is not None:
        per_label = [f"{key.removeprefix('val/auc/')} {value:.3f}" for key, value in values.items()
                     if key.startswith("val/auc/")]
        undefined = int(labels) - len(per_label) if labels is not None else 0
        if undefined > 0:
            per_label.append(f"{undefined} label(s) undefined: one class in val")
        shown.append(f"val zero-shot AUC {auc:.3f}" + (f" ({', '.join(per_label)})" if per_label else ""))
    if studies <= 2:   # evaluate ranks nothing in a smaller set
        shown.append(f"val split of {studies} stud{'y' if studies == 1 else 'ies'}: too few for loss and retrieval")
    else:
        loss = values.get("val/loss")
        shown.append(f"val loss {loss:.3f}" if loss is not None else "val loss not finite")
        ks = [k for k in (1, 5, 10) if f"val/retrieval_r@{k}" in values]   # a k of the set's size or more is left out
        if ks:
            recalls = "/".join(f"{values[f'val/retrieval_r@{k}']:.2f}" for k in ks)
            shown[-1] += f", R@{'/'.join(str(k) for k in ks)} {recalls}"
    if auc is None and labels is not None:
        shown.append(f"zero-shot AUC undefined (no label has both classes among the {studies} val studies)")
    return "; ".join(shown)


def print_progress(run_log, stop: threading.Event, max_steps: int, every_s: float = 2.0) -> None:
    """Print the run log's lines as they come, until ``stop`` is set (then the rest), on stdout: in a terminal a
    bar of steps (loss, lr, studies/s, data wait) with the checkpoint and validation lines above it, in a log
    the progress lines themselves."""
    stream = sys.stdout
    bar = Progress("train", max_steps, stream=stream, unit="steps") if is_terminal(stream) else None
    while True:
        stopping = stop.wait(every_s if bar is None else min(every_s, 0.5))
        try:
            lines, latest = ray.get(run_log.take.remote())
        except ray.exceptions.RayError:
            break
        for line in lines:
            if bar is None:
                print(line, file=stream, flush=True)
            elif not line.startswith("step "):   # the bar says it
                bar.write(line)
        if bar is not None and latest is not None:
            bar.update(int(latest["step"]), f"loss {latest['loss']:.3f}  lr {latest['lr']:.1e}  "
                                            f"{latest['studies_per_s']:.1f} studies/s  "
                                            f"data wait {100 * latest['data_wait_fraction']:.0f}%")
        if stopping:
            break
    if bar is not None:
        bar.close()


class StepLog:
    """The worker side: rank 0 sends every step to the ``RunLog`` and the experiment trackers."""

    def __init__(self, run_log, rank: int, trackers: ExperimentTrackers) -> None:
        self.run_log = run_log if rank == 0 else None
        self.trackers = trackers
        self.sent = None   # the previous step's call

    def step(self, metrics: dict, checkpoint: str | None = None) -> None:
        if self.run_log is None:
            return
        values = numeric(metrics)
        # One call in flight: a call that Ray retries (the run log on another node, a connection dropped)
        # can run after the next one, and metrics.jsonl would list steps out of order. The previous step's
        # call has long finished when the next step ends.
        if self.sent is not None:
            ray.get(self.sent)
        self.sent = self.run_log.log_step.remote(values, time.time(), checkpoint)
        self.trackers.log(values, int(values["step"]))

    def close(self) -> None:
        """Wait until the run log has every step written (and copied, where it is copied)."""
        if self.run_log is not None:
            ray.get(self.run_log.flush.remote())


class ExperimentTrackers:
    """MLflow and W&B on the rank-0 worker, when ``train.mlflow_tracking_uri`` / ``train.wandb_project`` are set."""

    def __init__(self, config: Config, rank: int) -> None:
        self.loggers = []
        if rank != 0:
            return
        train = config.train
        settings = {"model": config.model.model_dump(mode="json"), "train": train.model_dump(mode="json")}
        if train.mlflow_tracking_uri:
            from ray.air.integrations.mlflow import setup_mlflow

            mlflow = setup_mlflow(settings, tracking_uri=train.mlflow_tracking_uri, experiment_name=train.run_name,
                                  create_experiment_if_not_exists=True, rank_zero_only=True)
            # MLflow's names take no "@" (val/retrieval_r@5 -> val_retrieval_r_at_5).
            self.loggers.append(lambda values, step: mlflow.log_metrics(
                {key.replace("/", "_").replace("@", "_at_"): value for key, value in values.items()}, step=step))
        if train.wandb_project:
            from ray.air.integrations.wandb import setup_wandb

            wandb = setup_wandb(settings, project=train.wandb_project, name=train.run_name, rank_zero_only=True)
            self.loggers.append(lambda values, step: wandb.log(values, step=step))

    def log(self, values: dict[str, float], step: int) -> None:
        """One step's metrics (``numeric``) to every tracker."""
        for log in self.loggers:
            log(values, step)


def quiet_worker_console() -> None:
    """Keep a training worker's console (which reaches the driver's) to what a person reads.

    Ray Train 2.60 logs every ``ray.train.report`` at INFO on every rank, under a logger named by its
    file path, so ``RunConfig``'s log level does not reach it, and every checkpoint's storage path on
    every rank: both dropped here from the console only (Ray's ``ray-train-*-worker`` log files keep
    them; the driver prints one line per checkpoint). Ray Data logs the start and end of the
    validation stream's execution at every validation on every rank: its INFO stays in its
    ``ray-data`` log file. DeepSpeed's import warns on CPU that no CUDA runtime is found, and its
    checkpoints call a torch collective that torch has deprecated (a warning at every checkpoint,
    nothing for a user to act on). A worker that stops because a peer is gone (``loop.PeerLost``) says so
    in one line, instead of Ray Train's "Error in training function" and the collective's traceback.
    """
    from ray.train.v2._internal import util
    from ray.train.v2._internal.execution import context, storage

    class RayTrainChatter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.name == util.__name__ and record.levelno == logging.ERROR:
                one_line(record, peer_lost_line(record.getMessage()))
            return record.name != context.__file__ and not (
                record.name == storage.__name__ and record.levelno < logging.WARNING)

    for handler in logging.getLogger().handlers:
        if type(handler).__name__ == "PlainRayHandler":
            handler.addFilter(RayTrainChatter())
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ == "PlainRayHandler":
            handler.addFilter(lambda record: record.levelno >= logging.WARNING)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


PEER_LOST = "hlip_ray.train.loop.PeerLost: "   # how a traceback's last line names ``loop.PeerLost``


def peer_lost_line(text: str) -> str | None:
    """``loop.PeerLost``'s one-line message where ``text`` (a formatted traceback, or a message ending with one)
    ends with it; else None."""
    lines = text.rstrip().splitlines()
    if lines and lines[-1].startswith(PEER_LOST):
        return lines[-1].removeprefix(PEER_LOST)
    return None


def one_line(record: logging.LogRecord, line: str | None) -> None:
    """``record`` shown as ``line`` alone, where ``line`` is given. Filters of the console handler call it: Ray's
    handlers of the same logger (its log files) come first in its list, and have written the record whole."""
    if line is not None:
        record.msg, record.args, record.exc_info, record.exc_text = line, None, None, None


class OneLineRestarts(UserCallback):
    """In the run's Train controller: a restart of the worker group because a worker died (its process
    killed, its node lost) in one console line, ``worker group restarting from its latest checkpoint (failure
    1 of 2 allowed): rank 0 died (process 4242); rank 1 stopped: lost its peer``, instead of Ray Train's
    report of every worker's error with its traceback and the traceback of the backend's shutdown, which a
    crashed worker makes fail as Ray expects. Ray's controller log keeps them; other failures, and the last
    one (no restart left), are shown as Ray shows them."""

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        # Before Ray Train's failure policy logs its decision on these errors.
        for handler in logging.getLogger("ray.train").handlers:
            if type(handler).__name__ == "PlainRayHandler" and not any(
                    isinstance(existing, RestartLine) for existing in handler.filters):
                handler.addFilter(RestartLine())


class RestartLine(logging.Filter):
    """The console filter ``OneLineRestarts`` puts on the controller's ``ray.train`` console handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        from ray.exceptions import RayActorError
        from ray.train.v2._internal.callbacks import backend_setup
        from ray.train.v2._internal.execution.failure_handling import default

        error = record.exc_info[1] if record.exc_info else None
        if record.name == backend_setup.__name__ and isinstance(error, RayActorError):
            return False   # "Graceful shutdown of backend failed. This is expected if one of the workers has crashed."
        if record.name == default.__name__ and str(record.msg).startswith("[FailurePolicy] RETRY"):
            one_line(record, restart_line(error, str(record.msg)))
        return True


def restart_line(error, decision: str) -> str | None:
    """The line for a restart after ``error`` (Ray Train's ``WorkerGroupError``; ``decision``: its failure
    policy's message), where every worker's failure is its death or ``loop.PeerLost``; else None."""
    import re

    from ray.exceptions import RayActorError
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    if not isinstance(error, WorkerGroupError) or not error.worker_failures:
        return None
    parts = []
    for rank, failure in sorted(error.worker_failures.items()):
        if isinstance(failure, WorkerHealthCheckFailedError) and isinstance(failure.health_check_failure,
                                                                            RayActorError):
            pid = re.search(r"\bpid=(\d+)", str(failure))
            parts.append(f"rank {rank} died" + (f" (process {pid.group(1)})" if pid else ""))
        elif f"{type(failure).__module__}.{type(failure).__qualname__}: " == PEER_LOST or \
                peer_lost_line(str(failure)) is not None:   # the worker's exception, or its traceback
            parts.append(f"rank {rank} stopped: lost its peer")
        else:
            return None
    allowed = ""
    count = re.search(r"Error count: (\d+) \(max allowed: (-?\d+)\)", decision)
    if count:
        failures, most = count.groups()
        allowed = f" (failure {failures} of {most} allowed)" if int(most) >= 0 else f" (failure {failures})"
    return f"worker group restarting from its latest checkpoint{allowed}: {'; '.join(parts)}"
