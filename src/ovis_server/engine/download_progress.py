"""A download's progress: measured from the bytes snapshot_download's bars count, shown in
the log, on a terminal and in the worker's /readyz report, and shared through a file with the
processes that wait for another's download."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ovis_server.engine.weights import PhaseReport, Progress

if TYPE_CHECKING:
    from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

# How often progress is measured and written (the worker's report throttles itself to 1 s),
# and how often a progress line goes to the log.
PROGRESS_SECONDS = 1.0
LOG_SECONDS = 10.0
# The rate is taken over this much of the recent past.
RATE_WINDOW_SECONDS = 10.0
# Another process's progress file older than this is not shown as current.
STALE_PROGRESS_SECONDS = 30.0


@dataclass(frozen=True)
class DownloadProgress:
    repo_id: str
    done: int  # bytes of the weights' files in the cache, or written so far
    total: int  # bytes of the weights' files
    files: int
    rate: float | None  # bytes per second, lately
    elsewhere: bool = False  # another process downloads: these are its figures

    @property
    def eta_seconds(self) -> float | None:
        return max(self.total - self.done, 0) / self.rate if self.rate else None

    def line(self) -> str:
        """``downloading A/B: 3.21 GB of 20.35 GB (15.8%), 85.3 MB/s, 3m21s left``."""
        share = 100 * self.done / self.total if self.total else 100.0
        parts = [f"{size_text(self.done)} of {size_text(self.total)} ({share:.1f}%)"]
        if self.rate:
            parts.append(f"{size_text(self.rate)}/s")
        if self.eta_seconds is not None:
            parts.append(f"{duration_text(self.eta_seconds)} left")
        who = " (by another process)" if self.elsewhere else ""
        return f"downloading {self.repo_id}{who}: " + ", ".join(parts)


def size_text(size: float) -> str:
    """Bytes in decimal units, as the hub shows sizes: ``20.35 GB``, ``85.3 MB``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}" if unit == "GB" else f"{size / scale:.1f} {unit}"
    return f"{size:.0f} B"


def duration_text(seconds: float) -> str:
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Discard:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


class ByteBars:
    """A ``tqdm_class`` for ``snapshot_download`` that draws nothing and counts the bytes
    its bars see: the largest byte bar's count is the bytes written so far."""

    def __init__(self) -> None:
        self.bars: list[tqdm[Any]] = []

    def tqdm_class(self) -> type[tqdm[Any]]:
        from tqdm.auto import tqdm

        bars = self.bars

        class Counting(tqdm):  # type: ignore[type-arg]
            monitor_interval = 0  # no tqdm monitor thread

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs.pop("name", None)
                kwargs.update(file=Discard(), disable=False, mininterval=3600.0)
                super().__init__(*args, **kwargs)
                if self.unit == "B":
                    bars.append(self)

        return Counting

    def done(self) -> int:
        return max((int(bar.n) for bar in list(self.bars)), default=0)


class Rate:
    def __init__(self) -> None:
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, done: int) -> float | None:
        now = time.monotonic()
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= RATE_WINDOW_SECONDS:
            self.samples.popleft()
        then, before = self.samples[0]
        return (done - before) / (now - then) if now - then >= 1.0 else None


@dataclass
class Show:
    """Progress to the log (a line every ``log_every`` seconds) and to /readyz."""

    report: PhaseReport | None
    log: Callable[[str], None]
    log_every: float
    status_line: Callable[[str], None] | None
    logged_at: float = field(default_factory=time.monotonic, init=False)
    started: bool = field(default=False, init=False)

    def __call__(self, progress: DownloadProgress) -> None:
        if self.report is not None:
            if not self.started:
                self.report.phase("downloading")
            text = f"{progress.files} files from the Hugging Face hub"
            if progress.elsewhere:
                text += ", downloaded by another process"
            self.report.progress(
                Progress(progress.done, progress.total, "bytes", rate=progress.rate, text=text)
            )
        self.started = True
        if self.status_line is not None:
            self.status_line(progress.line())
        elif time.monotonic() - self.logged_at >= self.log_every:
            self.logged_at = time.monotonic()
            self.log(progress.line())


def their_progress(repo_id: str, path: Path, total: int, files: int) -> DownloadProgress:
    try:
        data = json.loads(path.read_text())
        if time.time() - float(data["at"]) > STALE_PROGRESS_SECONDS:
            raise ValueError("stale")
        done, rate = int(data["done"]), data.get("rate")
    except (OSError, ValueError, KeyError, TypeError):
        done, rate = 0, None
    return DownloadProgress(repo_id, done, total, files, rate, elsewhere=True)


def write_progress(path: Path, progress: DownloadProgress) -> None:
    """For processes waiting on the lock (written whole, then renamed into place)."""
    data = {"done": progress.done, "rate": progress.rate, "at": time.time(), "pid": os.getpid()}
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        partial.write_text(json.dumps(data))
        partial.replace(path)
    except OSError:
        logger.debug("could not write %s", path, exc_info=True)
