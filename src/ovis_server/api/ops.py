"""The operations routes: ``/healthz`` (the process is up), ``/readyz`` (the database
answers and a worker with a loaded model is alive, each alive worker shown without what
/readyz must not show) and ``/metrics`` (Prometheus' text format, behind its token)."""

from __future__ import annotations

import re
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from ovis_server.api.auth import authorize_metrics
from ovis_server.api.capacity import worker_max_pixels
from ovis_server.api.metrics import Metrics
from ovis_server.jobs.worker_detail import PlacementDetail
from ovis_server.jobs.workers import WorkerInfo, WorkerRegistry


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class WorkerProgress(BaseModel):
    """How far a worker is in its phase: ``done`` of ``total`` ``unit``s (bytes of weights
    downloaded, shapes compiled), ``rate`` units a second, ``eta_seconds`` left."""

    done: float
    total: float | None = None
    unit: str = ""
    rate: float | None = None
    eta_seconds: float | None = None
    text: str | None = None


class WorkerModel(BaseModel):
    """One model of a worker that serves several (worker/placement.py)."""

    model_id: str
    resident: bool = Field(description="On the device now: the worker takes its jobs.")
    where: Literal["device", "host", "disk"] = Field(
        description="Where its weights are: on the device, or waiting to be swapped in from "
        "host memory (a copy) or from disk (a load)."
    )
    max_pixels: int | None = Field(
        default=None, description="The largest image its memory plan fits; absent: no limit."
    )


class WorkerReadiness(BaseModel):
    """One alive worker as /readyz shows it (no ids, hosts, pids or weight paths: /readyz
    is public)."""

    model: str = Field(description="The models (catalogue ids, comma-separated) the worker runs.")
    device: str
    phase: Literal["downloading", "loading", "warming", "ready"] = Field(
        description="Downloading weights, loading the model, warming up (compiling), ready."
    )
    progress: WorkerProgress | None = None
    memory_profile: str | None = Field(
        default=None, description="The memory profile the worker runs (see --memory)."
    )
    batch_limit: int | None = Field(
        default=None, description="The most requests the worker runs as one batch."
    )
    max_pixels: int | None = Field(
        default=None,
        description="The largest image (width x height, at a batch of 1) its memory plan "
        "fits; absent where there is no limit (a CPU). Larger submits get 422.",
    )
    problem: str | None = Field(default=None, description="Why it takes no jobs, if it takes none.")
    models: list[WorkerModel] | None = Field(
        default=None, description="Each model it serves, resident or not (once ready)."
    )
    swaps: int | None = Field(
        default=None, description="Times it swapped a model onto the device since it started."
    )
    swap_seconds_total: float | None = Field(default=None, description="Seconds spent swapping.")
    last_swap_seconds: float | None = Field(default=None, description="The last swap's time.")


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    database: Literal["ok", "unreachable"]
    workers_ready: int = Field(description="Workers alive with a loaded model.")
    workers_loading: int = Field(description="Workers alive, still loading the model.")
    reason: str | None = None
    workers: list[WorkerReadiness] = Field(default_factory=list)


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


def ops_router(
    db: Engine, registry: WorkerRegistry, alive_within: float, exposition: Metrics
) -> APIRouter:
    """The operations routes over ``db`` and the workers alive within ``alive_within`` s."""
    router = APIRouter()

    @router.get("/healthz", tags=["Operations"])
    async def healthz() -> Health:
        """The API process is up: answered on the event loop, without the database, so a
        busy thread pool or a locked database does not make it look dead."""
        return Health()

    @router.get(
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

    @router.get(
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

    return router
