"""Local paths and ``s3://`` URIs behind one small interface, on ``pyarrow.fs``.

Credentials and region come from the standard AWS environment or profile
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``,
``AWS_REGION``); ``storage.endpoint_url`` points at an S3-compatible store (MinIO, moto, ...).
A ``Storage`` pickles as its settings only: the filesystem, which holds resolved credentials,
is rebuilt from the environment of whichever process uses it, so no secret ever travels in a
Ray task argument. Ray workers get the AWS variables through their environment.

Objects are read, written and listed with boto3 (one request per object); Ray Data's Parquet
readers and writers get the equivalent ``pyarrow.fs.S3FileSystem`` (``resolve``). Both retry
transient S3 errors (5xx, throttling, dropped connections) with exponential backoff, the
AWS SDKs' standard retry strategy, up to ``storage.retries`` attempts.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join URI or path parts with single slashes."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


@dataclass(frozen=True)
class Storage:
    """Reads, writes and lists files under local paths or ``s3://bucket/key`` URIs."""

    endpoint_url: str | None = None
    region: str | None = None
    retries: int = 5

    @classmethod
    def from_config(cls, storage_config) -> Storage:
        return cls(storage_config.endpoint_url, storage_config.region, storage_config.retries)

    def _region(self) -> str:
        return self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"

    # -- filesystems ---------------------------------------------------------------------
    def s3_filesystem(self) -> pafs.S3FileSystem:
        """An S3 filesystem with credentials from this process's environment or profile."""
        options: dict = {
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=max(1, self.retries)),
            "region": self._region(),
        }
        if self.endpoint_url:
            parsed = urlparse(self.endpoint_url)
            options["endpoint_override"] = parsed.netloc or parsed.path
            options["scheme"] = parsed.scheme or "https"
        return pafs.S3FileSystem(**options)

    def resolve(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """``(filesystem, path)`` for a URI: ``bucket/key`` on S3, an absolute local path otherwise."""
        if is_s3(uri):
            return self.s3_filesystem(), uri[len("s3://") :].rstrip("/")
        if "://" in uri and not uri.startswith("file://"):
            raise ValueError(f"unsupported storage URI {uri!r}: use a local path or s3://bucket/key")
        return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))

    # -- operations (S3 through boto3: one request per object, standard retries) --------
    def _s3_client(self):
        """A boto3 S3 client for this process (cached; never pickled with the Storage)."""
        client = _S3_CLIENTS.get(self)
        if client is None:
            import boto3
            from botocore.config import Config as BotoConfig

            # "Found credentials in environment variables." at INFO from every worker that reads S3.
            logging.getLogger("botocore.credentials").setLevel(logging.WARNING)

            client = boto3.session.Session().client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=self._region(),
                config=BotoConfig(retries={"max_attempts": max(1, self.retries), "mode": "standard"}),
            )
            _S3_CLIENTS[self] = client
        return client

    def read_bytes(self, uri: str) -> bytes:
        if is_s3(uri):
            bucket, key = _split_s3(uri)
            client = self._s3_client()
            with _s3_errors(uri):
                try:
                    return client.get_object(Bucket=bucket, Key=key)["Body"].read()
                except client.exceptions.NoSuchKey:
                    raise FileNotFoundError(f"no such object: {uri}") from None
        try:
            with open(self._local(uri), "rb") as handle:
                return handle.read()
        except (FileNotFoundError, IsADirectoryError):
            raise FileNotFoundError(f"no such object: {uri}") from None

    def read_head(self, uri: str, nbytes: int) -> bytes:
        """The first ``nbytes`` of a file (all of a shorter one), never more: one ranged GET on S3
        (``Range: bytes=0-{nbytes - 1}``). For headers (a DICOM file's, before deciding to read it whole):
        a huge file costs what its head does. Errors as ``read_bytes``."""
        if nbytes <= 0:
            return b""
        if is_s3(uri):
            from botocore.exceptions import ClientError

            bucket, key = _split_s3(uri)
            client = self._s3_client()
            with _s3_errors(uri):
                try:
                    return client.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{nbytes - 1}")["Body"].read()
                except client.exceptions.NoSuchKey:
                    raise FileNotFoundError(f"no such object: {uri}") from None
                except ClientError as error:
                    if error.response.get("Error", {}).get("Code") == "InvalidRange":  # an empty object has no byte 0
                        return b""
                    raise
        try:
            with open(self._local(uri), "rb") as handle:
                return handle.read(nbytes)
        except (FileNotFoundError, IsADirectoryError):
            raise FileNotFoundError(f"no such object: {uri}") from None

    def read_many(self, uris: list[str], threads: int = 8) -> list[bytes]:
        """``read_bytes`` of each URI, in order; S3 objects several at a time (a DICOM series is a file per slice)."""
        if len(uris) < 2 or not is_s3(uris[0]):
            return [self.read_bytes(uri) for uri in uris]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(threads, len(uris)), thread_name_prefix="storage-read") as pool:
            return list(pool.map(self.read_bytes, uris))

    def write_bytes(self, uri: str, data: bytes) -> None:
        if is_s3(uri):
            bucket, key = _split_s3(uri)
            with _s3_errors(uri):
                self._s3_client().put_object(Bucket=bucket, Key=key, Body=data)
            return
        path = self._local(uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)

    @contextmanager
    def parallel_writer(self, base: str, threads: int = 8):
        """``write(relative_path, data)`` under ``base`` on a thread pool: one PUT is mostly latency, so many
        small objects (a DICOM series is a file per slice) go out several at a time. Waits for every write,
        and raises the first failure, on leaving the block."""
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        pending: set = set()

        def settle(block_until: int) -> None:
            nonlocal pending
            while len(pending) > block_until:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()

        with ThreadPoolExecutor(threads, thread_name_prefix="storage-write") as pool:
            def write(relative_path: str, data: bytes) -> None:
                settle(4 * threads)   # bounded: memory stays flat however many files come
                pending.add(pool.submit(self.write_bytes, join(base, relative_path), data))

            yield write
            settle(0)

    def delete(self, uri: str) -> None:
        """Remove one object or file; one that is not there is no error."""
        if is_s3(uri):
            bucket, key = _split_s3(uri)
            with _s3_errors(uri):
                self._s3_client().delete_object(Bucket=bucket, Key=key)
            return
        try:
            os.remove(self._local(uri))
        except FileNotFoundError:
            pass

    def exists(self, uri: str) -> bool:
        if is_s3(uri):
            bucket, key = _split_s3(uri)
            with _s3_errors(uri):
                listing = self._s3_client().list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
            return any(item["Key"] == key or item["Key"].startswith(key.rstrip("/") + "/")
                       for item in listing.get("Contents", []))
        return os.path.exists(self._local(uri))

    def list_files(self, prefix: str) -> list[str]:
        """Every file under a folder or key prefix, recursively, as URIs in sorted order. Locally, links to
        folders are not followed (a link loop is not walked) and links that lead to no file (dangling, or
        a loop) are left out."""
        return sorted(self.file_sizes(prefix))

    def file_sizes(self, prefix: str) -> dict[str, int]:
        """``{uri: size in bytes}`` of every file ``list_files`` lists."""
        if is_s3(prefix):
            bucket, key = _split_s3(prefix)
            key = key.rstrip("/") + "/" if key else ""
            with _s3_errors(prefix):
                pages = self._s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
                return {f"s3://{bucket}/{item['Key']}": item["Size"] for page in pages
                        for item in page.get("Contents", [])
                        if not item["Key"].endswith("/")}   # not folder marker objects
        root = self._local(prefix)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"no such folder or prefix: {prefix}")
        paths = (os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names)
        sizes = {}
        for path in paths:
            try:
                if os.path.isfile(path):
                    sizes[path] = os.path.getsize(path)
            except OSError:   # removed while listed
                pass
        return sizes

    def folder_links(self, prefix: str) -> dict[str, str | None]:
        """The symbolic links directly in a local folder that ``list_files`` does not follow: link path -> the
        real path of the folder it leads to, or None where it leads nowhere (dangling, or a loop of links).
        Links to files are not here (``list_files`` lists them). S3 has no links: ``{}``."""
        if is_s3(prefix):
            return {}
        links: dict[str, str | None] = {}
        with os.scandir(self._local(prefix)) as entries:
            for entry in entries:
                if entry.is_symlink():
                    if os.path.isdir(entry.path):
                        links[entry.path] = os.path.realpath(entry.path)
                    elif not os.path.exists(entry.path):
                        links[entry.path] = None
        return dict(sorted(links.items()))

    @staticmethod
    def _local(uri: str) -> str:
        if "://" in uri and not uri.startswith("file://"):
            raise ValueError(f"unsupported storage URI {uri!r}: use a local path or s3://bucket/key")
        return os.path.abspath(uri.removeprefix("file://"))


_S3_CLIENTS: dict[Storage, object] = {}


@contextmanager
def _s3_errors(uri: str):
    """S3 failures that survived the retries, as ``OSError`` naming the URI."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (BotoCoreError, ClientError) as error:
        raise OSError(f"S3 request for {uri} failed: {error}") from error


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key
