"""hlip-ray on a cluster as users have it: a head that runs no work (CPU 0, `driver` slots), a CPU pool
and a "GPU" pool that start at zero nodes and grow when work asks for them, and spot nodes that go.
The cluster is Ray's fake autoscaling provider with cluster/aws.yaml's node types (tests/autoscaling.py);
everything is driven as a user drives it: `hlip-ray` on the head (no RAY_ADDRESS: it finds the cluster),
`ray job submit` from the checkout, outputs read back from S3 (moto) once the cluster is gone.

- `hlip-ray` on the head joins the cluster and refuses a local storage path before any work, though the
  cluster has one node up when it starts (its pools are empty).
- A 2-trial sweep whose GPU pool can hold 2 one-worker trials (up to two GPU nodes of one slot) runs 2 at
  once once the nodes are up (it is sized on what the pools can grow to, not on the empty cluster at the
  start); trial drivers and every driver-side actor stay on the head; a GPU node reclaimed mid-sweep ends
  only its trial's worker, which resumes from its checkpoint, and every trial finishes. (Two trials, not
  four: on 2 cores four at once took 380-490 s of the suite.)
- A submitted training job's metrics and TensorBoard events are on S3 after the cluster is torn down; an
  evaluation job encodes on a GPU pool node, not on the head.
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
import threading
import time

import boto3
import pytest

from tests.autoscaling import RAY, AutoscalingCluster
from tests.conftest import REPO_ROOT
from tests.helpers import preprocessed_shards, synthetic_corpus

pytestmark = pytest.mark.slow

SMOKE = str(REPO_ROOT / "jobs" / "configs" / "smoke.yaml")
POOLS = ["resources.data=cpu_pool", "resources.trainer=gpu_pool", "resources.driver=driver"]
# Actors that may run on a pool node: the trainers, and Ray Data's one metrics actor of the whole cluster
# (detached, placed where Ray Data is first used, made again if its node goes). Everything else a run
# starts follows its driver.
POOL_ACTORS = {"RayTrainWorker", "_StatsActor"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, ray_session):
    root = synthetic_corpus(tmp_path_factory.mktemp("autoscaling"), studies=24, seed=7, val_fraction=0.34)
    preprocessed_shards(root, "--config", SMOKE)
    return root


@pytest.fixture(scope="module")
def cluster():
    # Dead nodes noticed within seconds, not Ray's 30 s: a reclaimed node's trainers restart sooner.
    with AutoscalingCluster(env={"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                                 "RAY_health_check_timeout_ms": "1000"}, gpu_slots=1) as started:
        yield started


def _data(corpus, s3_endpoint) -> list[str]:
    return [f"data.shards={corpus / 'shards'}", f"eval.vocabulary={corpus / 'raw' / 'vocabulary.json'}",
            f"storage.endpoint_url={s3_endpoint}", *POOLS]


def _hlip_ray(cluster: AutoscalingCluster, cwd, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`hlip-ray ARGS` on the head, from ``cwd``: the cluster's environment, no RAY_ADDRESS."""
    return subprocess.run([sys.executable, "-m", "hlip_ray.cli", *args], cwd=cwd, env=cluster.env,
                          capture_output=True, text=True, timeout=timeout)


def test_hlip_ray_on_the_head_joins_the_cluster_and_refuses_local_storage_before_any_work(
        cluster, corpus, s3_endpoint, tmp_path):
    assert set(cluster.pool_of().values()) == {"head"}          # the pools start empty
    train = _hlip_ray(cluster, tmp_path, "train", "--config", SMOKE, *_data(corpus, s3_endpoint),
                      f"train.storage_path={tmp_path / 'runs'}")
    assert train.returncode == 3, train.stdout[-3000:] + train.stderr[-3000:]
    assert re.search(r"^hlip-ray: connected to the Ray cluster at \S+:6379 \(started with `ray start` on this "
                     r"machine; 1 node\(s\) up\)$", train.stderr, re.M), train.stderr[-3000:]
    assert f"train.storage_path '{tmp_path / 'runs'}' is local to this node" in train.stderr
    assert "autoscales" in train.stderr and "Traceback" not in train.stderr

    space = str(REPO_ROOT / "tune_spaces" / "smoke.yaml")
    sweep = _hlip_ray(cluster, tmp_path, "tune", "--space", space, "--config", SMOKE, *_data(corpus, s3_endpoint),
                      "tune.scheduler=fifo")
    assert sweep.returncode == 3 and f"tune.storage_path '{tmp_path / 'sweeps'}' is local to" in sweep.stderr, \
        sweep.stderr[-3000:]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "sweeps").exists()
    assert set(cluster.pool_of().values()) == {"head"}          # no work asked for a node


class _Watcher(threading.Thread):
    """Polls the cluster's actors every 2 s: the most trainers alive at once, and where each kind of actor
    ran (pool names)."""

    def __init__(self, cluster: AutoscalingCluster) -> None:
        super().__init__(daemon=True)
        self.cluster, self.stop = cluster, threading.Event()
        self.most_trainers, self.placed = 0, {}
        self.trainer_nodes: dict[str, str] = {}

    def run(self) -> None:
        while not self.stop.wait(2):
            try:
                pools, actors = self.cluster.pool_of(), self.cluster.actors()
            except OSError:
                continue
            alive = [actor for actor in actors if actor["state"] == "ALIVE"]
            trainers = [actor for actor in alive if actor["class_name"] == "RayTrainWorker"]
            self.most_trainers = max(self.most_trainers, len(trainers))
            self.trainer_nodes = {actor["actor_id"]: actor["node_id"] for actor in trainers}
            for actor in alive:
                if actor["node_id"] in pools:
                    self.placed.setdefault(actor["class_name"], set()).add(pools[actor["node_id"]])


def test_a_sweep_grows_the_pools_runs_two_trials_at_once_and_rides_over_a_reclaimed_node(
        cluster, corpus, s3_endpoint, bucket, tmp_path):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    name = bucket.removeprefix("s3://")
    space = tmp_path / "space.yaml"
    space.write_text("model.attention_layout: {grid: [h2, full]}\n")
    watcher = _Watcher(cluster)
    watcher.start()
    sweep = subprocess.Popen(
        [sys.executable, "-m", "hlip_ray.cli", "tune", "--space", str(space),
         "--config", SMOKE, *_data(corpus, s3_endpoint), f"tune.storage_path={bucket}/sweeps", "tune.name=pools",
         "tune.scheduler=fifo", "train.num_workers=1", "train.chunk_size=2", "train.max_steps=8",
         "train.checkpoint_every=2", "train.report_every=2", "train.validate_every=8", "train.max_failures=3",
         "train.worker_start_timeout_s=20"],
        cwd=tmp_path, env=cluster.env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # Once every trial trains and one has a checkpoint, a GPU node that holds trainers is reclaimed.
        deadline = time.monotonic() + 600
        while not (watcher.most_trainers >= 2 and _keys(s3, name, "sweeps/pools/runs/", "checkpoint_")):
            assert sweep.poll() is None and time.monotonic() < deadline, _rest(sweep)
            time.sleep(2)
        pools = cluster.pool_of()
        reclaimed = next(node for node in watcher.trainer_nodes.values() if pools.get(node) == "gpu_pool")
        cluster.reclaim(reclaimed)
        output, _ = sweep.communicate(timeout=900)
    finally:
        watcher.stop.set()
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 0, output[-6000:]
    assert "hlip-ray tune: up to 2 trial(s) at once (2 gpu_pool in the autoscaler's node types, 1 a trial)" \
        in output, output[-3000:]
    assert watcher.most_trainers == 2
    # Only trainers ran on pool nodes; the trial drivers and every actor of the runs stayed on the head.
    assert watcher.placed["RayTrainWorker"] == {"gpu_pool"}
    assert {kind: pools for kind, pools in watcher.placed.items() if kind not in POOL_ACTORS and pools != {"head"}} \
        == {}, watcher.placed
    assert {"TrainController", "RunLog", "QuarantineLog"} <= set(watcher.placed)

    trials = s3.get_object(Bucket=name, Key="sweeps/pools/trials.csv")["Body"].read().decode()
    rows = list(csv.DictReader(io.StringIO(trials)))
    assert len(rows) == 2 and all(row["status"] == "finished" and row["steps"] == "8" for row in rows), rows
    # The reclaimed node's trial started its worker again from a checkpoint: its later steps say where from.
    steps = {}
    for key in _keys(s3, name, "sweeps/pools/runs/", "logs/metrics.jsonl"):
        body = s3.get_object(Bucket=name, Key=key)["Body"].read().decode()
        steps[key] = [(int(step["step"]), int(step["resumed_from"])) for step in map(json.loads, body.splitlines())]
    assert len(steps) == 2 and all(logged[-1][0] == 8 for logged in steps.values()), steps
    resumed = [logged for logged in steps.values() if any(start > 0 for _, start in logged)]
    assert resumed, steps


def _job(cluster: AutoscalingCluster, cwd, script: str, *args: str) -> subprocess.CompletedProcess:
    """`ray job submit` of ``jobs/SCRIPT`` with its driver on the head's `driver` slots.

    The code as the image holds it (cluster/kuberay/rayjob.yaml's entrypoint), not a working_dir upload: the
    fake nodes share one session folder, and there a job's unpacked working_dir was seen to vanish under its
    running driver as pool nodes came and went (on a real cluster each node has a disk of its own). The
    upload itself: tests/test_runtime_env.py and tests/test_job_submission.py."""
    return subprocess.run(
        [RAY, "job", "submit", "--address", cluster.dashboard, "--entrypoint-resources", '{"driver": 1}', "--",
         sys.executable, str(REPO_ROOT / "jobs" / script), *args],
        cwd=cwd, env=cluster.env, capture_output=True, text=True, timeout=600)


def test_a_training_jobs_metrics_outlive_the_cluster_and_an_eval_job_encodes_on_the_gpu_pool(
        cluster, corpus, s3_endpoint, bucket, tmp_path):
    trained = _job(cluster, tmp_path, "train.py", "--config", SMOKE, *_data(corpus, s3_endpoint),
                   f"train.storage_path={bucket}/runs", f"train.log_dir={tmp_path / 'logs'}", "train.num_workers=1",
                   "train.global_batch_size=4", "train.max_steps=4", "train.checkpoint_every=2")
    assert trained.returncode == 0, trained.stdout[-6000:] + trained.stderr[-3000:]
    assert re.search(r"^step 4/4 \(100%\)", trained.stdout, re.M), trained.stdout[-3000:]

    # Evaluation's encoding runs in an actor that asks for a trainer's slot: on the GPU pool, not the head.
    watcher = _Watcher(cluster)
    watcher.start()
    try:
        evaluated = _job(cluster, tmp_path, "eval.py", "--checkpoint", f"{bucket}/runs/smoke/checkpoint_00000004",
                         "--split", "val", "--json", f"storage.endpoint_url={s3_endpoint}", "eval.bootstrap_samples=0",
                         *POOLS)
    finally:
        watcher.stop.set()
    assert evaluated.returncode == 0, evaluated.stdout[-6000:] + evaluated.stderr[-3000:]
    report = json.loads(next(line for line in evaluated.stdout.splitlines() if line.startswith('{"checkpoint"')))
    assert report["studies"] > 0 and 0 <= report["macro_auc"] <= 1
    assert watcher.placed.get("EncoderActor") == {"gpu_pool"}, watcher.placed

    cluster.stop()   # the head goes, and the run's local log_dir with it
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    name = bucket.removeprefix("s3://")
    body = s3.get_object(Bucket=name, Key="runs/smoke/logs/metrics.jsonl")["Body"].read().decode()
    assert [int(json.loads(line)["step"]) for line in body.splitlines()] == [1, 2, 3, 4]
    assert _keys(s3, name, "runs/smoke/logs/tensorboard/", "events.out.tfevents")


def _keys(s3, bucket: str, prefix: str, containing: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", []) if containing in item["Key"]]


def _rest(process: subprocess.Popen) -> str:
    if process.poll() is None:
        return "timed out"
    return (process.stdout.read() if process.stdout else "")[-6000:]
