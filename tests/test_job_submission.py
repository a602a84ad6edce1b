"""A real job submission: `ray start --head` on this machine (token authentication on, as Ray 2.60
defaults), then the `ray job` CLI as a user runs it from the repository root.

The smoke training job (jobs/train.py, jobs/configs/smoke.yaml, jobs/runtime_env.yaml) runs to
SUCCEEDED and its logs show the CLI's progress lines and final metrics; a second submission resumes
the run, and `ray job stop` ends it cleanly: STOPPED, its last line names the latest complete
checkpoint, that checkpoint loads, and none of the run's actors or CPU slots are left behind. The head
is stopped by its own process ids, never `ray stop` (which would end every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO_ROOT
from tests.helpers import preprocessed_shards, synthetic_corpus

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))
RUN_ACTORS = {"TrainController", "RayTrainWorker", "RunLog", "QuarantineLog", "SplitCoordinator", "DatasetManager"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _head_processes(temp_dir: str) -> list[psutil.Process]:
    """The head's processes (each names the head's temp folder) and their children (Ray's workers)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in process.info["cmdline"] or ()):
            found.append(process)
            found.extend(process.children(recursive=True))
    return found


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head started with `ray start --head`, its dashboard on 127.0.0.1; yields the job API address."""
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")   # short: Ray's socket paths have a length limit
    dashboard = _free_port()
    # Token authentication on, with a token of its own (Ray turns it on by itself only where
    # ~/.ray/auth_token exists); the jobs' drivers inherit it from the head to attach to the cluster.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    started = subprocess.run(
        [RAY, "start", "--head", "--num-cpus=4", f"--port={_free_port()}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--ray-client-server-port={_free_port()}",
         f"--dashboard-agent-listen-port={_free_port()}", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        env=env, capture_output=True, text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        processes = _head_processes(temp_dir)
        for process in processes:
            try:
                process.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(processes, timeout=15)
        for process in alive:
            process.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray_job(address: str, env: dict, command: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`ray job COMMAND` as a user runs it: from the repository root, with the cluster's token."""
    return subprocess.run([RAY, "job", command, "--address", address, *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory, ray_session):
    """A small synthetic corpus preprocessed into shards, where the head's jobs read them."""
    root = synthetic_corpus(tmp_path_factory.mktemp("smoke"), studies=24, seed=3, val_fraction=0.25)
    preprocessed_shards(root, "--config", str(REPO_ROOT / "jobs" / "configs" / "smoke.yaml"))
    return root


def _train_entrypoint(data: Path, *overrides: str) -> list[str]:
    return ["--runtime-env", "jobs/runtime_env.yaml", "--", "python", "jobs/train.py",
            "--config", "jobs/configs/smoke.yaml", "--json", f"data.shards={data / 'shards'}",
            f"eval.vocabulary={data / 'raw' / 'vocabulary.json'}", f"train.storage_path={data / 'runs'}",
            f"train.log_dir={data / 'logs'}", *overrides]


def test_the_job_api_refuses_a_client_without_the_token(ray_head):
    address, _ = ray_head
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{address}/api/jobs/", timeout=10)
    assert refused.value.code == 401


def test_smoke_training_job_succeeds_then_a_resumed_run_stops_cleanly_on_ray_job_stop(ray_head, smoke_data):
    from hlip_ray.config import load_config
    from hlip_ray.inference.trained_model import load_model
    from hlip_ray.run_checkpoint import TrainState
    from hlip_ray.storage import Storage

    address, env = ray_head
    submitted = _ray_job(address, env, "submit", "--submission-id", "smoke", *_train_entrypoint(smoke_data),
                         timeout=600)
    assert submitted.returncode == 0, _ray_job(address, env, "logs", "smoke").stdout[-6000:]
    status = _ray_job(address, env, "status", "smoke")
    assert re.search(r"\bsucceeded\b", status.stdout + status.stderr, re.I), status.stdout + status.stderr
    logs = _ray_job(address, env, "logs", "smoke").stdout
    assert re.search(r"^step 12/12 \(100%\)  loss \d+\.\d+ .* studies/s", logs, re.M), logs[-3000:]
    assert re.search(r"^checkpoint at step 12: val zero-shot AUC \d\.\d+ \(hemorrhage", logs, re.M), logs[-3000:]
    summary = json.loads(next(line for line in logs.splitlines() if line.startswith('{"run_dir"')))
    assert summary["metrics"]["step"] == 12 and 0 <= summary["metrics"]["val/zeroshot_auc"] <= 1
    assert summary["checkpoint"] == str(smoke_data / "runs" / "smoke" / "checkpoint_00000012")

    # The same run submitted again with more steps resumes at step 12; stop it once it has checkpointed again.
    submitted = _ray_job(address, env, "submit", "--submission-id", "smoke-resumed", "--no-wait",
                         *_train_entrypoint(smoke_data, "train.max_steps=1000"))
    assert submitted.returncode == 0, submitted.stderr[-4000:]
    deadline = time.monotonic() + 420
    while "checkpoint at step 18:" not in (logs := _ray_job(address, env, "logs", "smoke-resumed").stdout):
        status = _ray_job(address, env, "status", "smoke-resumed").stdout
        assert time.monotonic() < deadline and not re.search(r"\bfailed\b", status, re.I), logs[-3000:]
        time.sleep(3)
    assert not re.search(r"^checkpoint at step 6:", logs, re.M), "the resumed run started again from step 0"
    stopped = _ray_job(address, env, "stop", "smoke-resumed", timeout=120)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    status = _ray_job(address, env, "status", "smoke-resumed")
    assert re.search(r"\bstopped\b", status.stdout + status.stderr, re.I), status.stdout + status.stderr

    logs = _ray_job(address, env, "logs", "smoke-resumed").stdout
    named = re.search(r"^stopped; latest complete checkpoint: (\S+) \(step (\d+)\)", logs, re.M)
    assert named, logs[-3000:]
    checkpoint, step = named.group(1), int(named.group(2))
    assert step >= 18
    state = TrainState.from_json((Path(checkpoint) / "train_state.json").read_text())
    assert state.step == step
    model, _ = load_model(checkpoint, Storage(), load_config(REPO_ROOT / "jobs" / "configs" / "smoke.yaml"))
    assert sum(parameter.numel() for parameter in model.parameters()) > 0

    # Nothing of the run is left on the cluster.
    deadline = time.monotonic() + 60
    while True:
        listed = subprocess.run([RAY, "list", "actors", "--address", address, "--filter", "state=ALIVE",
                                 "--format", "json", "--limit", "1000"], capture_output=True, text=True,
                                timeout=60, env=env)
        alive = {actor["class_name"] for actor in json.loads(listed.stdout)} & RUN_ACTORS
        if not alive:
            break
        assert time.monotonic() < deadline, f"still alive after the stop: {alive}"
        time.sleep(2)
