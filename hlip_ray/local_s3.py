"""A local S3 endpoint (moto's server on 127.0.0.1) for the demo, benchmarks and tests."""

from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager

# moto accepts any credentials; these dummies are only ever sent to the local server.
LOCAL_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "local-moto", "AWS_SECRET_ACCESS_KEY": "local-moto",
                     "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def moto_server():
    """moto's S3 server on a free local port; yields its endpoint URL (``http://127.0.0.1:PORT``)."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as error:  # pragma: no cover
        raise ImportError("a local S3 endpoint needs moto: pip install 'hlip-ray[dev]'") from error

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def use_local_credentials() -> None:
    """Point the AWS variables at the local server's dummies (before Ray starts, so workers inherit)."""
    os.environ.update(LOCAL_CREDENTIALS)
    for key in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        os.environ.pop(key, None)
