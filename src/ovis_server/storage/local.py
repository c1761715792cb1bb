"""Output files in a local directory, served by the API under signed URLs."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from ovis_server.storage.base import WRITE_CHECK_NAME, check_key, check_request_id
from ovis_server.storage.signing import UrlSigner

FILE_ROUTE = "/files"


class LocalFileStore:
    def __init__(self, root: Path, signer: UrlSigner) -> None:
        self.root = root
        self.signer = signer

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes, media_type: str) -> None:
        """Write the file durably: a job is marked done only after its file is on disk."""
        self._write(self.path(key), data)

    def check_writable(self) -> None:
        target = self.root / WRITE_CHECK_NAME
        self._write(target, b"ok")
        target.unlink(missing_ok=True)

    @staticmethod
    def _write(target: Path, data: bytes) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, staging = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            Path(staging).replace(target)
        except BaseException:
            Path(staging).unlink(missing_ok=True)
            raise

    def read(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def url(self, key: str, *, base_url: str, expires_in: int) -> str:
        check_key(key)
        return f"{base_url}{FILE_ROUTE}/{key}?{self.signer.query(key, expires_in)}"

    def delete_request(self, request_id: str) -> int:
        """Remove every file of one request; returns how many there were."""
        folder = self.root / check_request_id(request_id)
        if not folder.is_dir():
            return 0
        count = sum(1 for _ in folder.iterdir())
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile, by another
            shutil.rmtree(folder)
        # Any other OSError (a read-only or failing disk) reaches the caller, who tries
        # again later (jobs/deletions.py): files are never left behind without a word.
        return count
