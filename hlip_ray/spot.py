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

The Ray address is checked when the watcher starts (``check_ray_address``), not first at a notice. Only a
notice as AWS documents it is acted on; any other answer (an HTML page, a 500) is logged, at most once a
minute, and drains nothing.

Standard library only until a drain: a few MB, no GPU.
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

TOKEN_PATH = "/latest/api/token"
NOTICE_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
TOKEN_TTL_S = 21600
REQUEST_TIMEOUT_S = 2.0
NOTICE_ACTIONS = ("terminate", "stop", "hibernate")
"""The ``action`` values AWS documents for ``spot/instance-action``."""
RAY_CONNECT_TIMEOUT_S = 3.0
"""The start's check of the Ray address: a TCP connect to the cluster's GCS, given this long."""
DRAIN_TIMEOUT_S = 60
"""The most ``ray drain-node`` may take; less where the notice leaves less (``drain_timeout_s``)."""
DRAIN_MARGIN_S = 3
DRAIN_FLOOR_S = 10
"""A drain gets at least this long, however little the notice leaves: the drain's own start (Ray's CLI)
took 2-8 s on a loaded 16-core machine, so a shorter limit would end nearly every such drain."""
REPEAT_LOG_INTERVAL_S = 60.0
"""A problem that repeats (a 500, an answer that is not a notice) is logged at once, then at most this often."""
QUOTE_CHARS = 80
"""How much of an answer's body a log line quotes."""


@dataclass(frozen=True)
class Notice:
    """A reclaim notice: what the cloud will do and how many seconds remain until it does."""

    action: str
    seconds_left: int


class UnexpectedReply(Exception):
    """An answer of the metadata service that the watcher does not act on: a status other than 200 and
    404, or a 200 whose body is not a reclaim notice. ``kind`` groups repeats for ``RepeatedProblems``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class InstanceMetadata:
    """IMDSv2 at ``endpoint`` (``spot.imds_endpoint``): a session token, then GETs carrying it."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.token: str | None = None

    def get(self, path: str) -> tuple[int, bytes]:
        """``(status, body)`` of a GET; a 401 (token expired) fetches a new token once. A session token
        refused (any status but 200) raises ``UnexpectedReply``."""
        for _ in range(2):
            if self.token is None:
                status, token = self._request("PUT", TOKEN_PATH, {"X-aws-ec2-metadata-token-ttl-seconds":
                                                                  str(TOKEN_TTL_S)})
                if status != 200:
                    raise UnexpectedReply(f"HTTP {status} {TOKEN_PATH}",
                                          f"HTTP {status} from {self.endpoint}{TOKEN_PATH} for a session token "
                                          "(expected 200); still polling")
                self.token = token.decode(errors="replace")
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
    """The reclaim notice, or None while there is none (404). Any other status, or a 200 whose body is
    not a notice as AWS documents it (``parse_notice``), raises ``UnexpectedReply``."""
    status, body = metadata.get(NOTICE_PATH)
    if status == 404:
        return None
    if status != 200:
        raise _unexpected_status(metadata, NOTICE_PATH, status, "404 until a notice, then 200")
    return parse_notice(body, time.time() if now is None else now)


def parse_notice(body: bytes, now: float) -> Notice:
    """``spot/instance-action``'s body as AWS documents it: a JSON object with ``action`` (one of
    ``NOTICE_ACTIONS``) and ``time``, ISO 8601 with its time zone (AWS gives UTC, ``2026-12-05T22:20:00Z``).
    ``now``: epoch seconds. Anything else raises ``UnexpectedReply`` quoting the start of the body."""
    try:
        notice = json.loads(body)
    except ValueError:   # UnicodeDecodeError included
        notice = None
        reason = "not JSON"
    else:
        reason = _notice_problem(notice)
    if reason is None:
        at = datetime.datetime.fromisoformat(notice["time"].replace("Z", "+00:00"))
        return Notice(notice["action"], max(0, int(at.timestamp() - now)))
    raise UnexpectedReply("not a notice", f"HTTP 200 from {NOTICE_PATH} is not a reclaim notice ({reason}): "
                                          f"{_quote(body)}; ignored, not draining, still polling")


def _notice_problem(notice: object) -> str | None:
    """Why a parsed JSON value is not a reclaim notice, or None when it is one."""
    if not isinstance(notice, dict):
        return f"JSON {type(notice).__name__}, not an object"
    action, at = notice.get("action"), notice.get("time")
    if action not in NOTICE_ACTIONS:
        return f"action {_quote(action)} is none of {', '.join(NOTICE_ACTIONS)}"
    if not isinstance(at, str):
        return f"time {_quote(at)} is not an ISO 8601 string"
    try:
        parsed = datetime.datetime.fromisoformat(at.replace("Z", "+00:00"))
    except ValueError:
        return f"time {_quote(at)} is not ISO 8601"
    if parsed.tzinfo is None:
        return f"time {_quote(at)} has no time zone; AWS gives UTC, like 2026-12-05T22:20:00Z"
    return None


def _quote(value: object) -> str:
    """``value`` for a log line: text (bytes decoded) quoted, cut to ``QUOTE_CHARS`` with its full length."""
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if not isinstance(value, str):
        return repr(value)[:QUOTE_CHARS]
    if len(value) <= QUOTE_CHARS:
        return repr(value)
    return f"{value[:QUOTE_CHARS]!r}... ({len(value)} characters)"


def _unexpected_status(metadata: InstanceMetadata, path: str, status: int, expected: str) -> UnexpectedReply:
    return UnexpectedReply(f"HTTP {status} {path}", f"HTTP {status} from {metadata.endpoint}{path} (expected "
                                                     f"{expected}); ignored, still polling")


def rebalance_recommended(metadata: InstanceMetadata) -> bool:
    """Whether AWS recommends a rebalance (200; 404: not); another status raises ``UnexpectedReply``."""
    status = metadata.get(REBALANCE_PATH)[0]
    if status not in (200, 404):
        raise _unexpected_status(metadata, REBALANCE_PATH, status, "404, or 200 once recommended")
    return status == 200


class RepeatedProblems:
    """Problems that may repeat at every poll, printed at their first occurrence, then at most once every
    ``interval_s`` (default ``REPEAT_LOG_INTERVAL_S``) with how often they came since; per ``kind``."""

    def __init__(self, interval_s: float | None = None, clock=time.monotonic) -> None:
        self.interval_s = REPEAT_LOG_INTERVAL_S if interval_s is None else interval_s
        self.clock = clock
        self.last_printed: dict[str, float] = {}
        self.since_printed: dict[str, int] = {}

    def report(self, kind: str, line: str) -> None:
        now = self.clock()
        if kind not in self.last_printed:
            print(f"spot-watch: {line}", flush=True)
            self.last_printed[kind], self.since_printed[kind] = now, 0
            return
        self.since_printed[kind] += 1
        elapsed = now - self.last_printed[kind]
        if elapsed >= self.interval_s:
            print(f"spot-watch: {line} ({self.since_printed[kind]} times in the last {elapsed:.0f} s)", flush=True)
            self.last_printed[kind], self.since_printed[kind] = now, 0


def check_ray_address(address: str | None) -> str:
    """The Ray cluster's GCS address (``host:port``) that ``ray drain-node`` would drain through, checked
    now by a TCP connect (``RAY_CONNECT_TIMEOUT_S``). Resolved as ``ray drain-node`` does: ``address``
    (``--address``), else ``RAY_ADDRESS``, else the cluster that ``ray start`` last started on this
    machine (Ray's ``ray_current_cluster`` file), else the one raylet running here. Raises RuntimeError,
    one line naming the address and where it came from."""
    resolved, source = _ray_address(address)
    host, _, port = resolved.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or "/" in host:
        raise RuntimeError(f"the Ray address {resolved!r} ({source}) is not host:port: spot-watch needs the "
                           "cluster's GCS address, as `ray start --address` takes it (e.g. head-node:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as error:
        reason = "timed out" if isinstance(error, TimeoutError) else (error.strerror or type(error).__name__)
        raise RuntimeError(f"no Ray cluster at {resolved} ({source}): {reason}; start Ray first, or pass "
                           "--address HOST:PORT (the GCS address)") from None
    return resolved


def _ray_address(address: str | None) -> tuple[str, str]:
    """``(address, where it came from)``, in ``ray drain-node``'s order (``check_ray_address``)."""
    if address and address != "auto":
        return address, "--address"
    from_environment = os.environ.get("RAY_ADDRESS")
    if from_environment and from_environment != "auto":
        return from_environment, "RAY_ADDRESS"
    current_cluster = os.path.join(_ray_temp_dir(), "ray_current_cluster")
    try:
        with open(current_cluster, encoding="utf-8") as handle:
            recorded = handle.read().strip()
    except OSError:
        recorded = ""
    if recorded:
        return recorded, f"the cluster `ray start` last started on this machine, in {current_cluster}"
    running = sorted(_raylet_gcs_addresses())
    if len(running) == 1:
        return running[0], "the Ray node running on this machine"
    if running:
        raise RuntimeError(f"several Ray clusters run on this machine ({', '.join(running)}): pass --address")
    raise RuntimeError(f"no Ray cluster on this machine: no --address, RAY_ADDRESS is not set, no {current_cluster} "
                       "(`ray start` writes it) and no raylet runs here; start Ray first, or pass --address HOST:PORT")


def _ray_temp_dir() -> str:
    """Ray's temp dir, where ``ray start`` records its cluster: ``RAY_TMPDIR``, else ``TMPDIR`` (Linux),
    else /tmp; then ``ray``."""
    if "RAY_TMPDIR" in os.environ:
        base = os.environ["RAY_TMPDIR"]
    elif sys.platform.startswith("linux") and "TMPDIR" in os.environ:
        base = os.environ["TMPDIR"]
    else:
        base = "/tmp"
    return os.path.join(base, "ray")


def _raylet_gcs_addresses() -> set[str]:
    """The ``--gcs-address`` of every raylet running on this machine, read from /proc (Linux; elsewhere
    none): where ``ray drain-node`` looks when nothing else names a cluster."""
    addresses = set()
    try:
        pids = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return addresses
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                arguments = handle.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not arguments or "raylet" not in os.path.basename(arguments[0]):
            continue
        for argument in (part for words in arguments for part in words.split(" ")):
            if argument.startswith("--gcs-address="):
                addresses.add(argument.split("=", 1)[1])
    addresses.discard("")
    return addresses


def drain_timeout_s(seconds_left: int) -> int:
    """How long ``ray drain-node`` may take when the node goes in ``seconds_left``: within that, less
    ``DRAIN_MARGIN_S``; at most ``DRAIN_TIMEOUT_S``, at least ``DRAIN_FLOOR_S``."""
    return max(DRAIN_FLOOR_S, min(DRAIN_TIMEOUT_S, seconds_left - DRAIN_MARGIN_S))


def drain_node(seconds_left: int, message: str, *, address: str | None = None, node_id: str | None = None) -> None:
    """``ray drain-node`` of ``node_id`` (default: this machine's node) with reason PREEMPTION, within
    ``drain_timeout_s(seconds_left)``. ``address``: the GCS (``check_ray_address``); it is also the drain's
    ``RAY_ADDRESS``, so that this machine's node is looked up in that cluster. A failure or a timeout
    raises RuntimeError, one line."""
    command = [sys.executable, "-m", "ray.scripts.scripts", "drain-node", "--reason", "DRAIN_NODE_REASON_PREEMPTION",
               "--reason-message", message, "--deadline-remaining-seconds", str(max(1, seconds_left))]
    environment = dict(os.environ)
    if address:
        command += ["--address", address]
        environment["RAY_ADDRESS"] = address
    if node_id:
        command += ["--node-id", node_id]
    timeout_s = drain_timeout_s(seconds_left)
    where = f" at {address}" if address else ""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=environment)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"ray drain-node{where} did not finish within {timeout_s} s (the node goes in "
                           f"{seconds_left} s); the node may not be drained") from None
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise RuntimeError(f"ray drain-node{where} failed: {lines[-1] if lines else f'exit code {done.returncode}'}")


def watch(endpoint: str, poll_interval_s: float, *, address: str | None = None, node_id: str | None = None,
          stop_after_s: float | None = None) -> Notice | None:
    """Poll until a reclaim notice, drain the node, return the notice (None when ``stop_after_s`` ran out).
    ``address``: the Ray GCS, checked by the caller (``check_ray_address``). Answers that are not a notice
    or a 404 are logged (``RepeatedProblems``) and not acted on."""
    metadata = InstanceMetadata(endpoint)
    problems = RepeatedProblems()
    started, hinted, unreachable = time.monotonic(), False, False
    while stop_after_s is None or time.monotonic() - started < stop_after_s:
        try:
            notice = reclaim_notice(metadata)
            if not hinted and notice is None and rebalance_recommended(metadata):
                hinted = True
                print("spot-watch: rebalance recommended (a reclaim may follow); still polling", flush=True)
            unreachable = False
        except UnexpectedReply as reply:
            problems.report(reply.kind, str(reply))
            unreachable, notice = False, None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
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
