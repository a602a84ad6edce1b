"""Storage: local paths and s3:// through a real HTTP endpoint (moto), retries, no secrets."""

import pickle

import pytest

from hlip_ray.data.storage import Storage
from tests.s3_servers import FlakyProxy


def test_local_and_s3_round_trip(tmp_path, s3_endpoint, bucket):
    storage = Storage(endpoint_url=s3_endpoint)
    for root in (str(tmp_path / "local"), f"{bucket}/prefix"):
        storage.write_bytes(f"{root}/a/one.bin", b"1")
        storage.write_bytes(f"{root}/a/b/two.bin", b"22")
        assert storage.read_bytes(f"{root}/a/b/two.bin") == b"22"
        assert storage.list_files(f"{root}/a") == [f"{root}/a/b/two.bin", f"{root}/a/one.bin"]
        assert storage.exists(f"{root}/a/one.bin") and not storage.exists(f"{root}/a/zero.bin")
        with pytest.raises(FileNotFoundError, match="zero.bin"):
            storage.read_bytes(f"{root}/a/zero.bin")


def test_transient_errors_are_retried_with_backoff(s3_endpoint, bucket):
    Storage(endpoint_url=s3_endpoint).write_bytes(f"{bucket}/x.bin", b"payload")
    with FlakyProxy(s3_endpoint, failures=3) as proxy:
        assert Storage(endpoint_url=proxy.endpoint, retries=5).read_bytes(f"{bucket}/x.bin") == b"payload"
        assert proxy.failed == 3 and proxy.requests > 3
    with FlakyProxy(s3_endpoint, failures=2) as proxy:
        Storage(endpoint_url=proxy.endpoint, retries=5).write_bytes(f"{bucket}/y.bin", b"written")
        assert proxy.failed == 2
    assert Storage(endpoint_url=s3_endpoint).read_bytes(f"{bucket}/y.bin") == b"written"
    with FlakyProxy(s3_endpoint, failures=3) as proxy, pytest.raises(OSError, match="SlowDown"):
        Storage(endpoint_url=proxy.endpoint, retries=2).read_bytes(f"{bucket}/x.bin")
    # the pyarrow filesystem that Ray Data's Parquet reader and writer use retries the same way
    with FlakyProxy(s3_endpoint, failures=3) as proxy:
        filesystem, path = Storage(endpoint_url=proxy.endpoint, retries=5).resolve(f"{bucket}/x.bin")
        with filesystem.open_input_stream(path) as stream:
            assert stream.read() == b"payload"
        assert proxy.failed == 3


def test_storage_and_its_filesystem_pickle_without_credentials(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "CANARY-SECRET-9f8e7d")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "CANARY-KEY-ID-1a2b")
    storage = Storage(endpoint_url=s3_endpoint)
    for obj in (storage, storage.s3_filesystem()):
        payload = pickle.dumps(obj)
        assert b"CANARY-SECRET" not in payload and b"CANARY-KEY-ID" not in payload
    assert "CANARY" not in repr(storage)


def test_unsupported_scheme_is_a_clear_error():
    with pytest.raises(ValueError, match="gs://bucket/x"):
        Storage().read_bytes("gs://bucket/x")
