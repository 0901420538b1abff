"""Where uploaded files' bytes live (the Batch API's input, output and error files).

One small interface, `FileStore` (put / get / delete by id), and two stores: the default,
a local folder (`AGORA_FILES_DIR`, default `<AGORA_HOME>/files`), and an S3-compatible
bucket (`AGORA_FILES_URL=s3://bucket/prefix`, `S3FileStore`). Rows in `batch_files`
say whose a file is; the store only holds bytes. A deployment with several API replicas
uses the bucket, or points the folder at shared storage.

A store that cannot be reached (a full disk, an object store down) raises `Unavailable`:
the buyer gets a 503 to retry, and the batch runner tries again on its next pass.
"""

from __future__ import annotations

import os
import re
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path

from coordinator.errors import Unavailable
from coordinator.settings import CoordinatorSettings

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class FileMissing(Exception):
    """No bytes stored under this id."""


class StoreUnavailable(Unavailable):
    code = "file_store_unavailable"


class FileStore(ABC):
    @abstractmethod
    def put(self, file_id: str, data: bytes) -> None: ...

    @abstractmethod
    def get(self, file_id: str) -> bytes: ...

    @abstractmethod
    def delete(self, file_id: str) -> None: ...


class LocalFileStore(FileStore):
    """One file per id in a folder; written to a temporary name and renamed, so a reader
    never sees half a file and a crash never leaves one under its id."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, file_id: str) -> Path:
        if not _ID.match(file_id):  # ids are ours, but never let one name a path outside the folder
            raise ValueError(f"bad file id {file_id!r}")
        return self.root / file_id

    def put(self, file_id: str, data: bytes) -> None:
        path = self._path(file_id)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".put-")
        except OSError as exc:
            raise StoreUnavailable(f"the file store cannot take the file: {exc.strerror}") from exc
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError):  # e.g. the disk is full
                raise StoreUnavailable(f"the file store cannot take the file: {exc.strerror}") from exc
            raise

    def get(self, file_id: str) -> bytes:
        try:
            return self._path(file_id).read_bytes()
        except FileNotFoundError:
            raise FileMissing(file_id) from None
        except OSError as exc:
            raise StoreUnavailable(f"the file store cannot read the file: {exc.strerror}") from exc

    def delete(self, file_id: str) -> None:
        self._path(file_id).unlink(missing_ok=True)


class S3FileStore(FileStore):
    """An S3-compatible bucket (`AGORA_FILES_URL=s3://bucket/prefix`), for deployments with
    several API replicas: each file is one object, `<prefix>/<file id>`. boto3 (`pip install
    'agora[s3]'`) finds credentials the usual way (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a
    profile, an instance role); `AGORA_FILES_S3_ENDPOINT_URL` points it at another S3-compatible
    service (MinIO, Cloudflare R2, Ceph). A put is one PUT of the whole object, so a reader never
    sees half a file. A missing object is `FileMissing`; any other failure (the service down,
    access denied) is `StoreUnavailable`, a 503 to the buyer."""

    def __init__(self, bucket: str, prefix: str = "", client=None, endpoint_url: str | None = None):
        if client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError as exc:  # pragma: no cover - the extra is not installed
                raise RuntimeError("AGORA_FILES_URL=s3://... needs boto3: pip install 'agora[s3]'") from exc
            client = boto3.client("s3", endpoint_url=endpoint_url,
                                  config=Config(retries={"max_attempts": 3, "mode": "standard"},
                                                connect_timeout=5, read_timeout=60))
        self.client, self.bucket, self.prefix = client, bucket, prefix.strip("/")

    @classmethod
    def from_url(cls, url: str, endpoint_url: str | None = None, client=None) -> "S3FileStore":
        if not url.startswith("s3://"):
            raise ValueError(f"not an s3:// URL: {url!r}")
        bucket, _, prefix = url[len("s3://"):].partition("/")
        return cls(bucket, prefix, client=client, endpoint_url=endpoint_url)

    def _key(self, file_id: str) -> str:
        if not _ID.match(file_id):
            raise ValueError(f"bad file id {file_id!r}")
        return f"{self.prefix}/{file_id}" if self.prefix else file_id

    def _failed(self, exc: Exception, what: str) -> StoreUnavailable:
        return StoreUnavailable(f"the file store cannot {what} the file: {type(exc).__name__}")

    def put(self, file_id: str, data: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(file_id), Body=data)
        except (BotoCoreError, ClientError) as exc:
            raise self._failed(exc, "take") from exc

    def get(self, file_id: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(file_id))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileMissing(file_id) from None
            raise self._failed(exc, "read") from exc
        except BotoCoreError as exc:
            raise self._failed(exc, "read") from exc

    def delete(self, file_id: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:  # deleting a missing object succeeds in S3
            self.client.delete_object(Bucket=self.bucket, Key=self._key(file_id))
        except (BotoCoreError, ClientError) as exc:
            raise self._failed(exc, "delete") from exc


def make_file_store(settings: CoordinatorSettings) -> FileStore:
    if settings.files_url:
        return S3FileStore.from_url(settings.files_url, endpoint_url=settings.files_s3_endpoint_url)
    return LocalFileStore(settings.files_dir or settings.home / "files")
