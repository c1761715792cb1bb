"""The playground: its page, and the model description it builds its form from.

The description is served without a token, so that the form shows before one is entered
(it holds nothing secret: the same input schema is in /openapi.json).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from ovis_server.api.protocol import ModelDetail
from ovis_server.api.routes import catalogue

STATIC = Path(__file__).parent / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
def playground() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/playground/models/{model_id:path}", response_model_exclude_none=True)
def playground_model(model_id: str, request: Request) -> ModelDetail:
    return catalogue(request).model(model_id)
