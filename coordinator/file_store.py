"""Where uploaded files' bytes live (the Batch API's input, output and error files).

One small interface, `FileStore` (put / get / delete by id), and the default: a local
folder (`AGORA_FILES_DIR`, default `<AGORA_HOME>/files`). Rows in `batch_files` say whose
a file is; the store only holds bytes. A deployment with several API replicas points the
folder at shared storage (or adds an object-store implementation of the same interface).
"""

from __future__ import annotations

import os
import re
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path

from coordinator.settings import CoordinatorSettings

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class FileMissing(Exception):
    """No bytes stored under this id."""


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
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".put-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self._path(file_id))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, file_id: str) -> bytes:
        try:
            return self._path(file_id).read_bytes()
        except FileNotFoundError:
            raise FileMissing(file_id) from None

    def delete(self, file_id: str) -> None:
        self._path(file_id).unlink(missing_ok=True)


def make_file_store(settings: CoordinatorSettings) -> FileStore:
    return LocalFileStore(settings.files_dir or settings.home / "files")
