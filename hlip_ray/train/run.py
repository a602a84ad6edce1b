"""The driver side of training: one ``TorchTrainer`` built from a config (``hlip-ray train``).

The trainer's datasets are the data plane's streams: ``train`` is the data order from the run's
latest checkpoint on (rebuilt each time Ray Train starts the worker group, so a restart after a
failure resumes the data where the model resumes), ``val`` the held-out split for zero-shot
validation, decoded once before training. The worker loop is ``hlip_ray.train.loop.train_loop``;
its metrics reach the driver's console and ``train.log_dir`` through ``tracking.RunLog``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from hlip_ray.config import Config, ConfigError
from hlip_ray.ray_runtime import check_shared_storage
from hlip_ray.storage import Storage, is_s3, join

logger = logging.getLogger(__name__)

PACKAGES = ("hlip-ray", "torch", "ray", "deepspeed", "transformers", "timm")


def run_dir(config: Config) -> str:
    """Where this run's checkpoints are: ``storage_path/run_name`` as a local path or s3:// URI."""
    path = config.train.storage_path
    if is_s3(path):
        return join(path, config.train.run_name)
    return os.path.join(os.path.abspath(path.removeprefix("file://")), config.train.run_name)


def provenance(config: Config, storage: Storage) -> dict:
    """Package versions, git revision and the hash of the study list the run reads."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    try:
        revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                  text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        revision = None
    if config.data.shards:
        from hlip_ray.data.shards import INDEX_FILE

        source = join(config.data.shards, INDEX_FILE)
    else:
        source = config.data.manifest
    digest = hashlib.sha256(storage.read_bytes(source)).hexdigest() if source else None
    return {"versions": versions, "git_revision": revision, "data": source, "data_sha256": digest}


@dataclass
class Training:
    """A run ready to fit: the ``TorchTrainer``, the run's quarantine log and its metrics log (actors), and
    where the metrics are written (``summary_log_dir``: the shared copy where there is one)."""

    trainer: object
    quarantine: object
    run_log: object
    summary_log_dir: str


def build_trainer(config: Config, *, init_checkpoint: str | None = None, resume_from: str | None = None,
                  callbacks: tuple = ()) -> Training:
    """The ``TorchTrainer`` of a config; Ray must be initialised. Fails before any work on a bad setup.
    ``init_checkpoint``: the initial weights of a new run. ``resume_from``: another run's checkpoint this
    run continues (weights, optimizer, step, data position) until it has one of its own (a PBT trial).
    ``callbacks``: Ray Train callbacks of the run (a sweep's trial passes its report callback)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from hlip_ray.data.quarantine import create_quarantine_log
    from hlip_ray.run_checkpoint import checkpoint_at
    from hlip_ray.train.loop import LoopConfig, train_loop
    from hlip_ray.train.tracking import OneLineRestarts, start_run_log

    check_setup(config)
    train = config.train
    # Made absolute now: a job's working directory can be unpacked again under it while the run starts.
    logs, shared_logs = log_dir(config), shared_log_dir(config)
    storage = Storage.from_config(config.storage)
    if init_checkpoint:
        check_initial_weights(init_checkpoint, config, storage)
    if resume_from:
        try:
            checkpoint_at(resume_from, storage)
        except FileNotFoundError as error:
            raise ConfigError(str(error)) from None
    quarantine = create_quarantine_log()
    datasets, dataset_config, train_studies = run_datasets(config, storage, quarantine, resume_from)
    run_log = start_run_log(logs, train.max_steps, shared_logs, config.storage.model_dump(mode="json"))
    resources = {"CPU": 1, **({config.resources.trainer: 1} if config.resources.trainer else {}),
                 **({"GPU": 1} if train.use_gpu else {})}
    workers = tuple(train.num_workers) if isinstance(train.num_workers, list) else train.num_workers
    # Read by Ray Train's controller, which takes them from the driver's environment.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(train.worker_start_timeout_s)
    os.environ["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = str(config.spot.poll_interval_s)
    filesystem, storage_path = storage.resolve(train.storage_path)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=LoopConfig(
            config=config.model_dump(mode="json"), run_dir=run_dir(config), train_studies=train_studies,
            run_log=run_log, init_checkpoint=init_checkpoint, resume_from=resume_from,
            provenance=provenance(config, storage), validate="val" in datasets,
        ).as_dict(),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=train.use_gpu, resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=train.resize_check_interval_s),
        run_config=RunConfig(
            name=train.run_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=train.max_failures),
            worker_runtime_env={"env_vars": {} if train.use_gpu else {"DS_ACCELERATOR": "cpu"}},
            callbacks=[OneLineRestarts(), *callbacks],
        ),
        datasets=datasets,
        dataset_config=dataset_config,
    )
    return Training(trainer, quarantine, run_log, shared_logs or str(logs))


def check_setup(config: Config) -> None:
    """What the config alone cannot tell, checked before any work: the run's storage reachable and writable
    (``check_storage``), shared storage on any cluster but this machine's own, and the text embedding's size
    without a projection."""
    from hlip_ray.model.text import check_projection
    from hlip_ray.text_source import hidden_size

    check_output_paths(config)
    check_storage(config)
    check_shared_storage(config.train.storage_path, "train.storage_path")
    if config.model.text.projection == "none":
        try:
            check_projection("none", config.model.projection_dim, hidden_size(config.model.text.name_or_path))
        except ValueError as error:
            raise ConfigError(str(error)) from None


def check_storage(config: Config) -> None:
    """``train.storage_path`` reachable and writable (``check_storage_path``). Needs no Ray: ``hlip-ray train``
    calls it before it connects, so that a wrong endpoint or bucket costs one line and no cluster."""
    check_storage_path(config.train.storage_path, "train.storage_path", config.storage)


PROBE_ATTEMPTS = 2       # the storage probe's requests: one retry (a dropped connection), not storage.retries
PROBE_TIMEOUT_S = 5.0    # its connect and read timeouts, each: a wrong endpoint costs seconds, not minutes
PROBE_MARKER = ".hlip-ray-write-check-"


def check_storage_path(uri: str, key: str, storage_config) -> None:
    """An s3:// ``uri`` (``key``'s value) that the run could not use, refused in one line naming it and the
    cause: the endpoint unreachable, the bucket missing, credentials missing or refused, access denied.
    Three small requests, each bounded (``PROBE_ATTEMPTS``, ``PROBE_TIMEOUT_S``): a listing of the prefix
    (``MaxKeys=1``: the bucket, its endpoint and read access) and a write and delete of an empty marker
    object below it (write access; nothing is left behind). Local paths and ``file://`` are checked where the
    run's processes read them (``check_shared_storage``). ``storage_config``: the config's ``storage``."""
    if not is_s3(uri):
        return
    import uuid

    import boto3
    from botocore.config import Config as BotoConfig
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    storage = Storage.from_config(storage_config)
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    prefix = prefix.strip("/")
    marker = f"{prefix}/{PROBE_MARKER}{uuid.uuid4().hex}" if prefix else f"{PROBE_MARKER}{uuid.uuid4().hex}"
    logging.getLogger("botocore.credentials").setLevel(logging.WARNING)
    client = boto3.session.Session().client(
        "s3", endpoint_url=storage.endpoint_url, region_name=storage._region(),
        config=BotoConfig(retries={"max_attempts": PROBE_ATTEMPTS, "mode": "standard"},
                          connect_timeout=PROBE_TIMEOUT_S, read_timeout=PROBE_TIMEOUT_S))
    endpoint = _without_userinfo(client.meta.endpoint_url)
    doing = "listing"
    try:
        client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
        doing = "writing"
        client.put_object(Bucket=bucket, Key=marker, Body=b"")
        doing = "deleting"
        client.delete_object(Bucket=bucket, Key=marker)
        return
    except NoCredentialsError:
        cause = ("no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run "
                 "where an instance profile or pod identity provides them)")
    except (ConnectTimeoutError, ReadTimeoutError):
        cause = (f"the S3 endpoint {endpoint} is unreachable (no answer within {PROBE_TIMEOUT_S:g} s, "
                 f"{PROBE_ATTEMPTS} tries); check storage.endpoint_url")
    except (EndpointConnectionError, ConnectionClosedError):
        cause = (f"the S3 endpoint {endpoint} is unreachable (could not connect, {PROBE_ATTEMPTS} tries); "
                 "check storage.endpoint_url")
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code") or "")
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchBucket", "404") or (status == 404 and doing == "listing"):
            cause = f"bucket {bucket!r} does not exist at {endpoint}"
        elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
            cause = f"the S3 endpoint {endpoint} refused the credentials ({code})"
        elif code in ("AccessDenied", "AllAccessDisabled", "403") or status == 403:
            cause = f"access denied {doing} {'the prefix' if doing == 'listing' else 'an object'} ({code or status})"
            if doing == "deleting":   # Ray Train deletes old checkpoints (train.keep_checkpoints)
                cause += f"; the probe's empty object s3://{bucket}/{marker} is left there"
        else:
            message = error.response.get("Error", {}).get("Message") or ""
            cause = f"{doing} failed at {endpoint}: {code or status} {message}".rstrip()
    except BotoCoreError as error:
        cause = f"{doing} failed at {endpoint}: {error}"
    raise ConfigError(f"{key} {uri}: {cause}")


def _without_userinfo(url: str) -> str:
    """A URL as it may be shown: without a user or password in it."""
    from urllib.parse import urlparse

    parsed = urlparse(url)
    if "@" not in parsed.netloc:
        return url
    return parsed._replace(netloc=parsed.netloc.rsplit("@", 1)[1]).geturl()


def check_initial_weights(source: str, config: Config, storage: Storage) -> None:
    """``--checkpoint`` read once here, so that a wrong path or a damaged file fails with its name
    before any worker starts (each worker loads it again)."""
    from hlip_ray.inference.trained_model import load_model

    try:
        load_model(source, storage, config)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"--checkpoint {source}: {error}") from None


def run_datasets(config: Config, storage: Storage, quarantine, resume_from: str | None = None):
    """``(datasets, dataset_config, train_studies)`` for the ``TorchTrainer``: ``train``, the data order
    from the run's latest checkpoint on (split across workers, in order), and ``val``, the held-out
    split decoded once (read whole by every worker at each validation)."""
    from ray.data import DataContext, ExecutionOptions
    from ray.train import DataConfig

    from hlip_ray.data.sources import study_items
    from hlip_ray.data.streams import evaluation_stream, training_stream
    from hlip_ray.run_checkpoint import resume_point

    train = config.train
    train_items, train_source = study_items(config, storage, quarantine, "train", train=True)
    val_items, val_source = study_items(config, storage, quarantine, "val", train=False)
    if not train_items:
        raise ConfigError("the training split is empty: no study has split 'train'")
    if config.eval.vocabulary and not val_items:
        raise ConfigError("eval.vocabulary is set but the data has no 'val' split to validate on")
    directory = run_dir(config)

    def train_dataset():
        """Called by Ray Train at every worker-group start: the data order from the latest checkpoint on."""
        found = resume_point(directory, storage, resume_from)
        start = found[1].position if found else 0
        step = found[1].step if found else 0
        remaining = max(1, train.max_steps - step) * train.global_batch_size
        return training_stream(train_items, train_source, config, start=start, stop=start + remaining + remaining // 20)

    datasets = {"train": train_dataset}
    if val_items:
        # Decoded once, before training: every validation then reads the same blocks from the object
        # store (spilled to disk if need be) instead of running the pipeline again on each worker.
        datasets["val"] = evaluation_stream(val_items, val_source, config).materialize()
    # Ray Train's default ingest options with the order preserved (built field by field: copying the
    # defaults would pass on `exclude_resources`, which Ray 2.60 deprecates).
    ordered = ExecutionOptions(resource_limits=DataContext.get_current().execution_options.resource_limits,
                               preserve_order=True)
    dataset_config = DataConfig(datasets_to_split=["train"], execution_options={"train": ordered, "val": ordered})
    return datasets, dataset_config, len(train_items)


def log_dir(config: Config) -> Path:
    """The run's ``metrics.jsonl`` and TensorBoard folder, on the driver's node."""
    return Path(config.train.log_dir).absolute() / config.train.run_name


def shared_log_dir(config: Config) -> str | None:
    """Where the run's metrics are copied so that they outlive the cluster: ``logs`` in the run's folder when
    ``train.storage_path`` is S3 or a shared mount (``file://``); None for a local run, whose ``log_dir`` is
    where the user reads them."""
    path = config.train.storage_path
    return join(run_dir(config), "logs") if is_s3(path) or path.startswith("file://") else None


def in_job_working_dir() -> bool:
    """Whether this process runs in a ``ray job submit`` job's copy of its working_dir, which Ray deletes
    with the session (``<session>/runtime_resources/working_dir_files/_ray_pkg_*``)."""
    return f"{os.sep}runtime_resources{os.sep}working_dir_files{os.sep}" in os.getcwd() + os.sep


def check_output_paths(config: Config) -> None:
    """A local output path in a job's working_dir copy (a relative one, which the command line made absolute
    there) would be written where nothing outlives the job: refused, naming the key (metrics need
    ``train.log_dir`` only where ``train.storage_path`` is local)."""
    if not in_job_working_dir():
        return
    keys = {"train.storage_path": config.train.storage_path}
    if shared_log_dir(config) is None:
        keys["train.log_dir"] = config.train.log_dir
    copy = os.getcwd()
    for key, path in keys.items():
        if "://" not in path and (not os.path.isabs(path) or os.path.commonpath([copy, path]) == copy):
            raise ConfigError(f"{key} {path!r} lies in this job's temporary copy of its working_dir (a relative "
                              "path), which Ray deletes with the cluster's session: give s3://bucket/prefix, a "
                              "shared mount as file:///mnt/shared/..., or an absolute path on the head")


def fit(config: Config, *, init_checkpoint: str | None = None, resume_from: str | None = None, callbacks: tuple = (),
        progress: bool = True) -> dict:
    """Train (or resume) the run a config names, printing its progress (unless ``progress`` is off, as
    in a sweep's trials); returns a summary of the result. Arguments as in ``build_trainer``."""
    from hlip_ray.data.quarantine import write_quarantine
    from hlip_ray.train.tracking import print_progress

    started = time.perf_counter()
    training = build_trainer(config, init_checkpoint=init_checkpoint, resume_from=resume_from, callbacks=callbacks)
    stop = threading.Event()
    printer = threading.Thread(target=print_progress, args=(training.run_log, stop, config.train.max_steps),
                               name="progress", daemon=True)
    if progress:
        printer.start()
    storage = Storage.from_config(config.storage)
    try:
        result = training.trainer.fit()
    except KeyboardInterrupt:
        print(_resume_point(config, storage), flush=True)
        raise
    finally:
        stop.set()
        if progress:
            printer.join()
    rejected = write_quarantine(training.quarantine, run_dir(config), storage)
    checkpoint = result.checkpoint
    summary = {
        "run_dir": run_dir(config),
        "checkpoint": checkpoint_uri(config, checkpoint.path) if checkpoint else None,
        "metrics": {key: value for key, value in (result.metrics or {}).items() if not key.startswith("_")},
        "rejections": rejected,
        "seconds": round(time.perf_counter() - started, 1),
        "log_dir": training.summary_log_dir,
    }
    logger.info("training finished: %s", json.dumps(summary, default=str))
    return summary


def train_summary_lines(summary: dict) -> list[str]:
    """``fit``'s summary as a person reads it: where the run is, its last checkpoint, its last metrics, what the
    data stream refused."""
    from hlip_ray.data.quarantine import QUARANTINE_FILE

    metrics = summary["metrics"]
    figures = ", ".join(f"{key} {value:.4g}" for key, value in metrics.items()
                        if isinstance(value, int | float) and key != "step")
    refused = ", ".join(f"{reason} {count}" for reason, count in summary["rejections"].items())
    lines = [f"train: {summary['run_dir']}, step {metrics.get('step', '?')} after {summary['seconds']} s",
             f"  last checkpoint: {summary['checkpoint'] or 'none written'}",
             f"  last metrics: {figures or 'none reported'}",
             f"  refused by the data stream: {refused or 'nothing'} ({join(summary['run_dir'], QUARANTINE_FILE)})"]
    if summary["log_dir"]:
        lines.append(f"  metrics log: {summary['log_dir']}")
    return lines


def _resume_point(config: Config, storage: Storage) -> str:
    """What a stopped run leaves: its latest complete checkpoint, where training the same run resumes."""
    from hlip_ray.run_checkpoint import latest_checkpoint

    found = latest_checkpoint(run_dir(config), storage)
    if found is None:
        return f"stopped before the first checkpoint of {run_dir(config)}; training this run starts afresh"
    uri, state = found
    return (f"stopped; latest complete checkpoint: {uri} (step {state.step}); "
            f"training run {config.train.run_name!r} again resumes from it")


def checkpoint_uri(config: Config, path: str) -> str:
    """A checkpoint's URI from the path Ray Train gives it (bucket/key on S3)."""
    return f"s3://{path}" if is_s3(config.train.storage_path) else path
