"""Storage: local paths and s3:// through a real HTTP endpoint (moto), retries, no secrets."""

import os
import pickle

import pytest

from hlip_ray.storage import Storage
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


def test_read_head_reads_only_the_first_bytes_locally_and_on_s3(tmp_path, s3_endpoint, bucket):
    storage = Storage(endpoint_url=s3_endpoint)
    for root in (str(tmp_path / "local"), f"{bucket}/prefix"):
        storage.write_bytes(f"{root}/ten.bin", b"0123456789")
        storage.write_bytes(f"{root}/empty.bin", b"")
        assert storage.read_head(f"{root}/ten.bin", 4) == b"0123"  # a ranged GET on S3: only 4 bytes come
        assert storage.read_head(f"{root}/ten.bin", 100) == b"0123456789"  # a shorter file comes whole
        assert storage.read_head(f"{root}/empty.bin", 4) == b""  # S3 answers a range of an empty object 416
        with pytest.raises(FileNotFoundError, match="zero.bin"):
            storage.read_head(f"{root}/zero.bin", 4)
    sparse = tmp_path / "sparse.dcm"
    with open(sparse, "wb") as handle:
        handle.truncate(2 * 1024**3)  # 2 GiB without a byte on disk
    assert storage.read_head(str(sparse), 8) == bytes(8)


def test_folder_links_lists_the_links_that_listing_does_not_follow(tmp_path):
    (tmp_path / "root" / "real").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "f").write_bytes(b"1")
    (tmp_path / "root" / "linked").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "root" / "gone").symlink_to(tmp_path / "nowhere")
    (tmp_path / "root" / "file_link").symlink_to(tmp_path / "elsewhere" / "f")
    root = str(tmp_path / "root")
    assert Storage().list_files(root) == [f"{root}/file_link"]  # the folder link is not followed
    assert Storage().folder_links(root) == {f"{root}/gone": None,
                                            f"{root}/linked": os.path.realpath(tmp_path / "elsewhere")}
    assert Storage().folder_links("s3://bucket/prefix") == {}
