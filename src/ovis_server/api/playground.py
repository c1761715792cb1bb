"""The playground: its page, the models it offers, the model description it builds its form
from, and small thumbnails for its gallery.

The model list and descriptions are served without a token, so that the form shows before
one is entered (they hold nothing secret: the catalogue's public fields and the input schema
that /openapi.json has too; never an entry's weights). A thumbnail needs the same signed link
as the image it shrinks.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse
from PIL import Image
from pydantic import BaseModel

from ovis_server.api.files import signed_file
from ovis_server.api.runcomfy.protocol import CatalogueQuery, ModelDetail, ModelList, ResultResponse
from ovis_server.api.runcomfy.routes import CallerDep, catalogue, owned_requests
from ovis_server.api.state import base_url

STATIC = Path(__file__).parent / "static"
THUMBNAIL_ROUTE = "/playground/thumbnails"
THUMBNAIL_SIDE = 256  # pixels, the longer side: a gallery tile at twice its CSS size
THUMBNAIL_QUALITY = 75
PROMPT_START = 120  # characters of each request's prompt the gallery shows
_CACHED_THUMBNAILS = 256  # of some 10-40 KB each

router = APIRouter(include_in_schema=False)


@router.api_route("/", methods=["GET", "HEAD"])
def playground() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/playground/models", response_model_exclude_none=True)
def playground_models(request: Request) -> ModelList:
    """Every model the server serves (built-in and --extra-models), for the model picker."""
    return catalogue(request).list_models(CatalogueQuery(limit=500))


@router.get("/playground/models/{model_id:path}", response_model_exclude_none=True)
def playground_model(model_id: str, request: Request) -> ModelDetail:
    return catalogue(request).model(model_id)


class GalleryRequest(ResultResponse):
    prompt_start: str | None = None


class GalleryPage(BaseModel):
    requests: list[GalleryRequest]
    next_cursor: str | None = None


@router.get("/playground/requests", response_model_exclude_none=True)
def playground_requests(
    request: Request,
    caller: CallerDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(pattern=r"^[0-9]{1,18}$")] = None,
) -> GalleryPage:
    """The gallery: the calling token's requests as GET /v1/requests lists them, each with
    the start of its prompt (the result body has no input)."""
    requests = owned_requests(request)
    page = requests.list_requests(caller.token_id, limit, cursor, base_url(request))
    rows = []
    for row in page.requests:
        job = requests.store.get(row.request_id)
        prompt = job.input.get("prompt") if job is not None else None
        start = prompt[:PROMPT_START] if isinstance(prompt, str) else None
        rows.append(GalleryRequest(**row.model_dump(), prompt_start=start))
    return GalleryPage(requests=rows, next_cursor=page.next_cursor)


class _Thumbnails:
    """Shrunk JPEGs of output files, the most recent few kept in memory (keys name files
    that never change: a request's files are written once)."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._lock = threading.Lock()
        self._kept: OrderedDict[str, bytes] = OrderedDict()

    def get(self, key: str, path: Path) -> bytes:
        with self._lock:
            if key in self._kept:
                self._kept.move_to_end(key)
                return self._kept[key]
        data = shrink(path)
        with self._lock:
            self._kept[key] = data
            while len(self._kept) > self._capacity:
                self._kept.popitem(last=False)
        return data


def shrink(path: Path, side: int = THUMBNAIL_SIDE) -> bytes:
    """The image at ``path`` as a JPEG no larger than ``side`` on either side."""
    with Image.open(path) as image:
        image.draft("RGB", (side, side))  # JPEG sources decode at a reduced size
        small = image.convert("RGB")
    small.thumbnail((side, side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    small.save(out, "JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
    return out.getvalue()


_thumbnails = _Thumbnails(_CACHED_THUMBNAILS)


@router.api_route(THUMBNAIL_ROUTE + "/{request_id}/{name}", methods=["GET", "HEAD"])
def playground_thumbnail(
    request_id: str,
    name: str,
    request: Request,
    expires: str | None = None,
    signature: str | None = None,
) -> Response:
    """A small JPEG of the output file that ``/files/{request_id}/{name}`` with the same
    ``expires`` and ``signature`` serves: the same link, checked the same way."""
    path = signed_file(request, request_id, name, expires, signature)
    data = _thumbnails.get(f"{request_id}/{name}", path)
    return Response(
        data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"}
    )
