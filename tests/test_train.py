"""Training end to end: 2 Ray Train workers, DeepSpeed ZeRO-2, data and checkpoints on moto S3.

One tiny run is trained once (``trained_run``) and shared: the run's checkpoint and metrics, its
resumption, evaluation from the CLI and the checks that no credential leaks all use it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from hlip_ray import cli
from hlip_ray.config import ConfigError, load_config
from hlip_ray.data.shards import read_index
from hlip_ray.data.storage import Storage
from hlip_ray.demo.local_s3 import LOCAL_CREDENTIALS
from hlip_ray.eval.trained_model import STATE_FILE, load_model
from hlip_ray.train.checkpoints import TrainState, latest_checkpoint, rank_marker
from hlip_ray.train.engine import lr_factor
from hlip_ray.train.run import build_trainer
from tests.helpers import tiny_bert_dir

GLOBAL_BATCH = 8
BUCKET = "train-e2e"


def run_overrides(endpoint: str, text_dir: Path, log_dir: Path, *extra: str) -> list[str]:
    return [
        "data.grid=[16,32,32]", "data.scans_per_study=2", "data.max_eval_scans=3", "data.windows=[[-20,140]]",
        "model.embed_dim=24", "model.num_heads=2", "model.depth=3", "model.projection_dim=16",
        "model.max_scan_slots=8", "model.patch_dropout=0.25", "model.drop_path=0.1",
        f"model.text.name_or_path={text_dir}", "model.text.context_length=32",
        f"data.manifest=s3://{BUCKET}/manifest.parquet", f"data.shards=s3://{BUCKET}/shards",
        f"eval.vocabulary=s3://{BUCKET}/raw/vocabulary.json", "eval.batch_size=4",
        "train.num_workers=2", f"train.global_batch_size={GLOBAL_BATCH}", "train.chunk_size=2",
        "train.zero_stage=2", "train.precision=fp32", "train.lr=1e-3", "train.warmup_steps=2",
        "train.max_steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=2", "train.max_failures=0",
        f"train.storage_path=s3://{BUCKET}/runs", f"train.log_dir={log_dir}", "train.run_name=e2e",
        "resources.data=data_pool", "resources.trainer=trainer", f"storage.endpoint_url={endpoint}", *extra,
    ]


@pytest.fixture(scope="module")
def trained_run(s3_endpoint, ray_session, tmp_path_factory):
    """A 4-step run on 16 synthetic studies read from moto S3, checkpoints on S3."""
    import boto3

    root = tmp_path_factory.mktemp("trained-run")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
    endpoint = f"storage.endpoint_url={s3_endpoint}"
    assert cli.main(["synth", "--out", f"s3://{BUCKET}/raw", "--studies", "16", "--seed", "5", endpoint]) == 0
    assert cli.main(["manifest", "--root", f"s3://{BUCKET}/raw", "--out", f"s3://{BUCKET}/manifest.parquet",
                     "data.val_fraction=0.3", endpoint]) == 0
    overrides = run_overrides(s3_endpoint, tiny_bert_dir(root), root / "logs",
                              f"train.mlflow_tracking_uri=file://{root}/mlruns")
    assert cli.main(["preprocess", "--manifest", f"s3://{BUCKET}/manifest.parquet", "--out", f"s3://{BUCKET}/shards",
                     *overrides]) == 0
    assert cli.main(["train", *overrides]) == 0
    storage = Storage(endpoint_url=s3_endpoint)
    splits = [item["split"] for item in read_index(f"s3://{BUCKET}/shards", storage)]
    at_step_2 = storage.read_bytes(f"s3://{BUCKET}/runs/e2e/checkpoint_00000002/model.safetensors")
    return {"overrides": overrides, "storage": storage, "log_dir": root / "logs" / "e2e", "mlruns": root / "mlruns",
            "config": load_config(None, overrides), "train_studies": splits.count("train"),
            "val_studies": splits.count("val"), "weights_at_step_2": at_step_2}


def metrics_lines(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_worker_zero2_run_from_s3_writes_checkpoints_and_metrics(trained_run):
    storage, config = trained_run["storage"], trained_run["config"]
    uri, state = latest_checkpoint(f"s3://{BUCKET}/runs/e2e", storage)
    assert uri.startswith(f"s3://{BUCKET}/runs/e2e/checkpoint_") and state.step == 4
    assert (state.position, state.world_size, state.seed) == (4 * GLOBAL_BATCH, 2, 0)
    assert state.provenance["versions"]["deepspeed"] and state.provenance["data_sha256"]
    assert state.provenance["data"] == f"s3://{BUCKET}/shards/index.parquet"
    files = {name[len(uri) + 1:] for name in storage.list_files(uri)}
    assert {"model.safetensors", "config.yaml", STATE_FILE, rank_marker(0), rank_marker(1)} <= files
    shards = [name for name in files if name.startswith("deepspeed/") and "optim_states" in name]
    assert len(shards) == 2  # ZeRO-2: every rank's optimizer partition is in the checkpoint

    lines = metrics_lines(trained_run["log_dir"])
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    for line in lines:
        assert {"loss", "logit_scale", "lr", "studies_per_s", "data_wait_fraction", "val/zeroshot_auc"} <= set(line)
        assert line["positions_in_order"] == 1 and line["position"] == line["step"] * GLOBAL_BATCH
        assert line["lr"] == pytest.approx(1e-3 * lr_factor(int(line["step"]) - 1, 2, 4))
    assert lines[1]["checkpoint"] and lines[3]["checkpoint"] and not lines[2]["checkpoint"]
    assert (trained_run["log_dir"] / "tensorboard").is_dir()
    # On S3 storage the metrics are copied into the run's folder too, where they outlive the cluster.
    local = (trained_run["log_dir"] / "metrics.jsonl").read_bytes()
    assert storage.read_bytes(f"s3://{BUCKET}/runs/e2e/logs/metrics.jsonl") == local
    assert any("/logs/tensorboard/events." in name for name in storage.list_files(f"s3://{BUCKET}/runs/e2e/logs"))

    model, loaded = load_model(uri, storage)
    assert loaded.model.depth == 3 and model.visual.embed_dim == 24
    assert storage.exists(f"s3://{BUCKET}/runs/e2e/quarantine.jsonl")
    assert config.train.zero_stage == 2


def _resume_and_save(loop_config: dict) -> None:
    """A Ray Train worker that resumes ``loop_config["resume_from"]`` at its world size (the training
    loop's own ``start``) and saves it again at once (the loop's own checkpoint writer)."""
    from hlip_ray.train.checkpoints import report_checkpoint
    from hlip_ray.train.loop import Worker, start

    worker = Worker.create(loop_config)
    engine, _, state, resumed = start(worker, loop_config)
    assert resumed
    report_checkpoint(engine, state, worker.config, worker.rank, {"step": state.step})


def _resave_at(source: str, workers: int, run_name: str, config, storage: Storage) -> str:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from hlip_ray.train.run import run_dir

    # Loading does not depend on the batch; 12 splits over 1, 2 and 3 workers.
    config = config.model_copy(update={"train": config.train.model_copy(update={
        "run_name": run_name, "global_batch_size": 12})})
    filesystem, path = storage.resolve(config.train.storage_path)
    TorchTrainer(
        _resume_and_save,
        train_loop_config={"config": config.model_dump(mode="json"), "run_dir": run_dir(config), "train_studies": 1,
                           "resume_from": source},
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1, "trainer": 1}),
        run_config=RunConfig(name=run_name, storage_path=path, storage_filesystem=filesystem,
                             worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}}),
    ).fit()
    uri, state = latest_checkpoint(run_dir(config), storage)
    assert state.world_size == workers
    return uri


def _to_universal(uri: str, storage: Storage, scratch: Path):
    """DeepSpeed's universal form of a checkpoint's engine state in ``scratch/universal`` (a process)."""
    import subprocess
    import sys

    state = TrainState.from_json(storage.read_bytes(f"{uri}/{STATE_FILE}"))
    prefix = f"{uri}/deepspeed/{state.deepspeed_tag}"
    local = scratch / state.deepspeed_tag
    for file in storage.list_files(prefix):
        (local / file[len(prefix) + 1:]).parent.mkdir(parents=True, exist_ok=True)
        (local / file[len(prefix) + 1:]).write_bytes(storage.read_bytes(file))
    return subprocess.Popen([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                             str(local), "--output_folder", str(scratch / "universal"), "--inject_missing_state"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**__import__("os").environ, "DS_ACCELERATOR": "cpu"})


def _universal_state(uri: str, storage: Storage, scratch: Path) -> dict[str, dict]:
    """A checkpoint's model weights and, per parameter, its fp32 master copy and Adam moments, whatever
    the world size that wrote it (DeepSpeed's universal checkpoint gathers the ZeRO partitions)."""
    import torch
    from safetensors.torch import load

    out = {"model": load(storage.read_bytes(f"{uri}/model.safetensors"))}
    for folder in sorted(path for path in (scratch / "universal" / "zero").iterdir() if path.is_dir()):
        out[folder.name] = {kind: torch.load(folder / f"{kind}.pt", weights_only=False)["param"]
                            for kind in ("fp32", "exp_avg", "exp_avg_sq")    # frozen ones: fp32 only
                            if (folder / f"{kind}.pt").is_file()}
    return out


@pytest.mark.slow
def test_a_checkpoint_resumes_at_1_then_3_workers_with_identical_weights_and_optimizer_state(trained_run, tmp_path):
    """2 workers wrote it (ZeRO-2: optimizer state in 2 partitions); resumed and saved again by 1 worker,
    and that one by 3: the consolidated weights, each parameter's fp32 master and both Adam moments are
    the same bytes, and step, position and schedule carry over."""
    import torch

    storage, config = trained_run["storage"], trained_run["config"]
    source = f"s3://{BUCKET}/runs/e2e/checkpoint_00000004"
    on_one = _resave_at(source, 1, "resize-1", config, storage)
    on_three = _resave_at(on_one, 3, "resize-3", config, storage)
    checkpoints = {"two": source, "one": on_one, "three": on_three}
    conversions = [_to_universal(uri, storage, tmp_path / name) for name, uri in checkpoints.items()]
    assert [conversion.wait(timeout=300) for conversion in conversions] == [0, 0, 0]
    states = [_universal_state(uri, storage, tmp_path / name) for name, uri in checkpoints.items()]
    assert len(states[0]) > 10 and sum("exp_avg" in tensors for tensors in states[0].values()) > 10
    for other in states[1:]:
        assert other.keys() == states[0].keys()
        for name, tensors in states[0].items():
            for kind, tensor in tensors.items():
                assert torch.equal(other[name][kind], tensor), (name, kind)
    written = [TrainState.from_json(storage.read_bytes(f"{uri}/{STATE_FILE}")) for uri in (source, on_one, on_three)]
    assert [(s.step, s.position, s.world_size) for s in written] == [(4, 32, 2), (4, 32, 1), (4, 32, 3)]


def test_a_checkpoint_cut_short_anywhere_is_never_picked_up(trained_run, tmp_path):
    """A crash during a save leaves some of a checkpoint's files, or one of them short. Every such state of
    the step-4 checkpoint, made from its real files: the run resumes from step 2, complete."""
    storage = trained_run["storage"]
    run = tmp_path / "run"
    for step in (2, 4):
        prefix = f"s3://{BUCKET}/runs/e2e/checkpoint_{step:08d}"
        for uri in storage.list_files(prefix):
            path = run / f"checkpoint_{step:08d}" / uri[len(prefix) + 1:]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(storage.read_bytes(uri))
    local = Storage()
    assert latest_checkpoint(str(run), local)[1].step == 4
    files = sorted(path for path in (run / "checkpoint_00000004").rglob("*") if path.is_file())
    assert len(files) >= 8
    for path in files:
        data = path.read_bytes()
        for cut in (None, data[: len(data) // 2]):    # the file not written yet, or written in part
            if cut is None:
                path.unlink()
            else:
                path.write_bytes(cut)
            found = latest_checkpoint(str(run), local)
            assert found is not None and found[1].step == 2, (path.name, cut is None)
            path.write_bytes(data)
    assert latest_checkpoint(str(run), local)[1].step == 4


def test_metrics_reach_mlflow_through_rays_integration(trained_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"file://{trained_run['mlruns']}")
    experiment = client.get_experiment_by_name("e2e")
    (run,) = client.search_runs([experiment.experiment_id])
    losses = {metric.step: metric.value for metric in client.get_metric_history(run.info.run_id, "loss")}
    logged = {int(line["step"]): line["loss"] for line in metrics_lines(trained_run["log_dir"])}
    assert losses == pytest.approx({step: logged[step] for step in (1, 2, 3, 4)})
    assert "val_zeroshot_auc" in run.data.metrics and run.data.params["train/zero_stage"] == "2"


def test_a_run_started_again_resumes_step_schedule_and_data_position(trained_run):
    log_dir = trained_run["log_dir"]
    before = len(metrics_lines(log_dir))
    assert cli.main(["train", *trained_run["overrides"], "train.max_steps=6"]) == 0
    resumed = metrics_lines(log_dir)[before:]
    assert [line["step"] for line in resumed] == [5, 6]
    for line in resumed:
        step = int(line["step"])
        assert line["lr"] == pytest.approx(1e-3 * lr_factor(step - 1, 2, 6))
        assert line["position"] == step * GLOBAL_BATCH and line["positions_in_order"] == 1
    storage = trained_run["storage"]
    _, state = latest_checkpoint(f"s3://{BUCKET}/runs/e2e", storage)
    assert state.step == 6 and state.epoch == state.position // trained_run["train_studies"]
    checkpoints = {uri.split("/")[5] for uri in storage.list_files(f"s3://{BUCKET}/runs/e2e")
                   if uri.split("/")[5].startswith("checkpoint_0")}
    assert checkpoints == {"checkpoint_00000004", "checkpoint_00000006"}  # keep the last 2


def test_eval_command_scores_the_trained_checkpoint_as_validation_did(trained_run, capsys):
    """``hlip-ray eval`` in one process and validation on 2 workers (each encoding its share of the
    batches, gathered) are one evaluation path: the same AUC for the same checkpoint."""
    uri, state = latest_checkpoint(f"s3://{BUCKET}/runs/e2e", trained_run["storage"])
    endpoint = trained_run["config"].storage.endpoint_url
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", uri, f"storage.endpoint_url={endpoint}"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["split"] == "val" and report["studies"] == trained_run["val_studies"] > 0
    assert set(report["per_label"]) == {"hemorrhage", "infarct", "mass"}
    assert set(report["baseline"]["per_label"]) == {"hemorrhage", "infarct", "mass"}
    (validated,) = [line for line in metrics_lines(trained_run["log_dir"])
                    if line["step"] == state.step and line["checkpoint"]]
    assert validated["val/studies"] == report["studies"]
    assert validated["val/zeroshot_auc"] == pytest.approx(report["macro_auc"], abs=1e-6)
    for label, auc in report["per_label"].items():
        assert validated.get(f"val/auc/{label}", math.nan) == pytest.approx(auc, abs=1e-6, nan_ok=True)
    # The label-free part of the same path: held-out contrastive loss and retrieval.
    assert validated["val/loss"] == pytest.approx(report["loss"], abs=1e-5)
    assert set(report["retrieval"]) >= {"r@1", "study_to_report_r@1", "report_to_study_r@1"}
    for name, value in report["retrieval"].items():
        assert validated[f"val/retrieval_{name}"] == pytest.approx(value, abs=1e-6)


def test_a_corpus_without_labels_trains_and_validates_on_loss_and_retrieval(trained_run, capsys):
    """Report-supervised pre-training: no label anywhere (manifest, vocabulary), and validation still
    reports the held-out contrastive loss and study<->report retrieval."""
    from hlip_ray.data.manifest import read_manifest, write_manifest

    storage = trained_run["storage"]
    rows = read_manifest(f"s3://{BUCKET}/manifest.parquet", storage)
    for row in rows:
        row.labels = {}
    write_manifest(rows, f"s3://{BUCKET}/unlabelled.parquet", storage)
    capsys.readouterr()
    # Also a checkpoint cadence apart from validation's: a checkpoint at every step, a validation at the last.
    assert cli.main(["train", *trained_run["overrides"], f"data.manifest=s3://{BUCKET}/unlabelled.parquet",
                     "data.shards=null", "eval.vocabulary=null", "train.run_name=unlabelled", "train.max_steps=2",
                     "train.checkpoint_every=1", "train.validate_every=2"]) == 0
    output = capsys.readouterr().out.splitlines()
    (line,) = [line for line in output if line.startswith("checkpoint at step 2:")]
    assert "zero-shot" not in line and re.search(r"val loss \d+\.\d{3}, R@1/5/10 \d\.\d\d/", line), line
    (between,) = [line for line in output if line.startswith("checkpoint at step 1 ")]
    assert between.startswith("checkpoint at step 1 (latest validation at step 0: val loss "), between
    steps = metrics_lines(trained_run["log_dir"].parent / "unlabelled")
    cadence = [(line["step"], line["val/step"], bool(line["checkpoint"])) for line in steps]
    assert cadence == [(1, 0, True), (2, 2, True)]
    validated = steps[-1]
    assert math.isfinite(validated["val/loss"]) and 0 <= validated["val/retrieval_r@1"] <= 1
    assert not math.isfinite(validated.get("val/zeroshot_auc", math.nan))   # no labels: no AUC (NaN is not logged)


def test_no_credential_reaches_checkpoints_metrics_or_logs(trained_run):
    import ray

    storage = trained_run["storage"]
    secrets = [LOCAL_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]]
    texts = {}
    for uri in storage.list_files(f"s3://{BUCKET}/runs"):
        texts[uri] = storage.read_bytes(uri)
    for path in trained_run["log_dir"].rglob("*"):
        if path.is_file():
            texts[str(path)] = path.read_bytes()
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for path in logs.rglob("*"):
        if path.is_file() and path.suffix in (".log", ".out", ".err"):
            texts[str(path)] = path.read_bytes()
    leaks = [where for where, data in texts.items() for secret in secrets if secret.encode() in data]
    assert not leaks
    assert any(uri.endswith("model.safetensors") for uri in texts)  # the scan did cover the checkpoint


def test_a_local_storage_path_is_taken_on_this_machines_own_cluster(ray_session):
    """The session's cluster is one node, this one, with no autoscaler: a plain path works there. Refusals
    on other clusters: tests/test_cluster.py (several nodes), tests/test_autoscaling.py (autoscaling)."""
    from hlip_ray.ray_runtime import check_shared_storage, is_local_cluster

    assert is_local_cluster()
    for path in ("runs", "/tmp/runs", "s3://bucket/runs", "file:///mnt/shared/runs"):
        check_shared_storage(path, "train.storage_path")


def test_a_projection_dim_other_than_the_text_towers_size_fails_before_any_work(ray_session):
    """Without a text projection the embedding is MiniLM's pooled state (384): 64 is refused in the driver."""
    config = load_config(None, ["model.text.projection=none", "model.projection_dim=64",
                                "data.manifest=/nonexistent/manifest.parquet"])
    with pytest.raises(ConfigError, match="model.projection_dim is 64.*hidden size, 384"):
        build_trainer(config)


def test_train_state_round_trips_through_json():
    state = TrainState(step=3, epoch=1, position=24, seed=7, world_size=2, global_batch_size=8,
                       deepspeed_tag="step3", val_zeroshot_auc=0.5, provenance={"git_revision": "abc"})
    assert TrainState.from_json(state.to_json()) == state
    assert math.isnan(TrainState.from_json(TrainState().to_json()).val_zeroshot_auc)


def test_the_same_config_and_seed_give_the_same_loss_at_every_step_and_the_same_weights(trained_run, capsys):
    """Training is deterministic end to end: a second run of the same config (another name, so it
    starts afresh) reads the same studies, draws the same masks and writes the same bytes. Its
    console shows progress lines and one line per checkpoint; its result carries flat metrics."""
    log_dir = trained_run["log_dir"]
    first = {int(line["step"]): line["loss"] for line in metrics_lines(log_dir) if line["step"] <= 2}
    capsys.readouterr()
    assert cli.main(["train", *trained_run["overrides"], "train.run_name=e2e-again", "train.max_steps=2"]) == 0
    again = {int(line["step"]): line["loss"] for line in metrics_lines(log_dir.parent / "e2e-again")}
    assert again == first and len(first) == 2
    final, state = latest_checkpoint(f"s3://{BUCKET}/runs/e2e-again", trained_run["storage"])
    assert state.step == 2
    assert trained_run["storage"].read_bytes(f"{final}/model.safetensors") == trained_run["weights_at_step_2"]

    # Ray's own warnings (e.g. "(raylet) WARNING: ...") may reach the console too: only ours are read.
    console = [line for line in capsys.readouterr().out.splitlines() if not line.startswith(("\x1b[", "("))]
    progress = [line for line in console if line.startswith("step ")]
    assert progress[0].startswith("step 1/2 (50%)  loss ") and "studies/s" in progress[0] and "ETA" in progress[0]
    assert any(line.startswith("step 2/2 (100%)") for line in console)
    assert [line.split(":")[0] for line in console if line.startswith("checkpoint")] == ["checkpoint at step 2"]
    summary = json.loads(console[-1])
    assert summary["metrics"]["step"] == 2 and all(
        isinstance(value, (int, float)) for value in summary["metrics"].values())


def test_a_runs_shared_metrics_copy_keeps_every_step_of_the_run_across_clusters_and_no_other_runs(ray_session,
                                                                                                  tmp_path):
    """With storage on S3 or a shared mount the run log copies metrics.jsonl there. A resumed run on another
    cluster (a fresh local folder) goes on from the copy; a stale local file of another run of the same name
    (other storage) never reaches it."""
    from hlip_ray.train.tracking import start_run_log

    shared = tmp_path / "shared" / "logs"
    stale = tmp_path / "head-1" / "smoke"
    stale.mkdir(parents=True)
    (stale / "metrics.jsonl").write_text('{"step": 99, "loss": 0.5}\n')
    values = {"loss": 1.0, "lr": 1e-3, "studies_per_s": 1.0, "data_wait_fraction": 0.0}

    first = start_run_log(stale, 3, str(shared), {})
    for step in (1, 2):
        ray_session.get(first.log_step.remote({**values, "step": step}, 0.0, None))
    ray_session.get(first.flush.remote())
    second = start_run_log(tmp_path / "head-2" / "smoke", 3, str(shared), {})   # the run resumed elsewhere
    ray_session.get(second.log_step.remote({**values, "step": 3}, 0.0, "ckpt"))
    ray_session.get(second.flush.remote())

    steps = [json.loads(line)["step"] for line in (shared / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert any(shared.glob("tensorboard/events.out.tfevents*"))
    for actor in (first, second):
        ray_session.kill(actor)
