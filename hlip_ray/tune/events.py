"""What a sweep prints: one line per trial event, instead of Tune's status table every few seconds.

    trial 3f2a1_00001 started: model.attention_layout=full data.scans_per_study=2 (2 started, 1 running)
    trial 3f2a1_00001 step 12: val/zeroshot_auc 0.612, 31.4 studies/s
    trial 3f2a1_00001 stopped early by ASHA at step 12 of 24: val/zeroshot_auc 0.612
    trial 3f2a1_00002 continues trial 3f2a1_00000 step 12 (PBT): train.lr=0.00012 model.attention_layout=h2
"""

from __future__ import annotations

import math
import os

from ray.tune import Callback


class TrialEvents(Callback):
    """Prints a line when a trial starts, is validated, ends or fails."""

    def __init__(self, keys: list[str], metric: str, max_steps: int) -> None:
        self.keys = keys
        self.metric = metric
        self.max_steps = max_steps
        self.started: set[str] = set()
        self.cloned: dict[str, str] = {}

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        """The first start only: Tune restarts a trial it paused (PBT) or resumes (``--resume``)."""
        if trial.trial_id in self.started:
            return
        self.started.add(trial.trial_id)
        running = sum(1 for other in trials if other.status == "RUNNING")
        point = _point(trial.config, self.keys)
        print(f"trial {trial.trial_id} started: {point} ({len(self.started)} started, {running} running)", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        """A line per validation (``val/step`` is the step): a report between validations carries the
        previous value."""
        cloned = result.get("cloned_from")
        if cloned and self.cloned.get(trial.trial_id) != cloned:
            self.cloned[trial.trial_id] = cloned
            point = _point(trial.config, self.keys)
            print(f"trial {trial.trial_id} continues trial {cloned} (PBT): {point}", flush=True)
        value, step = result.get(self.metric), result.get("step", 0)
        if value is None or (isinstance(value, float) and math.isnan(value)) or result.get("val/step") != step:
            return
        rate = result.get("studies_per_s")
        print(f"trial {trial.trial_id} step {result.get('step')}: {self.metric} {value:.3f}"
              + (f", {rate:.1f} studies/s" if rate is not None else ""), flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        step = result.get("step", 0)
        value = result.get(self.metric)
        shown = f": {self.metric} {value:.3f}" if isinstance(value, int | float) else ""
        if step < self.max_steps:
            print(f"trial {trial.trial_id} stopped early by ASHA at step {step} of {self.max_steps}{shown}", flush=True)
        else:
            print(f"trial {trial.trial_id} finished at step {step}{shown}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        error = ""
        if trial.error_file and os.path.isfile(trial.error_file):
            lines = [line for line in open(trial.error_file).read().splitlines() if line.strip()]
            error = f": {lines[-1].strip()}" if lines else ""
        print(f"trial {trial.trial_id} failed at step {(trial.last_result or {}).get('step', 0)}{error} "
              f"(the whole error: {trial.error_file or trial.path})", flush=True)


def _point(config: dict, keys: list[str]) -> str:
    return " ".join(f"{key}={_value(config.get(key))}" for key in keys)


def _value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
