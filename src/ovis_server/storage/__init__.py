"""Where output files live and how clients get them without a token."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ovis_server.storage.base import FileStore, InvalidKeyError, output_key
from ovis_server.storage.local import LocalFileStore
from ovis_server.storage.signing import UrlSigner, signer_for

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from ovis_server.config import Settings


def open_file_store(settings: Settings, db: Engine) -> FileStore:
    """The local data directory, or the bucket ``--storage s3://…`` names."""
    if settings.storage:
        from ovis_server.storage.s3 import S3FileStore

        return S3FileStore.from_url(settings.storage, settings.s3_endpoint_url)
    from ovis_server.db.connect import make_private_dir

    make_private_dir(settings.data_dir)
    return LocalFileStore(settings.files_dir, signer_for(db))


__all__ = [
    "FileStore",
    "InvalidKeyError",
    "LocalFileStore",
    "UrlSigner",
    "open_file_store",
    "output_key",
]
