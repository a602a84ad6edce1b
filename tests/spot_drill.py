"""A spot drill on one machine: a training run on a Ray cluster of several nodes while nodes are
reclaimed with notice, lost without one, or come back, as a spot fleet does to a run.

``LocalSpotCluster`` is a real multi-node Ray cluster (``ray.cluster_utils.Cluster``): a head that
decodes (``data_pool``) and trainer nodes (one ``trainer`` slot each). Every trainer node has its own
instance-metadata server (a small HTTP server on 127.0.0.1 that serves the IMDSv2 paths, as AWS does
at 169.254.169.254) and its own ``hlip-ray spot-watch``, started with the node as a cluster's start
commands would. ``reclaim`` announces a reclaim notice on a node's metadata server; the watcher drains
the node for real and, at the notice's deadline, the node is removed. ``kill_workers`` SIGKILLs the
training workers of a node, ``remove_node`` takes a node away without notice, ``add_trainer_node``
brings one back. ``TrainingRun`` is ``hlip-ray train`` on that cluster in a process of its own, read
through its ``metrics.jsonl`` (every step, with its wall time and world size).

The tests (``tests/test_spot.py``) and ``benchmarks/bench_spot.py`` drive it.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from hlip_ray import spot

IMDS_TOKEN = "local-imds-session-token"
DRILL_GLOBAL_BATCH = 4   # studies per step of ``drill_overrides``'s run


class MetadataServer:
    """The IMDSv2 paths the watcher reads, on 127.0.0.1: a session token on PUT, then with that token
    404 for the reclaim notice until ``announce``, and the rebalance hint once ``rebalance`` is set."""

    def __init__(self) -> None:
        self.notice: dict | None = None
        self.rebalance = False
        self.unauthorized = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self):
                if self.path == spot.TOKEN_PATH and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    return self._reply(200, IMDS_TOKEN.encode())
                self._reply(400, b"")

            def do_GET(self):
                if self.headers.get("X-aws-ec2-metadata-token") != IMDS_TOKEN:
                    server.unauthorized += 1
                    return self._reply(401, b"")
                if self.path == spot.NOTICE_PATH and server.notice is not None:
                    return self._reply(200, json.dumps(server.notice).encode())
                if self.path == spot.REBALANCE_PATH and server.rebalance:
                    return self._reply(200, b'{"noticeTime": "2026-12-05T22:00:00Z"}')
                self._reply(404, b"")

            def _reply(self, status: int, body: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):   # the watcher went (its node was removed)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def announce(self, seconds: float, action: str = "terminate") -> float:
        """Serve a reclaim notice for ``seconds`` from now; returns the deadline (epoch seconds)."""
        at = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)
        self.notice = {"action": action, "time": at.strftime("%Y-%m-%dT%H:%M:%SZ")}
        return at.replace(microsecond=0).timestamp()

    def close(self) -> None:
        self.httpd.shutdown()


def child_env() -> dict[str, str]:
    """This process's environment for a process of the drill's cluster (not a Ray address of its own)."""
    return {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}


@dataclass
class TrainerNode:
    """A trainer node of the drill: its Ray node, its metadata server and its spot watcher."""

    node: object
    metadata: MetadataServer
    watcher: subprocess.Popen

    @property
    def node_id(self) -> str:
        return self.node.node_id


class LocalSpotCluster:
    """A head (decoding, ``head_cpus`` CPUs and ``data_pool``) and ``trainer_nodes`` trainer nodes (1 CPU,
    1 ``trainer`` each), every trainer node with its metadata server and ``spot-watch``."""

    def __init__(self, trainer_nodes: int = 2, head_cpus: int = 2, poll_interval_s: float = 0.2) -> None:
        from ray.cluster_utils import Cluster

        self.poll_interval_s = poll_interval_s
        self.cluster = Cluster(initialize_head=True, connect=False,
                               head_node_args={"num_cpus": head_cpus, "resources": {"data_pool": 64},
                                               "include_dashboard": True, "dashboard_port": None})
        self.trainers: list[TrainerNode] = []
        try:
            for _ in range(trainer_nodes):
                self.add_trainer_node(wait=False)
            self.cluster.wait_for_nodes()
        except BaseException:
            self.shutdown()
            raise

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_trainer_node(self, wait: bool = True) -> TrainerNode:
        """A new trainer node, with its metadata server and watcher (call from the main thread)."""
        node = self.cluster.add_node(num_cpus=1, resources={"trainer": 1})
        metadata = MetadataServer()
        watcher = subprocess.Popen(
            [sys.executable, "-m", "hlip_ray.cli", "spot-watch", "--address", self.address, "--node-id",
             node.node_id, f"spot.imds_endpoint={metadata.endpoint}", f"spot.poll_interval_s={self.poll_interval_s}"],
            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        trainer = TrainerNode(node, metadata, watcher)
        self.trainers.append(trainer)
        if wait:
            self.cluster.wait_for_nodes()
        return trainer

    def reclaim(self, trainer: TrainerNode, seconds: float) -> float:
        """A reclaim notice for ``trainer``'s instance, ``seconds`` ahead; returns the deadline. Its
        watcher drains the node; ``remove_node`` at the deadline is the cloud taking it."""
        return trainer.metadata.announce(seconds)

    def watcher_output(self, trainer: TrainerNode, timeout: float = 60) -> str:
        """What ``trainer``'s watcher printed, once it has exited (after a drain)."""
        output, _ = trainer.watcher.communicate(timeout=timeout)
        return output

    def remove_node(self, trainer: TrainerNode) -> None:
        """The node goes, with its workers (call from the main thread)."""
        self.trainers.remove(trainer)
        self.cluster.remove_node(trainer.node, allow_graceful=False)
        self._stop(trainer)

    def kill_workers(self, trainer: TrainerNode) -> list[int]:
        """SIGKILL the Ray Train workers running on ``trainer``'s node; returns their process ids."""
        import psutil

        raylet = psutil.Process(trainer.node.all_processes["raylet"][0].process.pid)
        killed = []
        for process in raylet.children(recursive=True):
            try:
                if process.name().startswith("ray::RayTrainWorker") or any(
                        part.startswith("ray::RayTrainWorker") for part in process.cmdline()[:1]):
                    process.send_signal(signal.SIGKILL)
                    killed.append(process.pid)
            except psutil.NoSuchProcess:
                pass
        return killed

    def _stop(self, trainer: TrainerNode) -> None:
        if trainer.watcher.poll() is None:
            trainer.watcher.kill()
            trainer.watcher.communicate()
        trainer.metadata.close()

    def shutdown(self) -> None:
        for trainer in list(self.trainers):
            self._stop(trainer)
        self.trainers = []
        self.cluster.shutdown()


@dataclass
class TrainingRun:
    """``hlip-ray train`` on a drill cluster, in a process of its own; its steps come from the run's
    ``metrics.jsonl`` (one line per step a worker group took, redone steps included)."""

    address: str
    overrides: list[str]
    log_dir: Path
    process: subprocess.Popen | None = None
    output: str = ""
    started: float = field(default_factory=time.time)

    def start(self) -> TrainingRun:
        self.started = time.time()
        self.process = subprocess.Popen([sys.executable, "-m", "hlip_ray.cli", "train", *self.overrides],
                                        env={**child_env(), "RAY_ADDRESS": self.address},
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return self

    def steps(self) -> list[dict]:
        path = self.log_dir / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]

    def wait_for(self, predicate: Callable[[list[dict]], bool], timeout: float, what: str) -> list[dict]:
        """Poll the steps until ``predicate(steps)``; fails naming ``what`` after ``timeout`` s or when the
        run has ended first."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            steps = self.steps()
            if predicate(steps):
                return steps
            if self.process.poll() is not None:
                self.finish(30)
                raise AssertionError(f"the run ended before {what}: {self.output[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"no {what} within {timeout:.0f} s; last step {steps[-1:] if steps else None}")

    def finish(self, timeout: float) -> int:
        """Wait for the run to end; returns its exit status (its console output is in ``output``)."""
        try:
            self.output, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.output, _ = self.process.communicate()
            raise AssertionError(f"the run did not end within {timeout:.0f} s: {self.output[-3000:]}") from None
        return self.process.returncode


def segments(steps: list[dict]) -> list[list[dict]]:
    """The steps cut where a worker group started again (``resumed_from``, the step it started at, or
    its size changed, or a step does not follow the one before)."""
    out: list[list[dict]] = []
    for step in steps:
        last = out[-1][-1] if out else None
        if last and step["step"] == last["step"] + 1 and all(step[key] == last[key]
                                                             for key in ("workers", "resumed_from")):
            out[-1].append(step)
        else:
            out.append([step])
    return out


def drill_overrides(root: Path, run_name: str, *extra: str) -> list[str]:
    """A tiny run of the drill over the corpus ``write_drill_corpus`` wrote in ``root``: 4 studies per
    step, 2 per chunk (1 or 2 workers), checkpoints on shared storage (``file://``). The text tower has no
    dropout: its draws come from each worker's generator, so only without them is a run's result the
    same at every world size (the study encoder's draws are keyed on the study)."""
    return [
        "data.grid=[16,32,32]", "data.scans_per_study=2", "data.max_eval_scans=2", "data.windows=[[-20,140]]",
        f"data.manifest={root}/manifest.parquet", "resources.data=data_pool", "resources.trainer=trainer",
        "model.embed_dim=24", "model.num_heads=2", "model.depth=3", "model.projection_dim=16",
        "model.max_scan_slots=8", "model.patch_dropout=0.25", "model.drop_path=0.1",
        f"model.text.name_or_path={root}/text", "model.text.context_length=32",
        "train.num_workers=[1,2]", f"train.global_batch_size={DRILL_GLOBAL_BATCH}", "train.chunk_size=2",
        "train.zero_stage=2", "train.precision=fp32", "train.lr=1e-3", "train.warmup_steps=2", "train.report_every=50",
        f"train.storage_path=file://{root}/runs", f"train.log_dir={root}/logs", f"train.run_name={run_name}",
        "train.worker_start_timeout_s=3", "train.resize_check_interval_s=2", "spot.poll_interval_s=0.5",
        *extra,
    ]


def write_drill_corpus(root: Path, studies: int = 24, seed: int = 3) -> Path:
    """A synthetic corpus (``root/raw``, all training studies), its manifest and a tiny text tower."""
    from hlip_ray.data.manifest import build_manifest, write_manifest
    from hlip_ray.demo.synth import folder_writer, write_corpus
    from hlip_ray.storage import Storage
    from tests.helpers import write_tiny_text_tower

    write_corpus(folder_writer(str(root / "raw")), studies=studies, seed=seed)
    rows = build_manifest(str(root / "raw"), Storage(), salt="drill", val_fraction=0.0)
    write_manifest(rows, str(root / "manifest.parquet"), Storage())
    write_tiny_text_tower(root / "text", dropout=0.0)
    return root
