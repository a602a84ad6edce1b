"""Spot instances: `hlip-ray spot-watch` against a real HTTP instance-metadata server on 127.0.0.1 (IMDSv2:
token, then the paths) and a real two-node Ray cluster (`ray.cluster_utils.Cluster`): no notice, no drain;
a reclaim notice drains the watcher's node for real, with reason PREEMPTION and the notice's deadline.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from hlip_ray import spot
from tests.conftest import REPO_ROOT

TOKEN = "imds-session-token"


class MetadataServer:
    """The IMDSv2 paths the watcher reads: a token on PUT, then 404 for the notice until ``announce``."""

    def __init__(self) -> None:
        self.notice: dict | None = None
        self.rebalance = False
        self.unauthorized = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self):
                if self.path == spot.TOKEN_PATH and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    return self._reply(200, TOKEN.encode())
                self._reply(400, b"")

            def do_GET(self):
                if self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
                    server.unauthorized += 1
                    return self._reply(401, b"")
                if self.path == spot.NOTICE_PATH and server.notice is not None:
                    return self._reply(200, json.dumps(server.notice).encode())
                if self.path == spot.REBALANCE_PATH and server.rebalance:
                    return self._reply(200, b'{"noticeTime": "2026-12-05T22:00:00Z"}')
                self._reply(404, b"")

            def _reply(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def announce(self, seconds: int, action: str = "terminate") -> None:
        at = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)
        self.notice = {"action": action, "time": at.strftime("%Y-%m-%dT%H:%M:%SZ")}


@pytest.fixture
def metadata():
    server = MetadataServer()
    yield server
    server.httpd.shutdown()


def test_the_notice_is_read_through_an_imdsv2_session(metadata):
    reader = spot.InstanceMetadata(metadata.endpoint)
    assert spot.reclaim_notice(reader) is None and not spot.rebalance_recommended(reader)
    metadata.rebalance = True
    assert spot.rebalance_recommended(reader)
    metadata.announce(120)
    notice = spot.reclaim_notice(reader)
    assert notice.action == "terminate" and 115 <= notice.seconds_left <= 120
    assert metadata.unauthorized == 0
    reader.token = "expired"          # a stale token: one 401, a new token, the answer
    assert spot.reclaim_notice(reader).action == "terminate" and metadata.unauthorized == 1


def _driver(address: str, code: str) -> str:
    """Run ``code`` as a Ray driver of the cluster at ``address`` (this process is the session cluster's);
    returns the last line it prints."""
    code = f"import json, ray\nray.init(address={address!r}, log_to_driver=False)\n{code}"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def _draining(address: str) -> dict:
    """The cluster's draining nodes, as Ray Train's preemption watcher reads them."""
    return json.loads(_driver(address, "print(json.dumps(ray._private.state.state.get_draining_nodes()))"))


# A worker of the run on the node (a detached actor, as long-lived as a training worker): Ray drains an
# idle node at once, so only a node with work on it stays draining until its deadline.
WORKER = """
@ray.remote(num_cpus=1, resources={"trainer": 1})
class Worker:
    def node(self):
        return ray.get_runtime_context().get_node_id()
worker = Worker.options(name="worker", lifetime="detached").remote()
print(ray.get(worker.node.remote()))
"""


@pytest.mark.slow
def test_a_reclaim_notice_drains_the_watchers_node_for_real(metadata):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1})
    try:
        node = cluster.add_node(num_cpus=1, resources={"trainer": 1})
        cluster.wait_for_nodes()
        assert _driver(cluster.address, WORKER) == node.node_id
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        watcher = subprocess.Popen(
            [sys.executable, "-m", "hlip_ray.cli", "spot-watch", "--address", cluster.address, "--node-id",
             node.node_id, f"spot.imds_endpoint={metadata.endpoint}", "spot.poll_interval_s=0.2"],
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(2)
        assert watcher.poll() is None                 # no notice: it keeps polling, drains nothing
        assert _draining(cluster.address) == {}
        metadata.announce(90)
        output, _ = watcher.communicate(timeout=120)
        assert watcher.returncode == 0, output
        assert "reclaim notice (terminate in" in output and "node drained" in output
        draining = _draining(cluster.address)
        assert list(draining) == [node.node_id], draining
        # The deadline the notice gave, as milliseconds since the epoch.
        assert abs(draining[node.node_id] / 1000 - (time.time() + 90)) < 20
    finally:
        cluster.shutdown()
