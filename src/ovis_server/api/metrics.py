"""/metrics: a prometheus-client collector over aggregates, never a scan of the jobs.

Gauges (queue depth, jobs running, pending webhook messages, workers) are read on each
scrape through indexes that touch only those rows. Counters and histograms are kept in
this process: each scrape adds the jobs (and webhook messages) that finished since the
one before, read through the ``finished_at`` index, so a scrape costs the same whether
retention keeps a thousand finished jobs or a million.

They count the finished jobs of the whole deployment (the shared database), from this
process's start: retention deleting old jobs does not lower them, a restart starts them
at zero (Prometheus reads that as a counter reset), and every API replica counts the
same jobs, so aggregate replicas with ``max``, not ``sum``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Generic, Protocol, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy import Connection

from ovis_server.jobs.job import DeliveryState, JobStatus
from ovis_server.jobs.stats import FinishedJob, StatsReader
from ovis_server.jobs.workers import WorkerInfo, WorkerRegistry

WAIT_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)
RUN_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10)
FINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
# Each scrape reads again the rows that finished this long before the previous scrape (and
# skips those it has counted), so that a row whose commit landed late, or whose worker's
# clock runs a little behind, is still counted once. It is also the images-per-minute
# window.
OVERLAP = timedelta(seconds=60)


def utcnow() -> datetime:
    return datetime.now(UTC)


class _Finished(Protocol):
    @property
    def key(self) -> Hashable: ...

    @property
    def finished_at(self) -> datetime: ...


KeyT = TypeVar("KeyT", bound=Hashable)
RowT = TypeVar("RowT", bound=_Finished)


class Watermark(Generic[KeyT, RowT]):
    """Hands out once each row that finished after ``start``, reading few rows a time.

    ``keys(since)`` lists the rows that finished after ``since`` from an index alone;
    ``rows(keys)`` reads those rows. A scrape lists again the rows within ``OVERLAP`` of
    the one before, and reads only those whose key it has not seen.
    """

    def __init__(
        self,
        keys: Callable[[Connection, datetime], Sequence[KeyT]],
        rows: Callable[[Connection, Sequence[KeyT]], Sequence[RowT]],
        start: datetime,
    ) -> None:
        self._keys = keys
        self._rows = rows
        self._floor = start
        self._last: datetime | None = None
        self.recent: dict[Hashable, RowT] = {}

    def new_rows(self, conn: Connection, now: datetime) -> list[RowT]:
        since = self._floor if self._last is None else max(self._floor, self._last - OVERLAP)
        unseen = [key for key in self._keys(conn, since) if key not in self.recent]
        fresh = list(self._rows(conn, unseen)) if unseen else []
        for row in fresh:
            self.recent[row.key] = row
        # The next scrape lists from now - OVERLAP: older rows will not come back.
        cutoff = now - OVERLAP
        self.recent = {k: v for k, v in self.recent.items() if v.finished_at > cutoff}
        self._last = now
        return fresh


@dataclass
class Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(init=False)  # per bucket (+Inf last), not cumulative
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        index = next((i for i, bound in enumerate(self.bounds) if value <= bound), -1)
        self.counts[index] += 1
        self.total += value

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        cumulative, running = [], 0
        bounds = (*map(floatToGoString, self.bounds), "+Inf")
        for bound, count in zip(bounds, self.counts, strict=True):
            running += count
            cumulative.append((bound, running))
        return HistogramMetricFamily(name, documentation, buckets=cumulative, sum_value=self.total)


@dataclass(eq=False)
class OvisCollector(Collector):
    """The server's metrics, from aggregates kept here and index reads."""

    stats: StatsReader
    workers: WorkerRegistry
    alive_within: float
    open_streams: Callable[[], int]
    now: Callable[[], datetime] = utcnow
    # The served models: each has a queue depth (0 included), for autoscaling per model.
    models: Sequence[str] = ()

    def __post_init__(self) -> None:
        stats, started = self.stats, self.now()
        self._jobs = Watermark(stats.jobs_finished_after, stats.finished_jobs, started)
        self._messages = Watermark(stats.messages_finished_after, stats.finished_messages, started)
        self._lock = threading.Lock()
        self.finished = dict.fromkeys(FINAL, 0)
        self.messages = dict.fromkeys((DeliveryState.DELIVERED, DeliveryState.FAILED), 0)
        self.wait = Histogram(WAIT_BUCKETS)
        self.run = Histogram(RUN_BUCKETS)
        self.step = Histogram(STEP_BUCKETS)

    def _add(self, job: FinishedJob) -> None:
        self.finished[job.status] += 1
        if job.started_at is None:
            return
        self.wait.observe((job.started_at - job.created_at).total_seconds())
        if job.status == JobStatus.SUCCEEDED:
            seconds = (job.finished_at - job.started_at).total_seconds()
            self.run.observe(seconds)
            self.step.observe(seconds / max(job.steps, 1))

    def catch_up(self, conn: Connection) -> int:
        """Add what finished since the last scrape; returns images of the last minute."""
        now = self.now()
        for job in self._jobs.new_rows(conn, now):
            self._add(job)
        for message in self._messages.new_rows(conn, now):
            if message.state in self.messages:
                self.messages[message.state] += 1
        minute_ago = now - timedelta(minutes=1)
        return sum(
            1
            for job in self._jobs.recent.values()
            if job.status == JobStatus.SUCCEEDED and job.finished_at >= minute_ago
        )

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            families = list(self._families())
        yield from families

    def _families(self) -> Iterator[Metric]:
        with self.stats.engine.connect() as conn:
            recent = self.catch_up(conn)
            unfinished = self.stats.unfinished_counts(conn)
            by_model = self.stats.queued_by_model(conn)
            pending = self.stats.pending_messages(conn)
        alive = self.workers.alive(self.alive_within)
        yield GaugeMetricFamily(
            "ovis_queue_depth", "Jobs waiting in the queue.", unfinished[JobStatus.QUEUED]
        )
        depth = GaugeMetricFamily(
            "ovis_model_queue_depth",
            "Jobs waiting in the queue, per model (scale each model's workers on its own).",
            labels=["model"],
        )
        for model in dict.fromkeys((*self.models, *sorted(by_model))):
            depth.add_metric([model], by_model.get(model, 0))
        yield depth
        yield GaugeMetricFamily(
            "ovis_jobs_running", "Jobs a worker is running now.", unfinished[JobStatus.RUNNING]
        )
        finished = CounterMetricFamily(
            "ovis_jobs_finished",
            "Jobs that reached a final state since this process started, by state.",
            labels=["status"],
        )
        for status, count in self.finished.items():
            finished.add_metric([status.value], count)
        yield finished
        yield self.wait.family(
            "ovis_queue_wait_seconds", "Time from submit to a worker starting the job."
        )
        yield self.run.family("ovis_run_seconds", "Time a worker took for a job that succeeded.")
        yield self.step.family(
            "ovis_step_seconds",
            "Run time per denoising step of jobs that succeeded (decode included).",
        )
        yield GaugeMetricFamily(
            "ovis_images_per_minute", "Images finished in the last minute.", recent
        )
        workers = GaugeMetricFamily("ovis_workers", "Workers alive, by state.", labels=["state"])
        workers.add_metric(["ready"], sum(1 for w in alive if w.ready))
        workers.add_metric(["loading"], sum(1 for w in alive if not w.ready))
        yield workers
        memory = GaugeMetricFamily(
            "ovis_device_memory_bytes",
            "Device memory a worker uses (CUDA allocations; resident memory on a CPU).",
            labels=["worker", "device"],
        )
        for worker in alive:
            if worker.memory_bytes is not None:
                memory.add_metric([worker.id, worker.device], worker.memory_bytes)
        yield memory
        yield from worker_state_families(alive)

        yield from worker_plan_families(alive)
        yield from worker_model_families(alive)
        yield GaugeMetricFamily(
            "ovis_webhook_messages_pending",
            "Webhook messages not yet taken by their receiver.",
            pending,
        )
        messages = CounterMetricFamily(
            "ovis_webhook_messages_finished",
            "Webhook messages that ended since this process started: delivered, or "
            "failed (out of retries).",
            labels=["state"],
        )
        for state, count in self.messages.items():
            messages.add_metric([state.value], count)
        yield messages
        yield GaugeMetricFamily(
            "ovis_status_streams_open",
            "Status streams open on this API process.",
            self.open_streams(),
        )


WORKER_PHASES = ("downloading", "loading", "warming", "ready")


def worker_state_families(alive: Sequence[WorkerInfo]) -> Iterator[Metric]:
    """Each worker's state, so that an operator sees each one (serve runs one per GPU):
    ready or not, and its phase as a state set (1 for the phase it is in)."""
    ready = GaugeMetricFamily(
        "ovis_worker_ready",
        "1 when the worker has its model loaded and takes jobs, else 0 (getting ready, or "
        "unable to store outputs).",
        labels=["worker", "device"],
    )
    phase = GaugeMetricFamily(
        "ovis_worker_phase",
        "The phase each worker is in: 1 for the current one (downloading, loading, warming, "
        "ready), 0 for the others.",
        labels=["worker", "device", "phase"],
    )
    for worker in alive:
        takes_jobs = worker.ready and worker.problem is None
        ready.add_metric([worker.id, worker.device], 1 if takes_jobs else 0)
        current = "ready" if worker.ready else worker.phase
        current = current if current in WORKER_PHASES else "loading"
        for name in WORKER_PHASES:
            phase.add_metric([worker.id, worker.device, name], 1 if name == current else 0)
    yield ready
    yield phase


def worker_plan_families(alive: Sequence[WorkerInfo]) -> Iterator[Metric]:
    """Each worker's memory plan and start-up, from the details it reports (report.py)."""
    info = GaugeMetricFamily(
        "ovis_worker_info",
        "1 for each alive worker, labelled with its device and memory profile (--memory).",
        labels=["worker", "device", "memory_profile"],
    )
    batch = GaugeMetricFamily(
        "ovis_worker_batch_limit",
        "The most requests a worker runs as one batch.",
        labels=["worker"],
    )
    budget = GaugeMetricFamily(
        "ovis_worker_memory_budget_bytes",
        "GPU memory a worker plans with (--gpu-memory, or what was free at its start).",
        labels=["worker"],
    )
    pixels = GaugeMetricFamily(
        "ovis_worker_max_pixels",
        "The largest image (pixels, batch of 1) a worker's memory plan fits; absent: no limit.",
        labels=["worker"],
    )
    startup = GaugeMetricFamily(
        "ovis_worker_startup_seconds",
        "Seconds from a worker's start to ready (loading and warm-up).",
        labels=["worker"],
    )
    for worker in alive:
        detail = worker.detail  # jobs/worker_detail.py: what does not read is left out
        info.add_metric([worker.id, worker.device, detail.memory_profile or ""], 1)
        for family, value in (
            (batch, detail.batch_limit),
            (budget, detail.memory_budget_bytes),
            (pixels, detail.max_pixels),
            (startup, detail.startup_seconds),
        ):
            if value is not None:
                family.add_metric([worker.id], float(value))
    yield from (info, batch, budget, pixels, startup)


def worker_model_families(alive: Sequence[WorkerInfo]) -> Iterator[Metric]:
    """Each worker's models (resident on its device or not) and its swaps, from the details
    it reports (worker/placement.py)."""
    resident = GaugeMetricFamily(
        "ovis_worker_model_resident",
        "1 for each model a worker serves that is on its device now, 0 for one waiting to be "
        "swapped in (from host memory or disk).",
        labels=["worker", "device", "model", "where"],
    )
    swaps = CounterMetricFamily(
        "ovis_worker_swaps",
        "Times a worker swapped a model onto its device since it started.",
        labels=["worker", "device"],
    )
    seconds = CounterMetricFamily(
        "ovis_worker_swap_seconds",
        "Seconds a worker spent swapping models since it started.",
        labels=["worker", "device"],
    )
    last = GaugeMetricFamily(
        "ovis_worker_last_swap_seconds",
        "How long a worker's last swap took.",
        labels=["worker", "device"],
    )
    for worker in alive:
        detail = worker.detail
        for entry in detail.models or []:
            labels = [worker.id, worker.device, entry.model_id, entry.where]
            resident.add_metric(labels, 1 if entry.resident else 0)
        for family, value in (
            (swaps, detail.swaps),
            (seconds, detail.swap_seconds_total),
            (last, detail.last_swap_seconds),
        ):
            if value is not None:
                family.add_metric([worker.id, worker.device], float(value))
    yield from (resident, swaps, seconds, last)


class Metrics:
    """The registry /metrics renders, with its one collector."""

    def __init__(self, collector: OvisCollector) -> None:
        self.collector = collector
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition in the format ``accept`` asks for, and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
