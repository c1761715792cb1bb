"""Settings shared by the commands: where data lives and how the server is reached."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

ENV_PREFIX = "OVIS_SERVER_"
DAY = 24 * 3600


def compile_choice(mode: str) -> bool | None:
    """``--compile auto|on|off``: None lets the engine decide (compile on CUDA)."""
    return None if mode == "auto" else mode == "on"


# Standard Webhooks' suggestion: at once, then 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.
DEFAULT_WEBHOOK_SCHEDULE = "0,5s,5m,30m,2h,5h,10h,10h"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": DAY}


def parse_duration(text: str) -> float:
    """Seconds, or a number with a unit: ``90s``, ``30m``, ``12h``, ``7d``."""
    text = text.strip().lower()
    factor = _UNITS.get(text[-1:])
    try:
        seconds = float(text[:-1] if factor else text) * (factor or 1)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration such as 3600, 90s, 30m, 12h or 7d") from None
    if not seconds >= 0:
        raise ValueError(f"{text!r}: a duration cannot be negative")
    return seconds


def parse_schedule(text: str) -> tuple[float, ...]:
    """``--webhook-retry-schedule``: each attempt's delay after the one before, as
    durations (``0,5s,5m,2h``); the first attempt is sent at once, so the first is 0."""
    delays = tuple(parse_duration(item) for item in text.split(","))
    if delays[0] != 0:
        raise ValueError("the first attempt is sent at once: start the schedule with 0")
    return delays


_SIZE_UNITS = {"": 1 << 30, "g": 1 << 30, "gib": 1 << 30, "gb": 10**9, "m": 1 << 20, "mib": 1 << 20,
               "mb": 10**6}  # fmt: skip


def parse_memory_size(text: str) -> float:
    """``--gpu-memory``: a size (``24GiB``, ``24G`` or ``24`` are GiB; ``24GB`` is 10^9
    bytes; ``MiB``, ``MB``) in bytes, or a fraction of the GPU's memory (``0.5``)."""
    cleaned = text.strip().lower().replace(" ", "")
    number = cleaned.rstrip("gimb")
    unit = cleaned[len(number) :]
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    if unit not in _SIZE_UNITS or not value > 0:
        raise ValueError(
            f"{text!r} is not a memory size such as 24GiB, 16GB, 12000MiB or a fraction "
            "of the GPU's memory such as 0.5"
        )
    if not unit and value <= 1:
        return value
    return value * _SIZE_UNITS[unit]


# ``--memory``: auto, or a profile of ovis_server.engine.memory (kept here free of torch).
MEMORY_CHOICES = (
    "auto",
    "full",
    "text-encoder-offload",
    "8bit",
    "group-offload-block",
    "group-offload-leaf",
)


_BYTE_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
}  # fmt: skip
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)")


def parse_size(text: str) -> int:
    """Bytes, or a number with a unit: ``1MiB``, ``512KiB``, ``2MB``, ``1048576``."""
    match = _SIZE.fullmatch(text.strip().lower())
    if match is None or match.group(2) not in _BYTE_UNITS:
        raise ValueError(f"{text!r} is not a size such as 1048576, 512KiB or 1MiB")
    return int(float(match.group(1)) * _BYTE_UNITS[match.group(2)])


def default_data_dir() -> Path:
    """ovis-server's folder under the user's data home (``~/.local/share/ovis-server``)."""
    return Path(platformdirs.user_data_dir("ovis-server", appauthor=False))


@dataclass(frozen=True)
class Settings:
    """Everything ``serve`` and ``worker`` are configured with (CLI flags or env)."""

    data_dir: Path
    database_url: str | None = None
    storage: str | None = None
    s3_endpoint_url: str | None = None
    public_url: str | None = None
    auth: bool = True
    url_ttl_seconds: int = 7 * DAY
    base_price_usd: float = 0.0
    model: str = "AIDC-AI/Ovis-Image-7B"
    device: str = "auto"
    dtype: str = "auto"
    lease_seconds: float = 30.0
    max_attempts: int = 3
    max_queued: int = 10_000
    max_queued_per_token: int = 1_000
    rate_limit_per_minute: int = 600
    retention_seconds: int = 7 * DAY
    cleanup_interval_seconds: float = 600.0
    heartbeat_seconds: float = 5.0
    stall_timeout_seconds: float = 600.0
    max_batch: str = "auto"
    compile: str = "auto"
    fp8: bool = False
    memory: str = "auto"
    gpu_memory: str | None = None
    webhook_retry_schedule: str = DEFAULT_WEBHOOK_SCHEDULE
    allow_private_webhooks: bool = False
    # /metrics: scrapers send this as a bearer token; without one, /metrics answers 401
    # unless metrics_public opts out of the check.
    metrics_token: str | None = field(default=None, repr=False)
    metrics_public: bool = False
    # The HTTP edge (see api/limits.py); 0 turns a cap off, no allowed_hosts allows any.
    max_body_size: int = 1024 * 1024
    max_streams_per_token: int = 20
    max_connections: int = 1000
    allowed_hosts: tuple[str, ...] = ()

    def batch_limit(self, device_type: str, planned: int | None = None) -> int:
        """``--max-batch``: auto batches up to 4 on CUDA, where it pays, and 1 elsewhere,
        where a batch of 1 keeps the same seed giving bit-identical pixels; on CUDA no
        more than the memory plan found room for (``planned``)."""
        if self.max_batch == "auto":
            default = 4 if device_type == "cuda" else 1
            return default if planned is None else max(1, min(default, planned))
        return int(self.max_batch)

    @property
    def gpu_memory_bytes(self) -> float | None:
        """``--gpu-memory`` as bytes, or as a fraction of the GPU's memory when at most 1."""
        return None if self.gpu_memory is None else parse_memory_size(self.gpu_memory)

    @property
    def webhook_schedule(self) -> tuple[float, ...]:
        return parse_schedule(self.webhook_retry_schedule)

    @property
    def compile_flag(self) -> bool | None:
        return compile_choice(self.compile)

    @property
    def db_url(self) -> str:
        from ovis_server.db.connect import sqlite_url

        return self.database_url or sqlite_url(self.data_dir)

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"
