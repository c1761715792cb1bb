"""Assembling the FastAPI application from the services (state.py), the HTTP edge
(middleware/), the dialects' routes (runcomfy/, openai/), the operations routes (ops.py)
and the playground."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.staticfiles import StaticFiles

from ovis_server import __version__
from ovis_server.api import files, loras, playground
from ovis_server.api.errors import install_error_handlers
from ovis_server.api.middleware.allowed_hosts import AllowedHosts
from ovis_server.api.middleware.body_size import BodySizeLimit
from ovis_server.api.middleware.connections import ConnectionLimit
from ovis_server.api.middleware.security_headers import SecurityHeadersMiddleware
from ovis_server.api.middleware.token_slots import TokenSlots
from ovis_server.api.openai import routes as openai_routes
from ovis_server.api.ops import ops_router
from ovis_server.api.runcomfy import routes as runcomfy_routes
from ovis_server.api.runcomfy.status_path import StatusShortPath
from ovis_server.api.state import ApiState
from ovis_server.catalogue.registry import ModelRegistry
from ovis_server.config import Settings

STATIC = Path(__file__).parent / "static"


def create_app(settings: Settings, models: ModelRegistry | None = None) -> FastAPI:
    """The API over the database and file store that ``settings`` name (migrated first),
    offering ``models`` (by default the settings' models)."""
    models = models or ModelRegistry.from_settings(settings)
    state = ApiState.build(settings, models)
    app = FastAPI(
        lifespan=state.lifespan,
        title="ovis-server",
        version=__version__,
        summary="RunComfy-compatible Model API for Ovis-Image-7B, self-hosted.",
        docs_url=None,
        redoc_url=None,
        redirect_slashes=False,
    )
    state.install(app)
    install_error_handlers(app)
    app.add_middleware(StatusShortPath)  # innermost: the edge added after it judges it too
    app.add_middleware(SecurityHeadersMiddleware)
    # The last added runs first: the server-wide cap, then the Host, then the body.
    app.add_middleware(TokenSlots, per_token=settings.max_streams_per_token)
    image_bodies = {
        f"/v1/models/{spec.model_id}": settings.max_image_body_size
        for spec in models
        if spec.takes_images
    }
    if image_bodies:
        image_bodies["/v1/images/edits"] = settings.max_image_body_size
    app.add_middleware(BodySizeLimit, limit=settings.max_body_size, wider=image_bodies)
    if settings.allowed_hosts:
        app.add_middleware(AllowedHosts, allowed_hosts=settings.allowed_hosts)
    app.add_middleware(ConnectionLimit, limit=settings.max_connections)
    app.include_router(runcomfy_routes.router)
    app.include_router(openai_routes.router)
    app.include_router(files.router)
    app.include_router(loras.router)
    app.include_router(ops_router(state.db, state.workers, state.alive_within, state.metrics))
    app.include_router(playground.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.openapi = lambda: openapi(app, models)  # type: ignore[method-assign]
    return app


def openapi(app: FastAPI, models: ModelRegistry) -> dict[str, Any]:
    """The app's OpenAPI document, made once: each model's input schema as a component
    of the submit body, and bearer tokens on /v1 and /metrics."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, summary=app.summary, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        inputs = {spec.input_model.__name__: spec.input_model for spec in models}
        for name, model in inputs.items():
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(model_schema.pop("$defs", {}))
            components[name] = model_schema
        runcomfy_routes.document_submit_body(schema, list(inputs))
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, operations in schema["paths"].items():
            if path.startswith("/v1/") or path == "/metrics":
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}]
        app.openapi_schema = schema
    return app.openapi_schema
