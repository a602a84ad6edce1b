"""`hlip-ray tune`: a Ray Tune sweep in which every trial is a whole distributed training run.

Each trial (``trial.run_trial``) fits its own ``TorchTrainer`` under its own run name, so a resumed
trial resumes its own checkpoint. ``tune.scheduler`` picks ASHA (trials whose metric trails at the
same step are stopped), FIFO, or PBT (trailing trials continue from a leading trial's checkpoint with
perturbed values); concurrent trials are bounded by what the cluster holds. The console gets one line
per trial event instead of Tune's status table; the results (a table, the Pareto front of metric
against compute, the best config as a training YAML, plots) are written by ``results.py``."""

from __future__ import annotations

import os
from functools import partial
from typing import Any

from hlip_ray.config import Config, ConfigError, with_values
from hlip_ray.ray_runtime import check_shared_storage
from hlip_ray.storage import Storage, is_s3, join
from hlip_ray.train.run import check_storage_path
from hlip_ray.tune.space import Space, check_space
from hlip_ray.tune.trial import run_trial

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


def sweep_config(config: Config, space: Space) -> Config:
    """The config every trial starts from: local paths absolute, the trials' runs inside the sweep's
    folder. Fails (naming key and value) on a space or setting no trial could run with, and on an s3://
    ``tune.storage_path`` the sweep could not write (``check_storage_path``: endpoint, bucket, access;
    the trials' runs are below it). Needs no Ray: ``hlip-ray tune`` calls it before it connects."""
    if config.tune.metric.startswith("val/zeroshot") and not config.eval.vocabulary:
        raise ConfigError(f"tune.metric {config.tune.metric!r} is measured by zero-shot validation, which needs "
                          "eval.vocabulary (a label vocabulary) and a 'val' split; for a corpus without labels "
                          "use tune.metric=val/retrieval_r@5 (or val/loss with tune.mode=min)")
    if config.tune.scheduler == "asha" and config.tune.grace_period > config.train.max_steps:
        raise ConfigError(f"tune.grace_period {config.tune.grace_period} is beyond train.max_steps "
                          f"{config.train.max_steps}: ASHA would never stop a trial")
    if config.tune.scheduler == "pbt":
        interval = config.tune.perturbation_interval or config.train.checkpoint_every
        if interval >= config.train.max_steps:
            raise ConfigError(f"PBT's perturbation interval ({interval} steps: tune.perturbation_interval, else "
                              f"train.checkpoint_every) is not below train.max_steps {config.train.max_steps}: "
                              "PBT would never perturb a trial")
        if space.trials(config.tune.num_samples) < 2:
            raise ConfigError("PBT needs a population: tune.num_samples (times the space's grid values) is 1")
    check_storage_path(config.tune.storage_path, "tune.storage_path", config.storage)
    values: dict[str, Any] = {"train.storage_path": join(sweep_dir(config), "runs")}
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value and "://" not in value and (key == "train.log_dir" or os.path.exists(value)):
            values[key] = os.path.abspath(value)
    base = with_values(config, values)
    check_space(space, base)
    return base


def trial_resources(config: Config) -> dict[str, float]:
    """What a trial's driver holds (its workers ask for their own): the ``resources.driver`` slot, or a
    hundredth of the head node (Ray's ``node:__internal_head__``). Either way drivers stay on the head, never
    on a pool node that a spot reclaim takes away, and with them the run's driver-side actors (Ray Train's
    controller, the run and quarantine logs, Ray Data's split coordinator), which follow their driver."""
    return {config.resources.driver: 1} if config.resources.driver else {"node:__internal_head__": 0.01}


def concurrent_trials(config: Config) -> tuple[int, str]:
    """``(trials, why)``: ``tune.max_concurrent_trials``, or as many trials as the cluster holds at its
    largest: on an autoscaling cluster what its node types' maxima hold (the pools start at zero nodes and
    grow as trials ask), else what its nodes hold now. A trial holds ``train.num_workers`` (its maximum, when
    elastic) trainer slots: of ``resources.trainer`` where set, else GPUs (``train.use_gpu``), else CPUs with
    one more beside each trial's workers for its decoding."""
    from hlip_ray.ray_runtime import max_cluster_resources

    if config.tune.max_concurrent_trials:
        return config.tune.max_concurrent_trials, "tune.max_concurrent_trials"
    workers = config.train.num_workers
    workers = max(workers) if isinstance(workers, list) else workers
    total, source = max_cluster_resources()
    if config.resources.trainer:
        slots, per_trial = config.resources.trainer, workers
    elif config.train.use_gpu:
        slots, per_trial = "GPU", workers
    else:
        slots, per_trial = "CPU", workers + 1
    trials = max(1, int(total.get(slots, 0) // per_trial))
    return trials, f"{int(total.get(slots, 0))} {slots} in {source}, {per_trial} a trial"


def scheduler(config: Config, space: Space):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if config.tune.scheduler == "fifo":
        return FIFOScheduler()
    if config.tune.scheduler == "pbt":
        return checkpointed_pbt(config, space)
    return ASHAScheduler(time_attr="step", max_t=config.train.max_steps, grace_period=config.tune.grace_period,
                         reduction_factor=config.tune.reduction_factor)


def checkpointed_pbt(config: Config, space: Space):
    """Tune's PBT, synchronous (every trial stops at the same step before any is compared, so trials are
    compared at equal training), perturbing only at a checkpoint step before the last: a trailing trial
    continues a leader's checkpoint, and one perturbed at its last step would end as a copy of the leader."""
    from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler

    checkpoint_every, max_steps = config.train.checkpoint_every, config.train.max_steps

    class CheckpointedPBT(PopulationBasedTraining):
        def on_trial_result(self, tune_controller, trial, result: dict) -> str:
            step = result.get("step", 0)
            if step % checkpoint_every or step >= max_steps:
                return TrialScheduler.CONTINUE
            return super().on_trial_result(tune_controller, trial, result)

    return CheckpointedPBT(time_attr="step", synch=True, hyperparam_mutations=space.mutations(),
                           perturbation_interval=config.tune.perturbation_interval or checkpoint_every)


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
    check_shared_storage(config.tune.storage_path, "tune.storage_path")
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
        trials, why = concurrent_trials(base)
        print(f"hlip-ray tune: up to {trials} trial(s) at once ({why})", flush=True)
        tuner = tune.Tuner(
            trainable,
            param_space=space.param_space(),
            tune_config=tune.TuneConfig(metric=base.tune.metric, mode=base.tune.mode, scheduler=scheduler(base, space),
                                        num_samples=base.tune.num_samples,
                                        max_concurrent_trials=trials),
            run_config=tune.RunConfig(name=base.tune.name, storage_path=storage_path, storage_filesystem=filesystem,
                                      callbacks=[TrialEvents(space.keys, base.tune.metric, base.train.max_steps)],
                                      verbose=0),
        )
    return tuner.fit(), base
