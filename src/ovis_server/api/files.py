"""Output files by signed URL: a plain GET with no token, until the link expires."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from ovis_server.api.errors import LINK_REFUSED, ApiError, request_not_found
from ovis_server.api.runcomfy.protocol import ErrorBody
from ovis_server.storage.base import KEY_PATTERN
from ovis_server.storage.local import FILE_ROUTE, LocalFileStore

router = APIRouter(tags=["Files"])

_REFUSED = ApiError(
    403,
    LINK_REFUSED,
    "this file link is invalid or has expired; fetch the request's result again for a fresh one",
)


@router.get(
    FILE_ROUTE + "/{request_id}/{name}",
    response_class=FileResponse,
    responses={
        200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}},
        403: {"model": ErrorBody, "description": "Bad signature or expired link"},
        404: {"model": ErrorBody, "description": "No such file"},
    },
)
def get_file(
    request_id: str,
    name: str,
    request: Request,
    expires: str | None = None,
    signature: str | None = None,
) -> FileResponse:
    path = signed_file(request, request_id, name, expires, signature)
    return FileResponse(path, headers={"Cache-Control": "private, max-age=3600"})


def signed_file(
    request: Request, request_id: str, name: str, expires: str | None, signature: str | None
) -> Path:
    """The local file a signed link names; 403 for a bad or expired signature, 404 where
    the file is gone. (The playground's thumbnails check their links through it too.)"""
    key = f"{request_id}/{name}"
    if not KEY_PATTERN.fullmatch(key) or not expires or not signature:
        raise _REFUSED
    try:
        expires_at = int(expires)
    except ValueError:
        raise _REFUSED from None
    files = request.app.state.files
    if not isinstance(files, LocalFileStore) or not files.signer.is_valid(
        key, expires_at, signature
    ):
        raise _REFUSED
    path = files.path(key)
    # Only files of requests that exist: a deleted one's files go at once, even while
    # their removal from the disk waits (jobs/deletions.py).
    if not path.is_file() or request.app.state.store.get(request_id) is None:
        raise request_not_found(request_id)
    return path
