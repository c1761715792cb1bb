"""/metrics in Prometheus' text format, computed from the shared database.

Every API replica reads the same rows, so every replica reports the same figures. Counts
and histograms cover the jobs still kept (``--retention``): when the sweep removes old jobs
they drop, which Prometheus reads as a counter reset.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta

from ovis_server.jobs.job import JobStatus
from ovis_server.jobs.store import JobStore
from ovis_server.jobs.workers import WorkerRegistry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
WAIT_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)
RUN_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _histogram(
    name: str, help_text: str, values: Sequence[float], buckets: Iterable[float]
) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    for bound in buckets:
        count = sum(1 for value in values if value <= bound)
        lines.append(f'{name}_bucket{{le="{bound}"}} {count}')
    lines.append(f'{name}_bucket{{le="+Inf"}} {len(values)}')
    lines.append(f"{name}_sum {sum(values)}")
    lines.append(f"{name}_count {len(values)}")
    return lines


def render_metrics(
    store: JobStore,
    workers: WorkerRegistry,
    alive_within: float,
    webhooks: dict[str, int],
    open_streams: int,
) -> str:
    """The metrics; ``webhooks`` counts messages by state, ``open_streams`` is this
    process's own."""
    counts = store.status_counts()
    timings = store.timings()
    now = datetime.now(UTC)
    waits = [
        (started - created).total_seconds() for _, created, started, _, _ in timings if started
    ]
    runs: list[float] = []
    steps: list[float] = []
    recent = 0
    for status, _, started, finished, total in timings:
        if status != JobStatus.SUCCEEDED or started is None or finished is None:
            continue
        seconds = (finished - started).total_seconds()
        runs.append(seconds)
        steps.append(seconds / max(total, 1))
        recent += finished >= now - timedelta(minutes=1)
    alive = workers.alive(alive_within)

    lines = [
        "# HELP ovis_queue_depth Jobs waiting in the queue.",
        "# TYPE ovis_queue_depth gauge",
        f"ovis_queue_depth {counts[JobStatus.QUEUED]}",
        "# HELP ovis_jobs_running Jobs a worker is running now.",
        "# TYPE ovis_jobs_running gauge",
        f"ovis_jobs_running {counts[JobStatus.RUNNING]}",
        "# HELP ovis_jobs_finished_total Jobs that reached a final state, by state.",
        "# TYPE ovis_jobs_finished_total counter",
    ]
    for status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED):
        lines.append(f'ovis_jobs_finished_total{{status="{status.value}"}} {counts[status]}')
    lines += _histogram(
        "ovis_queue_wait_seconds", "Time from submit to a worker starting the job.",
        waits, WAIT_BUCKETS,
    )  # fmt: skip
    lines += _histogram(
        "ovis_run_seconds", "Time a worker took for a job that succeeded.", runs, RUN_BUCKETS
    )
    lines += _histogram(
        "ovis_step_seconds",
        "Run time per denoising step of jobs that succeeded (decode included).",
        steps,
        STEP_BUCKETS,
    )
    lines += [
        "# HELP ovis_images_per_minute Images finished in the last minute.",
        "# TYPE ovis_images_per_minute gauge",
        f"ovis_images_per_minute {recent}",
        "# HELP ovis_workers Workers alive, by state.",
        "# TYPE ovis_workers gauge",
        f'ovis_workers{{state="ready"}} {sum(1 for w in alive if w.ready)}',
        f'ovis_workers{{state="loading"}} {sum(1 for w in alive if not w.ready)}',
        "# HELP ovis_device_memory_bytes Device memory a worker uses (CUDA allocations; "
        "resident memory on a CPU).",
        "# TYPE ovis_device_memory_bytes gauge",
    ]
    for worker in alive:
        if worker.memory_bytes is not None:
            labels = f'worker="{_label(worker.id)}",device="{_label(worker.device)}"'
            lines.append(f"ovis_device_memory_bytes{{{labels}}} {worker.memory_bytes}")
    lines += [
        "# HELP ovis_webhook_messages Webhook messages kept, by state (pending: not yet "
        "taken by the receiver, failed: out of retries).",
        "# TYPE ovis_webhook_messages gauge",
        *(f'ovis_webhook_messages{{state="{state}"}} {n}' for state, n in webhooks.items()),
        "# HELP ovis_status_streams_open Status streams open on this API process.",
        "# TYPE ovis_status_streams_open gauge",
        f"ovis_status_streams_open {open_streams}",
    ]
    return "\n".join(lines) + "\n"
