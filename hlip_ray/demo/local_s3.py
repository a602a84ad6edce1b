"""A local S3 endpoint (moto's server on 127.0.0.1) for the demo, benchmarks and tests."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

# moto accepts any credentials; these dummies are only ever sent to the local server.
LOCAL_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "local-moto", "AWS_SECRET_ACCESS_KEY": "local-moto",
                     "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def moto_server(timeout_s: float = 60.0):
    """moto's S3 server on a free local port, in a process of its own (so serving S3 never competes
    with this process for the GIL); yields its endpoint URL (``http://127.0.0.1:PORT``)."""
    if importlib.util.find_spec("moto") is None:  # pragma: no cover
        raise ImportError("a local S3 endpoint needs moto: pip install 'hlip-ray[demo]'")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto's S3 server did not start on port {port}") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def use_local_credentials() -> None:
    """Point the AWS variables at the local server's dummies (before Ray starts, so workers inherit)."""
    os.environ.update(LOCAL_CREDENTIALS)
    for key in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        os.environ.pop(key, None)
