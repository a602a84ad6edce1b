"""`hlip-ray tune`: a Ray Tune sweep in which every trial is a whole distributed training run.

A Tune function trainable (``run_trial``) builds and fits the trial's ``TorchTrainer`` with Tune's
report callback, so the metrics the training loop reports reach Tune; each trial's run has its own
name (``<sweep>-<trial id>``) under the sweep's folder, so a resumed trial resumes its own
checkpoint. ASHA (``tune.scheduler``) stops trials whose metric trails at the same step; concurrent
trials are bounded by what the cluster holds. The console gets one line per trial event instead of
Tune's status table; the results (a table, the Pareto front of metric against compute, the best
config as a training YAML, plots) are written by ``results.py``.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

from hlip_ray.config import Config, ConfigError, config_from_dict, with_values
from hlip_ray.data.storage import Storage, is_s3, join
from hlip_ray.tune.space import Space, check_space

# Config keys holding local paths: made absolute before trials start, since Tune runs each trial
# in a folder of its own.
PATH_KEYS = ("data.manifest", "data.shards", "eval.vocabulary", "train.log_dir", "model.init_from_2d")


def sweep_dir(config: Config) -> str:
    """The sweep's folder: ``tune.storage_path/tune.name``, a local path or an s3:// URI."""
    path = config.tune.storage_path
    if is_s3(path):
        return join(path, config.tune.name)
    if path.startswith("file://"):
        return "file://" + os.path.join(path.removeprefix("file://"), config.tune.name)
    return os.path.join(os.path.abspath(path), config.tune.name)


def trial_run_name(config: Config, trial_id: str) -> str:
    return f"{config.tune.name}-{trial_id}"


def sweep_config(config: Config, space: Space) -> Config:
    """The config every trial starts from: local paths absolute, the trials' runs inside the sweep's
    folder. Fails (naming key and value) on a space or setting no trial could run with."""
    if config.tune.metric.startswith("val/zeroshot") and not config.eval.vocabulary:
        raise ConfigError(f"tune.metric {config.tune.metric!r} is measured by zero-shot validation, which needs "
                          "eval.vocabulary (a label vocabulary) and a 'val' split; for a corpus without labels "
                          "use tune.metric=val/retrieval_r@5 (or val/loss with tune.mode=min)")
    if config.tune.scheduler == "asha" and config.tune.grace_period > config.train.max_steps:
        raise ConfigError(f"tune.grace_period {config.tune.grace_period} is beyond train.max_steps "
                          f"{config.train.max_steps}: ASHA would never stop a trial")
    values: dict[str, Any] = {"train.storage_path": join(sweep_dir(config), "runs")}
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value and "://" not in value and (key == "train.log_dir" or os.path.exists(value)):
            values[key] = os.path.abspath(value)
    base = with_values(config, values)
    check_space(space, base)
    return base


def run_trial(values: dict[str, Any], base: dict[str, Any]) -> None:
    """One trial: the base config with the trial's values, trained to the end (or until Tune stops it)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from hlip_ray.train.run import fit

    config = config_from_dict(base, "sweep")
    run_name = trial_run_name(config, tune.get_context().get_trial_id())
    config = with_values(config, {**values, "train.run_name": run_name}, source=f"trial {run_name}")
    fit(config, callbacks=(TuneReportCallback(),), progress=False)


def trial_resources(config: Config) -> dict[str, float]:
    """What a trial's driver holds (its workers ask for their own): the ``resources.driver`` slot, or a
    hundredth of a CPU (Tune refuses a request of nothing)."""
    return {config.resources.driver: 1} if config.resources.driver else {"CPU": 0.01}


def concurrent_trials(config: Config) -> int:
    """``tune.max_concurrent_trials``, or as many trials as the cluster's GPUs hold (CPUs on a CPU
    cluster, one beside each trial's workers for its decoding)."""
    import ray

    if config.tune.max_concurrent_trials:
        return config.tune.max_concurrent_trials
    workers = config.train.num_workers
    workers = max(workers) if isinstance(workers, list) else workers
    total = ray.cluster_resources()
    if config.train.use_gpu:
        return max(1, int(total.get("GPU", 0) // workers))
    return max(1, int(total.get("CPU", 0) // (workers + 1)))


def scheduler(config: Config):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if config.tune.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="step", max_t=config.train.max_steps, grace_period=config.tune.grace_period,
                         reduction_factor=config.tune.reduction_factor)


def run_sweep(config: Config, space: Space, *, resume: bool = False):
    """Run (or, with ``resume``, continue) the sweep; returns Tune's ``ResultGrid`` and the base config.
    Ray must be initialised."""
    from ray import tune

    from hlip_ray.tune.events import TrialEvents

    base = sweep_config(config, space)
    # Tune's console output engine prints an experiment box even when silent; the legacy one, silent,
    # prints nothing, leaving the console to TrialEvents.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    storage = Storage.from_config(config.storage)
    folder = sweep_dir(config)
    filesystem, storage_path = storage.resolve(config.tune.storage_path)
    _, sweep_path = storage.resolve(folder)
    trainable = tune.with_resources(partial(run_trial, base=base.model_dump(mode="json")), trial_resources(base))
    exists = tune.Tuner.can_restore(sweep_path, storage_filesystem=filesystem)
    if resume:
        if not exists:
            raise ConfigError(f"no sweep to resume at {folder} (tune.storage_path, tune.name)")
        tuner = tune.Tuner.restore(sweep_path, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=filesystem)
    else:
        if exists:
            raise ConfigError(f"a sweep named {config.tune.name!r} exists at {folder}: --resume continues it, "
                              "or give tune.name a new name")
        tuner = tune.Tuner(
            trainable,
            param_space=space.param_space(),
            tune_config=tune.TuneConfig(metric=base.tune.metric, mode=base.tune.mode, scheduler=scheduler(base),
                                        num_samples=base.tune.num_samples,
                                        max_concurrent_trials=concurrent_trials(base)),
            run_config=tune.RunConfig(name=base.tune.name, storage_path=storage_path, storage_filesystem=filesystem,
                                      callbacks=[TrialEvents(space.keys, base.tune.metric, base.train.max_steps,
                                                            base.train.checkpoint_every)],
                                      verbose=0),
        )
    return tuner.fit(), base
