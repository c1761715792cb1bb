"""Assembling the FastAPI application."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import PlainTextResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from ovis_server import __version__
from ovis_server.api import files, openai_images, playground, routes
from ovis_server.api.auth import authorize_metrics
from ovis_server.api.bodies import BodyRenderer
from ovis_server.api.capacity import SizeCapacity, worker_max_pixels
from ovis_server.api.catalogue_pages import CataloguePages
from ovis_server.api.errors import install_error_handlers
from ovis_server.api.limits import AllowedHosts, BodySizeLimit, ConnectionLimit, TokenSlots
from ovis_server.api.metrics import Metrics, OvisCollector
from ovis_server.api.owned_requests import OwnedRequests
from ovis_server.api.protocol import (
    Health,
    Readiness,
    WorkerModel,
    WorkerProgress,
    WorkerReadiness,
)
from ovis_server.api.security import SecurityHeadersMiddleware
from ovis_server.api.status_path import StatusShortPath
from ovis_server.api.stream import StatusHub
from ovis_server.api.submissions import Submissions
from ovis_server.catalogue.registry import ModelRegistry
from ovis_server.config import Settings
from ovis_server.db.connect import (
    API_LOCK_TIMEOUT_MS,
    API_STATEMENT_TIMEOUT_MS,
    connect,
    migrate,
)
from ovis_server.jobs.deadlines import DeadlineSweeper
from ovis_server.jobs.deletions import DeletionSweeper, FileDeletions
from ovis_server.jobs.retention import RetentionSweeper
from ovis_server.jobs.stats import StatsReader
from ovis_server.jobs.store import JobStore
from ovis_server.jobs.worker_detail import PlacementDetail
from ovis_server.jobs.workers import WorkerInfo, WorkerRegistry
from ovis_server.storage import open_file_store
from ovis_server.tokens import TokenStore
from ovis_server.webhooks.outbox import DeliveryStore
from ovis_server.webhooks.sender import WebhookDispatcher

STATIC = Path(__file__).parent / "static"
# Connections still busy this long after the server is told to stop are cut.
GRACEFUL_SHUTDOWN_SECONDS = 30


class ApiServer(uvicorn.Server):
    """uvicorn, ending open status streams as soon as it is told to stop: it waits for
    every connection to close before it shuts down, and a stream would not by itself."""

    def __init__(self, config: uvicorn.Config, hub: StatusHub) -> None:
        super().__init__(config)
        self.hub = hub

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self.hub.close_streams_soon()


def server_config(app: FastAPI, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """How ``serve`` runs ``app`` under uvicorn (the tests run it so in their own process,
    with ``overrides``)."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "proxy_headers": True,
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_SECONDS,
        # A backstop under the app's own cap (which answers 503 with the error body):
        # connections, idle ones too, beyond twice it get uvicorn's bare 503.
        "limit_concurrency": 2 * settings.max_connections if settings.max_connections else None,
    }
    return uvicorn.Config(app, **(options | overrides))


# What /readyz may show of a worker's problem: plain words ("the worker cannot write
# outputs: No space left on device"), never a host, URL, path, bucket or quoted name.
_PLAIN_WORDS = re.compile(r"[A-Za-z0-9 ,;()-]{1,200}")


def public_problem(problem: str) -> str:
    """A worker's problem as /readyz shows it: as written if it is plain words, else
    what comes before its first colon (the details are in the worker's log)."""
    head, colon, _ = problem.partition(":")
    if _PLAIN_WORDS.fullmatch(problem.replace(":", "", 1) if colon else problem):
        return problem
    if colon and _PLAIN_WORDS.fullmatch(head):
        return f"{head}: see the worker's log"
    return "the worker reports a problem: see its log"


def worker_readiness(worker: WorkerInfo) -> WorkerReadiness:
    """A worker's row as /readyz shows it; details it cannot read are left out."""
    detail = worker.detail  # jobs/worker_detail.py: what does not read is left out
    phase = worker.phase if worker.phase in ("downloading", "loading", "warming") else None
    progress = None if detail.progress is None else detail.progress.model_dump()
    return WorkerReadiness(
        model=worker.model,
        device=worker.device,
        phase="ready" if worker.ready else (phase or "loading"),
        progress=None if worker.ready or progress is None else WorkerProgress(**progress),
        memory_profile=detail.memory_profile,
        batch_limit=detail.batch_limit,
        max_pixels=worker_max_pixels(worker),
        problem=None if worker.problem is None else public_problem(worker.problem),
        **worker_models_readiness(detail),
    )


def worker_models_readiness(detail: PlacementDetail) -> dict[str, Any]:
    """A worker's models and swaps as /readyz shows them (worker/placement.py's detail)."""
    models = detail.models
    return {
        "models": None if models is None else [WorkerModel(**m.model_dump()) for m in models],
        "swaps": detail.swaps,
        "swap_seconds_total": detail.swap_seconds_total,
        "last_swap_seconds": detail.last_swap_seconds,
    }


def create_app(settings: Settings, models: ModelRegistry | None = None) -> FastAPI:
    """The API over the database and file store that ``settings`` name (migrated first),
    offering ``models`` (by default the settings' models)."""
    models = models or ModelRegistry.from_settings(settings)
    db = connect(
        settings.db_url,
        lock_timeout_ms=API_LOCK_TIMEOUT_MS,
        statement_timeout_ms=API_STATEMENT_TIMEOUT_MS,
    )
    migrate(db)
    store = JobStore(db)
    file_store = open_file_store(settings, db)
    registry = WorkerRegistry(db)
    sweeper = RetentionSweeper(
        store,
        file_store,
        registry,
        retention_seconds=settings.retention_seconds,
        interval_seconds=settings.cleanup_interval_seconds,
    )

    deadlines = DeadlineSweeper(store)
    deletions = FileDeletions(db)
    file_deletions = DeletionSweeper(deletions, file_store)
    tokens = TokenStore(db)
    hub = StatusHub(store, tokens)
    catalogue = CataloguePages(models)
    bodies = BodyRenderer(file_store, models, settings)
    deliveries = DeliveryStore(db)
    dispatcher = WebhookDispatcher(
        deliveries,
        store,
        bodies,
        tokens,
        settings.webhook_schedule,
        allow_private=settings.allow_private_webhooks,
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        sweeper.start()
        deadlines.start()
        file_deletions.start()
        await hub.start()
        await dispatcher.start()
        try:
            yield
        finally:
            await dispatcher.stop()
            await hub.stop()
            file_deletions.stop()
            deadlines.stop()
            sweeper.stop()

    app = FastAPI(
        lifespan=lifespan,
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
    app.state.tokens = tokens
    app.state.workers = registry
    app.state.files = file_store
    app.state.models = models
    app.state.catalogue = catalogue
    # A worker counts as alive while its last heartbeat is this recent.
    alive_within = 3 * settings.heartbeat_seconds + 5
    capacity = SizeCapacity(registry, alive_within)
    app.state.submissions = Submissions(store, catalogue, settings, capacity, file_store)
    app.state.requests = OwnedRequests(store, bodies, deletions)
    app.state.hub = hub
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
    app.include_router(routes.router)
    app.include_router(openai_images.router)
    app.include_router(files.router)

    exposition = Metrics(
        OvisCollector(
            StatsReader(db), registry, alive_within, lambda: hub.open_streams, models=models.ids()
        )
    )

    @app.get("/healthz", tags=["Operations"])
    async def healthz() -> Health:
        """The API process is up: answered on the event loop, without the database, so a
        busy thread pool or a locked database does not make it look dead."""
        return Health()

    @app.get(
        "/readyz",
        tags=["Operations"],
        response_model_exclude_none=True,
        responses={503: {"model": Readiness, "description": "Not ready"}},
    )
    def readyz(response: Response) -> Readiness:
        """Ready when the database answers and a worker with a loaded model is alive."""
        try:
            with db.connect() as conn:
                conn.execute(text("SELECT 1"))
            alive = registry.alive(within_seconds=alive_within)
        except SQLAlchemyError:
            response.status_code = 503
            return Readiness(
                status="not_ready",
                database="unreachable",
                workers_ready=0,
                workers_loading=0,
                reason="the database does not answer",
            )
        ready = sum(1 for worker in alive if worker.ready and worker.problem is None)
        problems = sorted({public_problem(worker.problem) for worker in alive if worker.problem})
        if not ready:
            response.status_code = 503
        reason = None
        if not ready:
            # The worker's own words ("the worker cannot write outputs: …") when it has one.
            reason = "; ".join(problems) or "no worker with a loaded model is alive"
        return Readiness(
            status="ready" if ready else "not_ready",
            database="ok",
            workers_ready=ready,
            workers_loading=sum(1 for worker in alive if not worker.ready),
            reason=reason,
            workers=[worker_readiness(worker) for worker in alive],
        )

    @app.get(
        "/metrics",
        tags=["Operations"],
        response_class=PlainTextResponse,
        dependencies=[Depends(authorize_metrics)],
        responses={
            401: {
                "description": "No metrics token, or not it",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}
                },
            }
        },
    )
    def metrics(request: Request) -> Response:
        """Queue, job, timing and worker metrics in Prometheus' text format (with
        ``Authorization: Bearer <metrics token>``)."""
        body, content_type = exposition.render(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    app.include_router(playground.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def openapi() -> dict[str, Any]:
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
            routes.document_submit_body(schema, list(inputs))
            schema["components"]["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"}
            }
            for path, operations in schema["paths"].items():
                if path.startswith("/v1/") or path == "/metrics":
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
