"""Where training metrics go: TensorBoard and ``metrics.jsonl`` (always), MLflow / W&B (when configured).

``MetricsLogger`` is a Ray Train callback on the controller: after every report it writes rank
0's metrics to ``log_dir/metrics.jsonl`` and to TensorBoard events in ``log_dir/tensorboard``
(``tensorboard --logdir runs``). MLflow and Weights & Biases are reached through Ray's own
integrations (``setup_mlflow`` / ``setup_wandb``) from the rank-0 worker (``ExperimentTrackers``).
Metrics are numbers only: no report text or patient field is ever logged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ray.train import UserCallback

from hlip_ray.config import Config


def numeric(metrics: dict) -> dict[str, float]:
    """The finite numeric metrics (booleans as 0/1)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            out[key] = float(value)
        elif isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)
    return out


# A report's list of the metrics of every step since the previous report (``train.report_every``).
STEPS_KEY = "steps"


class MetricsLogger(UserCallback):
    """Rank 0's reports -> ``metrics.jsonl`` and TensorBoard: one line and one point per training step."""

    def __init__(self, log_dir: Path, config: Config) -> None:
        self.log_dir = Path(log_dir)
        self.run_name = config.train.run_name
        self._writer = None

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if not metrics or "step" not in metrics[0]:
            return
        steps = metrics[0].get(STEPS_KEY) or [metrics[0]]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir / "tensorboard"))
        with open(self.log_dir / "metrics.jsonl", "a") as handle:
            for index, step_metrics in enumerate(steps):
                values = numeric(step_metrics)
                at_checkpoint = checkpoint is not None and index == len(steps) - 1
                handle.write(json.dumps({**values, "checkpoint": checkpoint.path if at_checkpoint else None}) + "\n")
                for key, value in values.items():
                    self._writer.add_scalar(key, value, int(values["step"]))
        self._writer.flush()


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
            self.loggers.append(lambda values, step: mlflow.log_metrics(
                {key.replace("/", "_"): value for key, value in values.items()}, step=step))
        if train.wandb_project:
            from ray.air.integrations.wandb import setup_wandb

            wandb = setup_wandb(settings, project=train.wandb_project, name=train.run_name, rank_zero_only=True)
            self.loggers.append(lambda values, step: wandb.log(values, step=step))

    def log(self, metrics: dict, step: int) -> None:
        values = numeric(metrics)
        for log in self.loggers:
            log(values, step)
