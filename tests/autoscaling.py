"""A cluster that autoscales from zero, on this machine: Ray's fake multi-node provider, the harness Ray
tests its own autoscaler with, with node types derived from cluster/aws.yaml.

The head is `ray start --head --autoscaling-config=...` with `RAY_FAKE_CLUSTER=1`: Ray's autoscaler (v1;
v2 reads a defaults file the PyPI wheel lacks) starts a "node" of a pool (a raylet with that type's
resources) when work asks for the pool's resource, and ends it when idle. The pools keep the names the job
configs request (cluster/aws.yaml's `cpu_pool`, `gpu_pool`, and the head's `driver`), with small counts; a
GPU node's trainer slots are its `gpu_pool`, as there is no CUDA here. Every pool starts at zero nodes.

Everything runs under a Ray temp folder of its own (`RAY_TMPDIR`): a command given the same `RAY_TMPDIR`
finds the cluster as it finds one that `ray start` runs on a machine. The cluster is ended by its process
ids (never `ray stop`, which would end every Ray on the machine); a node's processes are ended the same
way, which is how a spot node goes.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import yaml

from tests.conftest import REPO_ROOT

RAY = str(Path(sys.executable).with_name("ray"))
HEAD_PORT = 6379   # the fake nodes join the head at the default port only
HEAD_TYPE = "ray.head.default"   # the name the fake provider gives its head node's type


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def node_types(aws: dict, *, driver_slots: int = 8, cpu_nodes: int = 1, gpu_nodes: int = 2,
               gpu_slots: int = 2) -> dict:
    """cluster/aws.yaml's node types, one per pool, scaled to this machine: the head's resources as they are
    (CPU 0 and its `driver` slots), a CPU pool node of 2 logical CPUs with the pool's resource, and a GPU
    pool node whose `gpu_pool` slots stand in for its GPUs (each trainer takes one, and a CPU)."""
    types = aws["available_node_types"]
    head = types[aws["head_node_type"]]["resources"]
    out = {HEAD_TYPE: {"resources": {"CPU": head["CPU"], "driver": min(head["driver"], driver_slots)},
                    "node_config": {}, "max_workers": 0}}
    for spec in types.values():
        resources = spec["resources"]
        if "cpu_pool" in resources and "cpu_pool" not in out:
            out["cpu_pool"] = {"resources": {"CPU": 2, "cpu_pool": resources["cpu_pool"]}, "node_config": {},
                               "min_workers": 0, "max_workers": cpu_nodes}
        if "gpu_pool" in resources and "gpu_pool" not in out:
            out["gpu_pool"] = {"resources": {"CPU": gpu_slots, "gpu_pool": gpu_slots}, "node_config": {},
                               "min_workers": 0, "max_workers": gpu_nodes}
    return out


class AutoscalingCluster:
    """The head of a fake autoscaling cluster (see the module's docstring); a context manager."""

    def __init__(self, env: dict[str, str] | None = None, **sizes) -> None:
        aws = yaml.safe_load((REPO_ROOT / "cluster" / "aws.yaml").read_text())
        self.types = node_types(aws, **sizes)
        self.temp = tempfile.mkdtemp(prefix="ras-", dir="/tmp")   # short: Ray's socket paths have a length limit
        self.dashboard_port = _free_port()
        # Token authentication on, as on the shipped clusters: every client of the cluster needs the token.
        self.token = secrets.token_hex(32)
        self.env = {**os.environ, "RAY_TMPDIR": self.temp, "RAY_FAKE_CLUSTER": "1",
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_USAGE_STATS_ENABLED": "0",
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        self.env.update(env or {})
        self.env.pop("RAY_ADDRESS", None)

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self) -> AutoscalingCluster:
        config = {
            "cluster_name": "fake-aws", "max_workers": 8, "idle_timeout_minutes": 1, "upscaling_speed": 1.0,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True},
            "auth": {}, "docker": {}, "available_node_types": self.types, "head_node_type": HEAD_TYPE,
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        }
        path = Path(self.temp) / "autoscaling.yaml"
        path.write_text(yaml.safe_dump(config))
        head = self.types[HEAD_TYPE]["resources"]
        started = subprocess.run(
            [RAY, "start", "--head", f"--port={HEAD_PORT}", f"--autoscaling-config={path}",
             f"--num-cpus={head['CPU']}", f"--resources={json.dumps({'driver': head['driver']})}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
             f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
             "--disable-usage-stats"],
            env=self.env, capture_output=True, text=True, timeout=120)
        if started.returncode:
            self.stop()
            raise RuntimeError(started.stdout + started.stderr)
        return self

    def _state(self, what: str) -> list[dict]:
        """Ray's state API over the dashboard's HTTP, with the cluster's token."""
        request = urllib.request.Request(f"{self.dashboard}/api/v0/{what}?limit=10000&detail=1",
                                         headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)["data"]["result"]["result"]

    def nodes(self) -> list[dict]:
        """The cluster's nodes: ``node_id``, ``state``, ``resources_total``, ``is_head_node``, ..."""
        return self._state("nodes")

    def actors(self) -> list[dict]:
        """The cluster's actors: ``class_name``, ``state``, ``node_id``, ``actor_id``, ..."""
        return self._state("actors")

    def pool_of(self) -> dict[str, str]:
        """node id -> its pool (``head``, ``cpu_pool``, ``gpu_pool``), for the nodes alive now."""
        pools = {}
        for node in self.nodes():
            if node["state"] != "ALIVE":
                continue
            resources = node.get("resources_total") or {}
            pools[node["node_id"]] = ("head" if node.get("is_head_node") else
                                      next((name for name in ("gpu_pool", "cpu_pool") if name in resources), "?"))
        return pools

    def reclaim(self, node_id: str, notice_s: int = 20) -> None:
        """A spot reclaim of a pool node: a drain with a deadline (what `hlip-ray spot-watch` turns AWS's
        notice into), a few seconds for the notice's checkpoint, then the node's processes killed."""
        drained = subprocess.run(
            [RAY, "drain-node", f"--address=127.0.0.1:{HEAD_PORT}", f"--node-id={node_id}",
             "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=spot reclaim (test)",
             f"--deadline-remaining-seconds={notice_s}"],
            env=self.env, capture_output=True, text=True, timeout=60)
        assert drained.returncode == 0, drained.stdout + drained.stderr
        time.sleep(notice_s / 2)
        self._kill(lambda process: f"RAY_OVERRIDE_NODE_ID_FOR_TESTING={node_id}" in _environ(process))

    def stop(self) -> None:
        self._kill(lambda process: self.temp in " ".join(process.info["cmdline"] or ())
                   or f"RAY_TMPDIR={self.temp}" in _environ(process))
        shutil.rmtree(self.temp, ignore_errors=True)

    def __enter__(self) -> AutoscalingCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @staticmethod
    def _kill(chosen) -> None:
        found = [process for process in psutil.process_iter(["cmdline"])
                 if process.pid != os.getpid() and chosen(process)]
        for process in found:
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        psutil.wait_procs(found, timeout=15)


def _environ(process: psutil.Process) -> str:
    try:
        return "\0".join(f"{key}={value}" for key, value in process.environ().items())
    except psutil.Error:
        return ""
