"""The API's services, built once from the settings: the database, the job store, the
file store, the sweepers and the dispatcher that run beside the server, and the services
the dialects' routes call (found on ``app.state`` under the names ``install`` gives them)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from sqlalchemy import Engine

from ovis_server.api.capacity import SizeCapacity
from ovis_server.api.metrics import Metrics, OvisCollector
from ovis_server.api.openai.serving import ImagesService
from ovis_server.api.runcomfy.catalogue import CataloguePages
from ovis_server.api.runcomfy.rendering import BodyRenderer
from ovis_server.api.runcomfy.requests import OwnedRequests
from ovis_server.api.runcomfy.submissions import Submissions
from ovis_server.api.stream import StatusHub, wait_final
from ovis_server.catalogue.registry import ModelRegistry
from ovis_server.config import Settings
from ovis_server.db.connect import (
    API_LOCK_TIMEOUT_MS,
    API_STATEMENT_TIMEOUT_MS,
    PG_CONNECT_TIMEOUT_SECONDS,
    connect,
    migrate,
    pg_options,
)
from ovis_server.db.loop_reads import LoopReads
from ovis_server.jobs.deadlines import DeadlineSweeper
from ovis_server.jobs.deletions import DeletionSweeper, FileDeletions
from ovis_server.jobs.job import Job
from ovis_server.jobs.retention import RetentionSweeper
from ovis_server.jobs.stats import StatsReader
from ovis_server.jobs.store import JobStore
from ovis_server.jobs.workers import WorkerRegistry
from ovis_server.storage import FileStore, open_file_store
from ovis_server.tokens import TokenStore
from ovis_server.webhooks.outbox import DeliveryStore
from ovis_server.webhooks.sender import WebhookDispatcher


def base_url(request: Request) -> str:
    """Absolute URLs start here: --public-url behind a proxy, else what the client called."""
    configured: str | None = request.app.state.settings.public_url
    return (configured or str(request.base_url)).rstrip("/")


@dataclass
class QueuedImages:
    """The queue as the OpenAI dialect uses it (``serving.ImageQueue``): submits through
    ``Submissions`` (same tokens, limits and request list as any submit), waits as
    ``Prefer: wait`` does, and reads the images made."""

    submissions: Submissions
    store: JobStore
    hub: StatusHub
    bodies: BodyRenderer

    def submit(self, token_id: str, model_id: str, body: bytes, base_url: str) -> str:
        taken = self.submissions.submit(
            token_id=token_id, model_id=model_id, body=body, base_url=base_url
        )
        return taken.request_id

    def get(self, request_id: str) -> Job | None:
        return self.store.get(request_id)

    def cancel(self, request_id: str) -> None:
        self.store.request_cancel(request_id)

    async def wait_final(self, request_id: str, seconds: float) -> Job | None:
        return await wait_final(self.hub, self.store, request_id, seconds)

    def read_output(self, key: str) -> bytes:
        return self.bodies.files.read(key)

    def output_url(self, key: str, base_url: str) -> str:
        return self.bodies.output_url(key, base_url)


@dataclass
class ApiState:
    """Everything the app serves from, built by ``build``."""

    settings: Settings
    models: ModelRegistry
    db: Engine
    store: JobStore
    files: FileStore
    workers: WorkerRegistry
    tokens: TokenStore
    hub: StatusHub
    catalogue: CataloguePages
    submissions: Submissions
    requests: OwnedRequests
    images: ImagesService
    metrics: Metrics
    # A worker counts as alive while its last heartbeat is this recent.
    alive_within: float
    sweeper: RetentionSweeper
    deadlines: DeadlineSweeper
    file_deletions: DeletionSweeper
    dispatcher: WebhookDispatcher

    @classmethod
    def build(cls, settings: Settings, models: ModelRegistry) -> ApiState:
        """The services over the database and file store that ``settings`` name (the
        database migrated first), offering ``models``."""
        db = connect(
            settings.db_url,
            lock_timeout_ms=API_LOCK_TIMEOUT_MS,
            statement_timeout_ms=API_STATEMENT_TIMEOUT_MS,
        )
        migrate(db)
        loop_reads = None
        if db.dialect.name == "postgresql":
            options = pg_options(API_LOCK_TIMEOUT_MS, API_STATEMENT_TIMEOUT_MS)
            loop_reads = LoopReads.for_engine(db, options, PG_CONNECT_TIMEOUT_SECONDS)
        store = JobStore(db)
        file_store = open_file_store(settings, db)
        registry = WorkerRegistry(db)
        deletions = FileDeletions(db)
        sweeper = RetentionSweeper(
            store,
            deletions,
            file_store,
            registry,
            retention_seconds=settings.retention_seconds,
            interval_seconds=settings.cleanup_interval_seconds,
        )
        tokens = TokenStore(db)
        hub = StatusHub(store, tokens)
        catalogue = CataloguePages(models)
        bodies = BodyRenderer(file_store, models, settings)
        dispatcher = WebhookDispatcher(
            DeliveryStore(db),
            store,
            bodies,
            tokens,
            settings.webhook_schedule,
            allow_private=settings.allow_private_webhooks,
        )
        alive_within = 3 * settings.heartbeat_seconds + 5
        capacity = SizeCapacity(registry, alive_within)
        submissions = Submissions(store, catalogue, settings, capacity, file_store)
        collector = OvisCollector(
            StatsReader(db), registry, alive_within, lambda: hub.open_streams, models=models.ids()
        )
        return cls(
            settings=settings,
            models=models,
            db=db,
            store=store,
            files=file_store,
            workers=registry,
            tokens=tokens,
            hub=hub,
            catalogue=catalogue,
            submissions=submissions,
            requests=OwnedRequests(store, bodies, deletions, loop_reads),
            images=ImagesService(models, QueuedImages(submissions, store, hub, bodies)),
            metrics=Metrics(collector),
            alive_within=alive_within,
            sweeper=sweeper,
            deadlines=DeadlineSweeper(store),
            file_deletions=DeletionSweeper(deletions, file_store),
            dispatcher=dispatcher,
        )

    @asynccontextmanager
    async def lifespan(self, _app: FastAPI) -> AsyncIterator[None]:
        """The sweepers, the status hub and the webhook dispatcher run while the app does."""
        self.sweeper.start()
        self.deadlines.start()
        self.file_deletions.start()
        await self.hub.start()
        await self.dispatcher.start()
        try:
            yield
        finally:
            await self.dispatcher.stop()
            await self.hub.stop()
            if self.requests.loop_reads is not None:
                await self.requests.loop_reads.close()
            self.file_deletions.stop()
            self.deadlines.stop()
            self.sweeper.stop()

    def install(self, app: FastAPI) -> None:
        """Put the services where the routes find them (``request.app.state``)."""
        for name in (
            "settings", "db", "store", "tokens", "workers", "files", "models", "catalogue",
            "submissions", "requests", "hub", "images",
        ):  # fmt: skip
            setattr(app.state, name, getattr(self, name))
