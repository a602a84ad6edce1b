"""``hlip-ray spot-watch``: a cloud's reclaim notice turned into a Ray drain of this node.

AWS gives a spot instance about two minutes' notice. The instance metadata service (IMDSv2: a
session token first, then the token on every request) serves ``spot/instance-action`` (``{"action":
"terminate", "time": "2026-12-05T22:20:00Z"}``) once the instance is to be reclaimed, and 404 until
then; ``events/recommendations/rebalance`` comes earlier, when the risk of a reclaim rises. The
watcher, started on every worker node by the cluster's start commands, polls them. On a notice it
drains its Ray node with reason PREEMPTION and the notice's deadline (``ray drain-node``); Ray Train's
workers see it through ``ray.train.get_preemption_info()``, and the training loop writes a checkpoint
at once (``train.preemption_check_every``). A rebalance recommendation is logged as an early hint
and drains nothing. On Kubernetes the pod's preStop hook runs ``hlip-ray spot-watch --now`` instead.

Standard library only until a drain: a few MB, no GPU.
"""

from __future__ import annotations

import datetime
import json
import logging
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

logger = logging.getLogger(__name__)

TOKEN_PATH = "/latest/api/token"
NOTICE_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
TOKEN_TTL_S = 21600
REQUEST_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Notice:
    """A reclaim notice: what the cloud will do and how many seconds remain until it does."""

    action: str
    seconds_left: int


class InstanceMetadata:
    """IMDSv2 at ``endpoint`` (``spot.imds_endpoint``): a session token, then GETs carrying it."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.token: str | None = None

    def get(self, path: str) -> tuple[int, bytes]:
        """``(status, body)`` of a GET; a 401 (token expired) fetches a new token once."""
        for _ in range(2):
            if self.token is None:
                self.token = self._request("PUT", TOKEN_PATH, {"X-aws-ec2-metadata-token-ttl-seconds":
                                                               str(TOKEN_TTL_S)})[1].decode()
            status, body = self._request("GET", path, {"X-aws-ec2-metadata-token": self.token})
            if status != 401:
                return status, body
            self.token = None
        return status, body

    def _request(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        request = urllib.request.Request(self.endpoint + path, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, b""


def reclaim_notice(metadata: InstanceMetadata, now: float | None = None) -> Notice | None:
    """The reclaim notice, or None while there is none."""
    status, body = metadata.get(NOTICE_PATH)
    if status != 200:
        return None
    try:
        notice = json.loads(body)
        at = datetime.datetime.fromisoformat(notice["time"].replace("Z", "+00:00")).timestamp()
    except (ValueError, KeyError, TypeError, AttributeError):
        logger.warning("a reclaim notice that does not parse: draining with no deadline")
        return Notice("terminate", 0)
    now = time.time() if now is None else now
    return Notice(str(notice.get("action", "terminate")), max(0, int(at - now)))


def rebalance_recommended(metadata: InstanceMetadata) -> bool:
    return metadata.get(REBALANCE_PATH)[0] == 200


def drain_node(seconds_left: int, message: str, *, address: str | None = None, node_id: str | None = None) -> None:
    """``ray drain-node`` of ``node_id`` (default: this machine's node) with reason PREEMPTION."""
    command = [sys.executable, "-m", "ray.scripts.scripts", "drain-node", "--reason", "DRAIN_NODE_REASON_PREEMPTION",
               "--reason-message", message, "--deadline-remaining-seconds", str(max(1, seconds_left))]
    if address:
        command += ["--address", address]
    if node_id:
        command += ["--node-id", node_id]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"ray drain-node failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")


def watch(endpoint: str, poll_interval_s: float, *, address: str | None = None, node_id: str | None = None,
          stop_after_s: float | None = None) -> Notice | None:
    """Poll until a reclaim notice, drain the node, return the notice (None when ``stop_after_s`` ran out)."""
    metadata = InstanceMetadata(endpoint)
    started, hinted, unreachable = time.monotonic(), False, False
    while stop_after_s is None or time.monotonic() - started < stop_after_s:
        try:
            notice = reclaim_notice(metadata)
            if not hinted and notice is None and rebalance_recommended(metadata):
                hinted = True
                print("spot-watch: rebalance recommended (a reclaim may follow); still polling", flush=True)
            unreachable = False
        except (urllib.error.URLError, OSError) as error:
            if not unreachable:
                print(f"spot-watch: instance metadata at {endpoint} unreachable ({type(error).__name__}); "
                      "retrying (not on EC2?)", flush=True)
            unreachable, notice = True, None
        if notice is not None:
            print(f"spot-watch: reclaim notice ({notice.action} in {notice.seconds_left} s): draining the Ray node",
                  flush=True)
            drain_node(notice.seconds_left, f"spot {notice.action} notice", address=address, node_id=node_id)
            print("spot-watch: node drained; training checkpoints at its next check", flush=True)
            return notice
        time.sleep(poll_interval_s)
    return None
