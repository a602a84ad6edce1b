"""Training end to end: 2 Ray Train workers, DeepSpeed ZeRO-2, data and checkpoints on moto S3.

One tiny run is trained once (``trained_run``) and shared: the run's checkpoint and metrics, its
resumption, evaluation from the CLI and the checks that no credential leaks all use it.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest

from hlip_ray import cli
from hlip_ray.config import ConfigError, load_config
from hlip_ray.data.shards import read_index
from hlip_ray.demo.local_s3 import LOCAL_CREDENTIALS
from hlip_ray.inference.trained_model import load_model
from hlip_ray.run_checkpoint import STATE_FILE, TrainState, latest_checkpoint, rank_marker
from hlip_ray.storage import Storage
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
    from hlip_ray.train.loop import LoopConfig, Worker, start

    loop = LoopConfig(**loop_config)
    worker = Worker.create(loop)
    engine, _, state, resumed = start(worker, loop)
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
    assert cli.main(["eval", "--checkpoint", uri, f"storage.endpoint_url={endpoint}", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
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
    # 7 val studies: recall at 10 is undefined and left out (it was shown as "nan").
    assert "zero-shot" not in line and re.search(r"val loss \d+\.\d{3}, R@1/5 \d\.\d\d/\d\.\d\d -> ", line), line
    (between,) = [line for line in output if line.startswith("checkpoint at step 1 ")]
    assert between.startswith("checkpoint at step 1 (latest validation at step 0: val loss "), between
    steps = metrics_lines(trained_run["log_dir"].parent / "unlabelled")
    cadence = [(line["step"], line["val/step"], bool(line["checkpoint"])) for line in steps]
    assert cadence == [(1, 0, True), (2, 2, True)]
    validated = steps[-1]
    assert math.isfinite(validated["val/loss"]) and 0 <= validated["val/retrieval_r@1"] <= 1
    assert not math.isfinite(validated.get("val/zeroshot_auc", math.nan))   # no labels: no AUC (NaN is not logged)


def test_hlips_2026_options_train_end_to_end_and_the_checkpoint_loads_back(trained_run):
    """CLS + patch-mean pooling, 6 x 16 x 16 patches, sentence dropout, the dual loss (which refuses a batch
    without its sentence tokens, so the stream must bring them), the report prefix and repeated scans: two
    steps from the raw files, then the checkpoint loads into a model of that geometry and pooling."""
    import torch

    storage = trained_run["storage"]
    assert cli.main(["train", *trained_run["overrides"], "data.shards=null", "data.grid=[12,32,32]",
                     "model.patch_size=[6,16,16]", "model.pooling=cls_patch_mean", "data.sentence_dropout=0.3",
                     "model.sentence_loss_weight=0.5", 'data.report_prefix="This study shows: "',
                     "data.fill_scans=repeat", "train.run_name=hlip2026", "train.max_steps=2",
                     "train.checkpoint_every=2", "train.validate_every=2"]) == 0
    steps = metrics_lines(trained_run["log_dir"].parent / "hlip2026")
    assert [line["step"] for line in steps] == [1, 2] and all(math.isfinite(line["loss"]) for line in steps)
    model, config = load_model(f"s3://{BUCKET}/runs/hlip2026/checkpoint_00000002", storage)
    assert config.model.sentence_loss_weight == 0.5 and config.data.report_prefix == "This study shows: "
    assert model.visual.pooling == "cls_patch_mean" and model.visual.patch_size == (6, 16, 16)
    assert model.visual_proj.in_features == 2 * config.model.embed_dim
    with torch.no_grad():
        features = model.eval().encode_study(torch.zeros(1, 2, 1, 12, 32, 32, dtype=torch.uint8),
                                             torch.tensor([[True, False]]))
    assert features.shape == (1, 16) and torch.isfinite(features).all()


def test_a_run_folder_or_latest_stands_for_the_runs_latest_complete_checkpoint(trained_run, tmp_path, capsys):
    """``--checkpoint`` of eval, embed, predict and export: a run folder, or ``latest`` with the run's
    storage_path and run_name, is its latest complete checkpoint (said on the console); latest of a run
    without one is one line naming the folder."""
    run = f"s3://{BUCKET}/runs/e2e"
    endpoint = f"storage.endpoint_url={trained_run['config'].storage.endpoint_url}"
    # the run has 4 steps, or 6 once the resume test ran: its last checkpoint, as listed, is the one meant
    step = max(int(uri.split("/")[5].removeprefix("checkpoint_"))
               for uri in trained_run["storage"].list_files(run) if uri.endswith("/model.safetensors"))
    assert step in (4, 6)
    for given, extra in ((run, []), ("latest", [f"train.storage_path=s3://{BUCKET}/runs", "train.run_name=e2e"])):
        out = tmp_path / given.rsplit("/", 1)[-1]
        assert cli.main(["export", "--checkpoint", given, "--format", "safetensors", "--out", str(out), endpoint,
                         *extra]) == 0
        said = capsys.readouterr().err
        latest = f"{run}/checkpoint_{step:08d} (step {step})"
        assert f"--checkpoint {given}: the latest complete checkpoint, {latest}" in said
        assert (out / "model.safetensors").is_file()
    assert cli.main(["export", "--checkpoint", "latest", "--format", "hlip", "--out", str(tmp_path / "m.pt"), endpoint,
                     f"train.storage_path=s3://{BUCKET}/runs", "train.run_name=never-trained"]) == 3
    assert f"no complete checkpoint under s3://{BUCKET}/runs/never-trained" in capsys.readouterr().err


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


def _validation_line(monkeypatch, report: dict, vocabulary: dict | None) -> str:
    """The checkpoint line the driver prints for a validation whose ``evaluate`` gave ``report``: through
    the loop's ``Validation.measure`` and the run log's ``numeric`` (no engine, no Ray)."""
    from types import SimpleNamespace

    import ray.train
    import torch

    from hlip_ray.train import loop
    from hlip_ray.train.tracking import checkpoint_line, numeric

    monkeypatch.setattr(loop, "evaluate", lambda *args, **kwargs: report)
    monkeypatch.setattr(ray.train, "get_dataset_shard",
                        lambda name: SimpleNamespace(iter_torch_batches=lambda **kwargs: iter(())))
    validation = loop.Validation.__new__(loop.Validation)
    validation.worker = SimpleNamespace(config=load_config(None, []), rank=0, world_size=1)
    validation.has_val, validation.vocabulary, validation.tokenizer = True, vocabulary, None
    metrics = {**validation.measure(SimpleNamespace(module=torch.nn.Linear(1, 1))), "val/step": 4, "step": 4}
    return checkpoint_line(numeric(metrics), "s3://b/runs/r/checkpoint_00000004")


def test_a_val_split_whose_auc_is_undefined_is_reported_with_what_it_measured_and_why_no_auc(monkeypatch):
    """A val split where every label has one class (or no study carries a label) has no zero-shot AUC; the
    checkpoint line shows the loss and retrieval it has and says why the AUC is missing, never "no val
    split". A split too small for loss and retrieval says that; a partly undefined AUC counts its labels."""
    from hlip_ray.eval.zeroshot import auc_report

    vocabulary = {"hemorrhage": {}, "infarct": {}, "mass": {}}
    scores = {name: np.linspace(0, 1, 5) for name in vocabulary}
    one_class = auc_report(scores, [{"hemorrhage": 0, "infarct": 1, "mass": 0}] * 5)
    assert math.isnan(one_class["macro_auc"])
    retrieval = {"r@1": 0.2, "study_to_report_r@1": 0.2, "report_to_study_r@1": 0.2}
    line = _validation_line(monkeypatch, {"studies": 5, "loss": 2.31, "retrieval": retrieval, **one_class},
                            vocabulary)
    assert line == ("checkpoint at step 4: val loss 2.310, R@1 0.20; zero-shot AUC undefined (no label has both "
                    "classes among the 5 val studies) -> s3://b/runs/r/checkpoint_00000004"), line

    unlabelled = {"studies": 2, "loss": math.nan, "retrieval": {}, "macro_auc": math.nan, "per_label": {}}
    line = _validation_line(monkeypatch, unlabelled, vocabulary)
    assert "no val split" not in line and "val split of 2 studies: too few for loss and retrieval" in line, line
    assert "zero-shot AUC undefined (no label has both classes among the 2 val studies)" in line, line

    labels = [{"hemorrhage": i % 2, "infarct": 1, "mass": i // 3} for i in range(5)]
    partly = auc_report(scores, labels)
    line = _validation_line(monkeypatch, {"studies": 5, "loss": 2.31, "retrieval": retrieval, **partly}, vocabulary)
    assert re.match(r"checkpoint at step 4: val zero-shot AUC \d\.\d{3} \(hemorrhage \d\.\d{3}, mass \d\.\d{3}, "
                    r"1 label\(s\) undefined: one class in val\); val loss 2\.310, R@1 0\.20 ->", line), line
    # Without a vocabulary no AUC is asked for, and none is mentioned; without a val split, nothing is measured.
    line = _validation_line(monkeypatch, {"studies": 5, "loss": 2.31, "retrieval": retrieval}, None)
    assert "AUC" not in line and "val loss 2.310, R@1 0.20" in line, line
    from hlip_ray.train.tracking import validation_text

    assert validation_text({"val/step": 4}) == "no validation (no val split)"


def test_the_same_config_and_seed_give_the_same_loss_at_every_step_and_the_same_weights(trained_run, capsys):
    """Training is deterministic end to end: a second run of the same config (another name, so it
    starts afresh) reads the same studies, draws the same masks and writes the same bytes. Its
    console shows progress lines, one line per checkpoint and a summary."""
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
    summary = console[console.index(next(line for line in console if line.startswith("train: "))):]
    assert summary[0].startswith(f"train: s3://{BUCKET}/runs/e2e-again, step 2 after ") and summary[0].endswith(" s")
    assert summary[1] == f"  last checkpoint: {final}"
    assert re.match(r"  last metrics: .*\bloss \d", summary[2])
    assert summary[3].startswith("  refused by the data stream: ")


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


KILL_DRIVER = '''
import os, sys
from pathlib import Path

import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from hlip_ray.train.tracking import OneLineRestarts


def train(config):
    import os, time
    from pathlib import Path

    import ray.train
    import torch

    from hlip_ray.train.loop import stop_on_lost_peer
    from hlip_ray.train.tracking import quiet_worker_console

    quiet_worker_console()
    context = ray.train.get_context()
    rank, size = context.get_world_rank(), context.get_world_size()
    folder = Path(config["folder"])
    attempt = len(list(folder.glob(f"rank{rank}-*.pid")))
    with stop_on_lost_peer(rank, size):
        import deepspeed
        import deepspeed.comm

        deepspeed.init_distributed(dist_backend="gloo")
        (folder / f"rank{rank}-{attempt}.pid").write_text(str(os.getpid()))
        for _ in range(10 if attempt else 100_000):   # the first group runs until a worker is killed
            deepspeed.comm.all_reduce(torch.ones(1))
            time.sleep(config["between_s"])   # a step's work between its collectives


ray.init(log_to_driver=True)
folder = Path(sys.argv[1])
TorchTrainer(train, train_loop_config={"folder": str(folder), "between_s": float(sys.argv[2])},
             scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
             run_config=RunConfig(name="kill", storage_path=str(folder / "runs"),
                                  failure_config=FailureConfig(max_failures=1), callbacks=[OneLineRestarts()],
                                  worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})).fit()
print("fit returned", flush=True)
'''


def test_a_sigkilled_workers_group_restarts_with_one_line_and_no_traceback(ray_session, tmp_path):
    """Two Ray Train workers in DeepSpeed's collectives (gloo); one is SIGKILLed. Its peer's collective fails on
    the lost connection: the peer says so in one line (or is stopped before it gets there), the controller
    says in one line that the group restarts and which worker died, and no traceback reaches the console
    (before: the peer's traceback through DeepSpeed's comm layer, and Ray Train's report of both workers'
    errors with theirs). The group restarts and finishes. The other way a peer's collective fails, after Ray
    Train shut the process group down: ``test_a_collective_after_the_process_group_is_shut_down_...``."""
    import os
    import signal
    import subprocess
    import sys
    import time

    driver = tmp_path / "driver.py"
    driver.write_text(KILL_DRIVER)
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    run = subprocess.Popen([sys.executable, str(driver), str(tmp_path), "0.02"], env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not all((tmp_path / f"rank{rank}-0.pid").is_file() for rank in (0, 1)):
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()[0] if run.poll() else ""
            time.sleep(0.2)
        time.sleep(1)   # both in the loop of collectives
        killed = int((tmp_path / "rank0-0.pid").read_text())
        survivor = int((tmp_path / "rank1-0.pid").read_text())
        os.kill(killed, signal.SIGKILL)
        output, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 0 and "fit returned" in output, output[-5000:]
    assert (tmp_path / "rank0-1.pid").is_file()   # the group restarted
    # Ray Train's placement-group cleaner may fail to find its cluster where several run on one machine, as
    # in tests (docs/troubleshooting.md): its thread's traceback is not the restart's.
    lines = [line for line in output.splitlines() if "(PlacementGroupCleaner " not in line]
    assert not [line for line in lines if "Traceback" in line or "backend not set" in line], output[-5000:]
    restarts = [line for line in lines if "worker group restarting" in line]
    assert len(restarts) == 1, output[-5000:]
    assert re.search(rf"worker group restarting from its latest checkpoint \(failure 1 of 1 allowed\): rank 0 died "
                     rf"\(process {killed}\)(; rank 1 stopped: lost its peer)?$", restarts[0]), restarts[0]
    stopped = [line for line in lines if "a peer of the worker group is gone" in line]
    assert len(stopped) <= 1 and all(f"pid={survivor})" in line and "worker rank 1 of 2 stops" in line
                                     for line in stopped), stopped


SHUT_DOWN_GROUP = """
import socket

import deepspeed
import deepspeed.comm
import torch
import torch.distributed as dist

from hlip_ray.train.loop import PeerLost, stop_on_lost_peer

with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
deepspeed.init_distributed(dist_backend="gloo")
deepspeed.comm.all_reduce(torch.ones(1))
dist.destroy_process_group()   # what Ray Train's shutdown of the worker group does on every worker
for collective in (lambda: deepspeed.comm.get_world_size(), lambda: deepspeed.comm.all_reduce(torch.ones(1))):
    try:
        with stop_on_lost_peer(1, 2):
            collective()
    except PeerLost as error:
        print(f"{type(error.__cause__).__name__}: {str(error.__cause__)[:60]} -> {error}")
"""


def test_a_collective_after_the_process_group_is_shut_down_stops_the_worker_with_one_line(tmp_path):
    """A peer working between collectives when its worker group lost a worker reaches its next DeepSpeed
    collective after Ray Train shut the process group down: DeepSpeed's "backend not set" assertion (or
    torch's "not initialized"), raised again as ``PeerLost``, one line. In a process of its own (DeepSpeed's
    and torch's process group are global state)."""
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", SHUT_DOWN_GROUP], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"}, cwd=tmp_path)
    lines = [line for line in done.stdout.splitlines() if " -> " in line]
    assert done.returncode == 0 and len(lines) == 2, done.stdout + done.stderr[-3000:]
    assert lines[0].startswith("AssertionError: DeepSpeed backend not set"), lines[0]
    for line in lines:
        assert line.endswith(" -> worker rank 1 of 2 stops: a peer of the worker group is gone (the worker group's "
                             "process group was shut down); Ray Train restarts the group from its latest checkpoint "
                             "while train.max_failures allows"), line


GLOO_RESET = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:34189: "
              "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the "
              "application. Check the logs of the remote worker before")


def _peer_lost(monkeypatch):
    """A ``PeerLost`` as a worker raises it on gloo's reset connection, and the traceback Ray Train logs of it."""
    import traceback

    import torch.distributed as dist

    from hlip_ray.train.loop import PeerLost, stop_on_lost_peer

    monkeypatch.setattr(dist, "is_initialized", lambda: True)   # a group of 2, alive
    try:
        with stop_on_lost_peer(1, 2):
            raise RuntimeError(GLOO_RESET)
    except PeerLost as error:
        return error, traceback.format_exc()


def test_only_a_lost_peer_stops_a_worker_as_peer_lost(monkeypatch):
    import torch.distributed as dist

    from hlip_ray.train.loop import lost_peer, stop_on_lost_peer

    error, _ = _peer_lost(monkeypatch)
    assert str(error) == ("worker rank 1 of 2 stops: a peer of the worker group is gone (Read error "
                          "[127.0.0.1]:34189: Connection reset by peer); Ray Train restarts the group from its latest "
                          "checkpoint while train.max_failures allows")
    assert isinstance(error.__cause__, RuntimeError)   # Ray's worker log keeps the collective's traceback
    assert lost_peer(dist.DistNetworkError("Connection closed by peer"), 2) == "Connection closed by peer"
    # Any other error, or one worker alone, is raised as it is.
    assert lost_peer(RuntimeError("CUDA out of memory"), 2) is None
    assert lost_peer(RuntimeError(GLOO_RESET), 1) is None
    with pytest.raises(ValueError, match="a bug"), stop_on_lost_peer(0, 2):
        raise ValueError("a bug")


def test_the_workers_console_shows_a_lost_peer_in_one_line(monkeypatch, capsys):
    """Ray Train logs a worker's exception with its traceback ("Error in training function:"); the console
    shows a ``PeerLost`` as its message alone, and any other error whole."""
    from ray._private.log import PlainRayHandler
    from ray.train.v2._internal import util

    from hlip_ray.train.tracking import quiet_worker_console

    error, formatted = _peer_lost(monkeypatch)
    console = PlainRayHandler()
    monkeypatch.setattr(logging.getLogger(), "handlers", [console])
    quiet_worker_console()

    def shown(text: str) -> str:
        capsys.readouterr()
        console.handle(logging.LogRecord(util.__name__, logging.ERROR, __file__, 1, text, None, None))
        return capsys.readouterr().err

    assert shown(f"Error in training function:\n{formatted}") == f"{error}\n"
    other = "Error in training function:\nTraceback (most recent call last):\n  ...\nValueError: a bug\n"
    assert shown(other) == other + "\n"


def _restart_record(worker_failures: dict) -> logging.LogRecord:
    """Ray Train's controller logging its decision to restart the worker group after ``worker_failures``."""
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.execution.failure_handling import default

    error = WorkerGroupError("[Rank 0 Error Snippet]: ...", worker_failures)
    message = f"[FailurePolicy] RETRY\n  Source: worker group\n  Error count: 1 (max allowed: 2)\nError: {error}"
    return logging.LogRecord(default.__name__, logging.INFO, __file__, 1, message, None, (type(error), error, None))


def test_the_controllers_console_shows_a_restart_after_a_worker_died_in_one_line(monkeypatch):
    """Ray Train's report of a restart (every worker's error, tracebacks) is one line where a worker died and
    the others stopped on losing it; any other failure is left as Ray reports it. The backend shutdown's
    failure that Ray expects after a crash is not shown."""
    from ray.exceptions import ActorDiedError
    from ray.train.v2._internal.callbacks import backend_setup
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
    from ray.train.v2._internal.util import construct_user_exception_with_traceback

    from hlip_ray.train.tracking import RestartLine

    peer_lost, _ = _peer_lost(monkeypatch)
    died = WorkerHealthCheckFailedError("A worker health check failed.\nWorker info: Worker(\n  metadata=ActorMetadata("
                                        "\n    pid=4242,\n  ),\n)", ActorDiedError())
    try:
        raise peer_lost
    except type(peer_lost) as error:
        wrapped = construct_user_exception_with_traceback(error)   # as a worker's poll may bring it
    for failures in ({0: died, 1: peer_lost}, {0: died, 1: wrapped}):
        record = _restart_record(failures)
        assert RestartLine().filter(record) and record.exc_info is None
        assert record.getMessage() == ("worker group restarting from its latest checkpoint (failure 1 of 2 allowed): "
                                       "rank 0 died (process 4242); rank 1 stopped: lost its peer")
    record = _restart_record({0: died})
    assert RestartLine().filter(record) and record.getMessage() == (
        "worker group restarting from its latest checkpoint (failure 1 of 2 allowed): rank 0 died (process 4242)")

    bug = _restart_record({0: died, 1: ValueError("a bug")})
    message = bug.getMessage()
    assert RestartLine().filter(bug) and bug.getMessage() == message and bug.exc_info is not None

    shutdown = logging.LogRecord(backend_setup.__name__, logging.WARNING, __file__, 1, "Graceful shutdown of backend "
                                 "failed. This is expected if one of the workers has crashed.", None,
                                 (ActorDiedError, ActorDiedError(), None))
    assert not RestartLine().filter(shutdown)
