"""A run's or a sweep's storage (``train.storage_path``, ``tune.storage_path`` on S3) that cannot be used is
refused before any work, in one line naming the URI and the cause: the bucket missing, the endpoint
unreachable, access denied. The probe is short (bounded tries and timeouts) and leaves nothing behind.
moto's S3 server (``s3_endpoint``) is the store; an endpoint where nothing listens is a free local port; a
store that denies access is a small HTTP server answering S3's 403."""

from __future__ import annotations

import http.server
import threading
import time

import pytest

from hlip_ray import cli, ray_runtime
from hlip_ray.config import ConfigError, load_config
from hlip_ray.demo.local_s3 import free_port
from hlip_ray.train.run import check_storage
from tests.conftest import REPO_ROOT
from tests.helpers import synthetic_corpus

SMOKE = str(REPO_ROOT / "jobs" / "configs" / "smoke.yaml")
LIST_EMPTY = (b'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
              b"<Name>locked</Name><Prefix>runs</Prefix><KeyCount>0</KeyCount><MaxKeys>1</MaxKeys>"
              b"<IsTruncated>false</IsTruncated></ListBucketResult>")
DENIED = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"


class DenyingS3:
    """An S3 endpoint that answers every write with 403 AccessDenied, and every read too unless ``reads``."""

    def __init__(self, reads: bool) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                status, body = (200, LIST_EMPTY) if reads and self.command == "GET" else (403, DENIED)
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = do_DELETE = do_HEAD = do_POST = _answer

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _train_config(storage_path: str, endpoint: str):
    return load_config(None, [f"train.storage_path={storage_path}", f"storage.endpoint_url={endpoint}"])


def test_a_writable_bucket_passes_and_the_probe_leaves_nothing_behind(bucket, s3_endpoint):
    import boto3

    check_storage(_train_config(f"{bucket}/runs", s3_endpoint))
    check_storage(_train_config(bucket, s3_endpoint))   # the bucket's root
    listing = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=bucket.removeprefix("s3://"))
    assert listing.get("KeyCount", 0) == 0, listing.get("Contents")


def test_a_missing_bucket_is_refused_naming_the_uri_and_the_bucket(s3_endpoint):
    with pytest.raises(ConfigError) as refused:
        check_storage(_train_config("s3://never-created-bucket/runs", s3_endpoint))
    assert str(refused.value) == (f"train.storage_path s3://never-created-bucket/runs: bucket 'never-created-bucket' "
                                  f"does not exist at {s3_endpoint}")


def test_an_unreachable_endpoint_is_refused_in_seconds_not_after_the_storage_retries(bucket):
    endpoint = f"http://127.0.0.1:{free_port()}"   # nothing listens there
    started = time.monotonic()
    with pytest.raises(ConfigError) as refused:
        check_storage(_train_config(f"{bucket}/runs", endpoint))
    assert time.monotonic() - started < 10
    assert str(refused.value).startswith(f"train.storage_path {bucket}/runs: the S3 endpoint {endpoint} is "
                                         "unreachable (could not connect"), refused.value
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("reads, doing", [(False, "listing the prefix"), (True, "writing an object")])
def test_access_denied_is_refused_saying_what_was_denied(reads, doing):
    store = DenyingS3(reads)
    try:
        with pytest.raises(ConfigError) as refused:
            check_storage(_train_config("s3://locked/runs", store.endpoint))
    finally:
        store.close()
    assert str(refused.value) == f"train.storage_path s3://locked/runs: access denied {doing} (AccessDenied)"


def test_hlip_ray_train_refuses_a_missing_bucket_in_one_line_and_starts_no_work(s3_endpoint, tmp_path, monkeypatch,
                                                                                 capsys):
    """Through the command line: exit status 3, one line, no traceback, and no actor or worker started."""
    from hlip_ray.data import quarantine

    def started(*args, **kwargs):
        raise AssertionError("the run started work before its storage was checked")

    monkeypatch.setattr(ray_runtime, "connect", lambda *args, **kwargs: False)
    monkeypatch.setattr(quarantine, "create_quarantine_log", started)
    synthetic_corpus(tmp_path, studies=2, seed=0, val_fraction=0.0)
    code = cli.main(["train", "train.storage_path=s3://never-created-bucket/runs",
                     f"storage.endpoint_url={s3_endpoint}", f"train.log_dir={tmp_path / 'logs'}",
                     f"data.manifest={tmp_path / 'manifest.parquet'}"])
    err = capsys.readouterr().err
    assert code == 3, err
    assert err.strip().splitlines() == [f"hlip-ray: train.storage_path s3://never-created-bucket/runs: bucket "
                                        f"'never-created-bucket' does not exist at {s3_endpoint}"]
    assert not (tmp_path / "logs").exists()


def test_hlip_ray_train_refuses_an_unreachable_endpoint_before_it_connects_to_ray(tmp_path, monkeypatch, capsys):
    def connect(*args, **kwargs):
        raise AssertionError("connected to Ray before the storage was checked")

    monkeypatch.setattr(ray_runtime, "connect", connect)
    endpoint = f"http://127.0.0.1:{free_port()}"
    synthetic_corpus(tmp_path, studies=2, seed=0, val_fraction=0.0)
    code = cli.main(["train", "train.storage_path=s3://runs-bucket/runs", f"storage.endpoint_url={endpoint}",
                     f"train.log_dir={tmp_path / 'logs'}", f"data.manifest={tmp_path / 'manifest.parquet'}"])
    assert code == 3
    assert f"the S3 endpoint {endpoint} is unreachable" in capsys.readouterr().err


def test_hlip_ray_tune_refuses_a_missing_bucket_before_it_connects_to_ray(s3_endpoint, tmp_path, monkeypatch, capsys):
    def connect(*args, **kwargs):
        raise AssertionError("connected to Ray before the storage was checked")

    monkeypatch.setattr(ray_runtime, "connect", connect)
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {grid: [1.0e-4, 1.0e-3]}\n")
    code = cli.main(["tune", "--space", str(space), "--config", SMOKE, "eval.vocabulary=v.json", "tune.grace_period=6",
                     "tune.storage_path=s3://never-created-bucket/sweeps", f"storage.endpoint_url={s3_endpoint}"])
    err = capsys.readouterr().err
    assert code == 3, err
    assert err.strip().splitlines() == [f"hlip-ray: tune.storage_path s3://never-created-bucket/sweeps: bucket "
                                        f"'never-created-bucket' does not exist at {s3_endpoint}"]
