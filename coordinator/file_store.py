"""Where uploaded files' bytes live (the Batch API's input, output and error files).

One small interface, `FileStore` (put / get / delete by id), and two stores: the default,
a local folder (`AGORA_FILES_DIR`, default `<AGORA_HOME>/files`), and an S3-compatible
bucket (`AGORA_FILES_URL=s3://bucket/prefix`, `file_store_s3.py`). Rows in `batch_files`
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


def make_file_store(settings: CoordinatorSettings) -> FileStore:
    if settings.files_url:
        from coordinator.file_store_s3 import S3FileStore

        return S3FileStore.from_url(settings.files_url, endpoint_url=settings.files_s3_endpoint_url)
    return LocalFileStore(settings.files_dir or settings.home / "files")
