"""One trial of a sweep: a whole distributed training run, reporting to Tune.

The trial fits its ``TorchTrainer`` in a thread; a Ray Train callback (``ReportToTrial``) hands each
report of the run (rank 0's metrics, and the checkpoint's URI at a checkpoint step) over a queue to the
trial, which reports it to Tune. A checkpoint step is reported with a Tune checkpoint that holds only a
pointer to the Train checkpoint (``train_checkpoint.json``): the weights stay where the run wrote them,
once. Tune hands that pointer back when it restarts the trial: a trial resuming itself (a sweep's
``--resume``, a PBT pause) finds its own run and resumes it; a PBT trial given a leading trial's pointer
starts a run of its own (``<trial run>-<digest>``) that continues the leader's checkpoint with the
trial's perturbed values.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
from pathlib import Path
from typing import Any

from ray.train.v2.api.callback import UserCallback

from hlip_ray.config import Config, config_from_dict, with_values

POINTER_FILE = "train_checkpoint.json"


def trial_run_name(config: Config, trial_id: str) -> str:
    return f"{config.tune.name}-{trial_id}"


class ReportToTrial(UserCallback):
    """In the run's Train controller: every report, as ``(metrics, checkpoint URI or None)``, onto the
    trial's queue (which holds one, so training waits for Tune as it does with Tune's own callback)."""

    def __init__(self, queue, storage_path: str) -> None:
        self.queue = queue
        self.s3 = storage_path.startswith("s3://")

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        uri = None
        if checkpoint is not None:
            uri = f"s3://{checkpoint.path}" if self.s3 else checkpoint.path
        self.queue.put((dict(metrics[0]), uri))


def run_trial(values: dict[str, Any], base: dict[str, Any]) -> None:
    """Tune's function trainable: the base config with the trial's values, trained to the end (or until
    Tune stops or pauses it)."""
    from ray import tune
    from ray.util.queue import Empty, Queue

    from hlip_ray.train.run import fit

    trial_id = tune.get_context().get_trial_id()
    config = config_from_dict(base, "sweep")
    run_name, resume_from, lineage = _trial_run(config, trial_id, values, tune.get_checkpoint())
    config = with_values(config, {**values, "train.run_name": run_name}, source=f"trial {run_name}")
    reports = Queue(maxsize=1, actor_options={"num_cpus": 0})
    failure: list[BaseException] = []

    def train() -> None:
        try:
            fit(config, resume_from=resume_from, callbacks=(ReportToTrial(reports, config.train.storage_path),),
                progress=False)
        except BaseException as error:   # raised again in the trial's own thread, where Tune sees it
            failure.append(error)

    thread = threading.Thread(target=train, name="trial-run", daemon=True)
    thread.start()
    while True:
        try:
            metrics, uri = reports.get(timeout=1.0)
        except Empty:
            if thread.is_alive():
                continue
            if reports.empty():
                break
            continue
        if uri is None:
            tune.report({**metrics, **lineage})
            continue
        with tempfile.TemporaryDirectory(prefix="hlip-trial-checkpoint-") as folder:   # Tune copies it
            (Path(folder) / POINTER_FILE).write_text(json.dumps(
                {"uri": uri, "trial_id": trial_id, "run_name": run_name, "step": metrics.get("step", 0)}))
            tune.report({**metrics, **lineage}, checkpoint=tune.Checkpoint.from_directory(folder))
    if failure:
        raise failure[0]


def _trial_run(config: Config, trial_id: str, values: dict[str, Any], checkpoint) -> tuple[str, str | None, dict]:
    """``(run name, checkpoint to continue, lineage metrics)`` for a trial (re)started with ``checkpoint``
    (Tune's, or None)."""
    own = trial_run_name(config, trial_id)
    if checkpoint is None:
        return own, None, {}
    with checkpoint.as_directory() as folder:
        pointer = json.loads((Path(folder) / POINTER_FILE).read_text())
    if pointer["trial_id"] == trial_id:
        return pointer["run_name"], None, {}
    digest = hashlib.sha256(json.dumps([pointer["uri"], values], sort_keys=True, default=str).encode()).hexdigest()
    return f"{own}-{digest[:8]}", pointer["uri"], {"cloned_from": f"{pointer['trial_id']} step {pointer['step']}"}

