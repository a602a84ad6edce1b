"""Shared test set-up: offline Hugging Face, a moto S3 endpoint, one Ray cluster per session."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from hlip_ray.demo.local_s3 import use_local_credentials

# No model hub here or in CI: everything loads from local files or packaged weights.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Dummy credentials for moto's S3, set before Ray starts so its workers inherit them.
use_local_credentials()
# Ray Train's controller takes reports (a worker's report waits for it) and notices the end of a run
# once per health check: every 0.5 s rather than 2 s.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# MLflow's local file store (what the training test logs to) is opt-in since MLflow 3.
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")

REPO_ROOT = Path(__file__).resolve().parents[1]
HLIP_REFERENCE = Path(
    os.environ.get("HLIP_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "fixtures" / "hlip_reference")
)
# Logical resources of the test cluster: CPU pools for decoding, "trainer" slots for Ray Train.
TEST_CLUSTER = {"num_cpus": 8, "resources": {"data_pool": 64, "trainer": 4}}


@pytest.fixture(scope="session")
def hlip_reference() -> Path:
    """Golden outputs of HLIP's own encoder (see its README)."""
    if not (HLIP_REFERENCE / "cases.json").is_file():
        message = f"HLIP reference fixtures not found at {HLIP_REFERENCE} (set HLIP_REFERENCE_DIR)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return HLIP_REFERENCE


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1: a real HTTP endpoint."""
    from hlip_ray.demo.local_s3 import moto_server

    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def bucket(s3_endpoint, request):
    """A fresh bucket on the moto endpoint; yields ``s3://NAME``."""
    import boto3

    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + f"-{os.getpid() % 1000}"
    name = "".join(ch for ch in name if ch.isalnum() or ch == "-")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster shared by every test that needs Ray."""
    import ray

    # With its dashboard: Ray Train's placement-group cleaner asks the state API (which the dashboard serves)
    # whether a run's controller is alive, and without it never frees the CPUs of a run whose controller
    # was killed (a sweep's trial that Tune stopped).
    # On a free port: Ray's default (8265) stays free for the clusters that tests start themselves.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
             log_to_driver=False, **TEST_CLUSTER)  # never a running one
    yield ray
    ray.shutdown()
