"""Where output files live and how clients get them without a token."""

from ovis_server.storage.base import FileStore, InvalidKeyError, output_key
from ovis_server.storage.local import LocalFileStore
from ovis_server.storage.signing import UrlSigner

__all__ = ["FileStore", "InvalidKeyError", "LocalFileStore", "UrlSigner", "output_key"]
