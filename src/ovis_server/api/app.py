"""Assembling the FastAPI application."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from ovis_server import __version__
from ovis_server.api import files, routes
from ovis_server.api.errors import install_error_handlers
from ovis_server.api.protocol import Health
from ovis_server.api.serving import RequestService
from ovis_server.config import Settings
from ovis_server.db.connect import connect, migrate
from ovis_server.jobs.store import JobStore
from ovis_server.storage.local import LocalFileStore
from ovis_server.storage.signing import signer_for
from ovis_server.tokens import TokenStore


def create_app(settings: Settings) -> FastAPI:
    """The API over the database and file store that ``settings`` name (migrated first)."""
    db = connect(settings.db_url)
    migrate(db)
    store = JobStore(db)
    file_store = LocalFileStore(settings.files_dir, signer_for(db))

    app = FastAPI(
        title="ovis-server",
        version=__version__,
        summary="RunComfy-compatible Model API for Ovis-Image-7B, self-hosted.",
        docs_url=None,
        redoc_url=None,
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.db = db
    app.state.store = store
    app.state.tokens = TokenStore(db)
    app.state.files = file_store
    app.state.service = RequestService(store, file_store, settings)
    install_error_handlers(app)
    app.include_router(routes.router)
    app.include_router(files.router)

    @app.get("/healthz", tags=["Operations"])
    def healthz() -> Health:
        """The API process is up."""
        return Health()

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=app.routes
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, model in routes.INPUT_SCHEMAS.items():
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(model_schema.pop("$defs", {}))
                components[name] = model_schema
            schema["components"]["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"}
            }
            for path, operations in schema["paths"].items():
                if path.startswith("/v1/"):
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
