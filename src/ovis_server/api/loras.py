"""``GET /v1/loras``: the operator's LoRAs (``<data-dir>/loras/<name>.safetensors``) by the
name a request's ``loras[].path`` gives them; token holders only."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from ovis_server.api.auth import authenticate
from ovis_server.config import Settings
from ovis_server.inputs.loras import local_names

router = APIRouter(prefix="/v1", tags=["Model API"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    # The error body is the API's usual one (api/errors.py).
    401: {"description": "Missing, malformed, unknown or revoked token"},
}


class LoraEntry(BaseModel):
    name: str = Field(description="What a request sends as a LoRA's path.")


class LoraList(BaseModel):
    loras: list[LoraEntry] = Field(description="The operator's LoRAs, sorted by name.")
    downloads: list[str] = Field(
        description="Where else a LoRA may come from on this server: hub, url, or none."
    )


@router.get("/loras", responses=_ERRORS, dependencies=[Depends(authenticate)])
async def list_loras(request: Request) -> LoraList:
    """The operator's LoRAs, by name (``tongyi-mai/z-image/turbo/lora`` takes them as a
    ``loras[].path``), and which downloads the server allows besides."""
    settings: Settings = request.app.state.settings
    names = await run_in_threadpool(local_names, settings.loras_dir)
    return LoraList(
        loras=[LoraEntry(name=name) for name in names],
        downloads=sorted(settings.lora_downloads),
    )
