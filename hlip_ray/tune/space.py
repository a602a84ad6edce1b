"""Sweep spaces: YAML over the config tree's own dotted keys, each with one of Ray Tune's samplers.

    train.global_batch_size: {choice: [128, 256, 512]}
    model.attention_layout: {grid: [h2, h3, full]}
    data.scans_per_study: {choice: [4, 8, 10]}
    train.lr: {loguniform: [1.0e-5, 1.0e-3]}

A space is checked before any trial starts: every key must be a key of the config tree, every
sampler one of Tune's, and every point the config could be given (each combination of the listed
values, with ranges at both ends) must be a config the tree accepts; the first that is not fails,
naming the key, the value and why.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hlip_ray.config import Config, ConfigError, config_fields, read_yaml_file, with_values

SAMPLERS = ("choice", "grid", "uniform", "loguniform", "randint")
# Set by the sweep for each trial: a space may not choose them.
SET_BY_SWEEP = ("train.run_name", "train.storage_path", "train.log_dir")
# What population-based training may change in a running trial: keys a run can take up at a checkpoint,
# because they change neither the parameters' shapes nor the data order. The optimizer's lr and weight
# decay are set again from the config when a run resumes.
PBT_KEYS = ("train.lr", "train.weight_decay", "train.warmup_steps", "train.grad_clip", "model.attention_layout",
            "model.patch_dropout", "model.drop_path", "data.scans_per_study", "data.shuffle_sentences")
# Points checked at most (the first ones, in order); a space has far fewer in practice.
MAX_POINTS = 4096


@dataclass(frozen=True)
class Dimension:
    """One key of a space: ``key`` is a dotted config key, ``sampler`` one of ``SAMPLERS``."""

    key: str
    sampler: str
    values: tuple

    def tune_domain(self):
        """The Tune search domain of this dimension."""
        from ray import tune

        if self.sampler == "grid":
            return tune.grid_search(list(self.values))
        if self.sampler == "choice":
            return tune.choice(list(self.values))
        low, high = self.values
        samplers = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}
        return samplers[self.sampler](low, high)

    def mutation(self):
        """What PBT resamples this key from: the listed values, or the range (Tune perturbs a range's
        value by x0.8 or x1.2 otherwise)."""
        if self.sampler in ("grid", "choice"):
            return list(self.values)
        return self.tune_domain()

    def corners(self) -> list:
        """The values a check must try: each listed value, or a range's ends (``randint``'s high is exclusive)."""
        if self.sampler in ("grid", "choice"):
            return list(self.values)
        low, high = self.values
        if self.sampler == "randint":
            return list(range(low, high)) if high - low <= 16 else [low, high - 1]
        return [low, high]


@dataclass(frozen=True)
class Space:
    source: str
    dimensions: tuple[Dimension, ...]

    def param_space(self) -> dict[str, Any]:
        """Tune's ``param_space``: ``{dotted key: domain}``."""
        return {dimension.key: dimension.tune_domain() for dimension in self.dimensions}

    def mutations(self) -> dict[str, Any]:
        """PBT's ``hyperparam_mutations``: every key of the space."""
        return {dimension.key: dimension.mutation() for dimension in self.dimensions}

    def trials(self, num_samples: int) -> int:
        """How many trials a sweep runs: each sample crossed with every grid value."""
        count = num_samples
        for dimension in self.dimensions:
            if dimension.sampler == "grid":
                count *= len(dimension.values)
        return count

    @property
    def keys(self) -> list[str]:
        return [dimension.key for dimension in self.dimensions]

    def points(self):
        """Every combination of the dimensions' ``corners``."""
        keys = self.keys
        for values in itertools.product(*(dimension.corners() for dimension in self.dimensions)):
            yield dict(zip(keys, values))


def load_space(path: str | Path) -> Space:
    """Read a space YAML; its shape (keys, samplers, their arguments) is checked here."""
    source = str(path)
    tree = read_yaml_file(path, "tune space")
    if not isinstance(tree, dict) or not tree:
        raise ConfigError(f"tune space {source}: expected a mapping of dotted config keys to samplers, "
                          "e.g. 'train.lr: {loguniform: [1.0e-5, 1.0e-3]}'")
    known = {key for key, _ in config_fields()}
    dimensions = []
    for key, spec in tree.items():
        where = f"tune space {source}: {key}"
        if key not in known:
            raise ConfigError(f"{where}: not a config key (see `hlip-ray config --reference`)")
        if key in SET_BY_SWEEP or key.startswith("tune."):
            raise ConfigError(f"{where}: set by the sweep itself, a space cannot choose it")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
            raise ConfigError(f"{where}: expected one sampler of {', '.join(SAMPLERS)}, e.g. {{choice: [1, 2]}}; "
                              f"got {spec!r}")
        sampler, values = next(iter(spec.items()))
        dimensions.append(Dimension(key, sampler, _checked_arguments(where, sampler, values)))
    return Space(source, tuple(dimensions))


def _checked_arguments(where: str, sampler: str, values: Any) -> tuple:
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {sampler} takes a non-empty list, got {values!r}")
    if sampler in ("grid", "choice"):
        return tuple(values)
    if len(values) != 2 or not all(isinstance(value, int | float) and not isinstance(value, bool) for value in values):
        raise ConfigError(f"{where}: {sampler} takes [low, high] numbers, got {values!r}")
    low, high = values
    if not low < high:
        raise ConfigError(f"{where}: {sampler} needs low < high, got {values!r}")
    if sampler == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0, got {values!r}")
    if sampler == "randint" and not (isinstance(low, int) and isinstance(high, int)):
        raise ConfigError(f"{where}: randint takes integers [low, high), got {values!r}")
    return (low, high)


def check_space(space: Space, config: Config) -> int:
    """Fail on the first point of ``space`` the config refuses, naming its key and value; returns the
    number of points checked."""
    if config.tune.scheduler == "pbt":
        for key in space.keys:
            if key not in PBT_KEYS:
                raise ConfigError(f"tune space {space.source}: {key}: PBT changes a running trial's values at a "
                                  f"checkpoint, which a run can take up only for {', '.join(PBT_KEYS)}; sweep "
                                  f"{key} with tune.scheduler=asha or fifo")
    checked = 0
    for point in space.points():
        if checked == MAX_POINTS:
            break
        checked += 1
        try:
            with_values(config, point, source=space.source)
        except ConfigError as error:
            raise ConfigError(f"tune space {space.source}: the point {_format_point(point)} is refused:\n"
                              f"{_indented(error)}") from None
    return checked


def _format_point(point: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in point.items())


def _indented(error: ConfigError) -> str:
    return "\n".join("  " + line for line in str(error).splitlines())
