"""Every setting of ``serve``, ``worker``, ``generate`` and the admin commands, in one place.

Each field of :class:`Settings` is the single source of a setting's type, default, check and
help text; its :class:`Cli` metadata names the option (``--url-ttl``), and with it the
environment variable (``OVIS_SERVER_URL_TTL``) and the config file key (``url_ttl``), and
says which commands take it. ``ovis_server.cli.options`` builds the click options from
these fields. Precedence: command line > environment > config file (``--config``) > defaults.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import platformdirs
from pydantic import Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from ovis_server.catalogue import OVIS_IMAGE

ENV_PREFIX = "OVIS_SERVER_"
# How ``serve`` hands the worker it starts its whole Settings, as JSON (not argv: the
# database URL's password must not show in ``ps``).
SETTINGS_JSON_ENV = ENV_PREFIX + "SETTINGS_JSON"
DAY = 24 * 3600

# Which commands take a setting: "admin" is the token and db commands.
SERVE = frozenset({"serve"})
WORKER = frozenset({"serve", "worker"})
MODEL = frozenset({"serve", "worker", "generate"})
STORE = frozenset({"serve", "worker", "admin"})
DATA = frozenset({"serve", "worker", "generate", "admin"})


@dataclass(frozen=True)
class Cli:
    """How a Settings field shows on the command line."""

    commands: frozenset[str]
    name: str | None = None  # the option without its dashes; default: the field's name
    show_default: str | bool | None = None  # None: the default itself, when there is one
    metavar: str | None = None


def cli_of(field: FieldInfo) -> Cli | None:
    return next((item for item in field.metadata if isinstance(item, Cli)), None)


def option_name(field_name: str, cli: Cli) -> str:
    """``url-ttl``: the option without dashes, for ``--url-ttl``."""
    return cli.name or field_name.replace("_", "-")


def env_name(field_name: str, cli: Cli) -> str:
    return ENV_PREFIX + option_name(field_name, cli).upper().replace("-", "_")


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


_BYTE_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
}  # fmt: skip
# ``--gpu-memory`` units: a bare number is GiB (or, at most 1, a fraction of the GPU).
_MEMORY_UNITS = {"": _BYTE_UNITS["gib"]} | {
    unit: _BYTE_UNITS[unit] for unit in ("g", "gib", "gb", "m", "mib", "mb")
}


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
    if unit not in _MEMORY_UNITS or not value > 0:
        raise ValueError(
            f"{text!r} is not a memory size such as 24GiB, 16GB, 12000MiB or a fraction "
            "of the GPU's memory such as 0.5"
        )
    if not unit and value <= 1:
        return value
    return value * _MEMORY_UNITS[unit]


# ``--memory``: auto, or a profile of ovis_server.engine.memory (kept here free of torch).
MemoryChoice = Literal[
    "auto", "full", "text-encoder-offload", "8bit", "group-offload-block", "group-offload-leaf"
]
MEMORY_CHOICES: tuple[str, ...] = get_args(MemoryChoice)
# /metrics tokens are long random strings.
MIN_METRICS_TOKEN = 16


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


class SettingsFileError(ValueError):
    """A config file that cannot be read, or that names a setting there is none of."""


def _option_fields() -> dict[str, str]:
    """Config file key / option name (with underscores) -> field name."""
    names = {}
    for field_name, field in Settings.model_fields.items():
        cli = cli_of(field)
        if cli is not None and field_name != "config_file":
            names[option_name(field_name, cli).replace("-", "_")] = field_name
    return names


class _MappingSource(PydanticBaseSettingsSource):
    """A source whose values are already known, keyed by field name."""

    def __init__(self, settings_cls: type[BaseSettings], values: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self.values = values

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.values)


def environment_values() -> dict[str, Any]:
    """The settings given as ``OVIS_SERVER_*`` variables (empty ones count as unset)."""
    values = {}
    for field_name, field in Settings.model_fields.items():
        cli = cli_of(field)
        if cli is not None and os.environ.get(env_name(field_name, cli)):
            values[field_name] = os.environ[env_name(field_name, cli)]
    return values


def file_values(path: Path | str | None) -> dict[str, Any]:
    """The settings in a TOML config file: keys are the options' names (``url_ttl = 3600``,
    ``no_auth = true``); dashes and underscores both do."""
    if path is None:
        return {}
    try:
        with Path(path).expanduser().open("rb") as file:
            data = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsFileError(f"cannot read config file {path}: {exc}") from None
    fields = _option_fields()
    values = {}
    for key, value in data.items():
        field_name = fields.get(key.replace("-", "_"))
        if field_name is None:
            raise SettingsFileError(f"config file {path}: there is no setting {key!r}")
        values[field_name] = value
    return values


class Settings(BaseSettings):
    """Everything ``serve`` and ``worker`` are configured with (flags, env, config file)."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid")

    config_file: Annotated[Path | None, Cli(DATA, name="config", metavar="PATH")] = Field(
        None,
        description="A TOML file of settings (keys: option names, e.g. url_ttl = 3600); "
        "the command line and the environment override it.",
    )
    host: Annotated[str, Cli(SERVE)] = Field(
        "127.0.0.1", description="Interface to listen on; 0.0.0.0 for every one."
    )
    port: Annotated[int, Cli(SERVE)] = 8000
    public_url: Annotated[str | None, Cli(SERVE)] = Field(
        None,
        description="The URL clients reach this server at (behind a proxy); result, status and "
        "file URLs start with it. Default: the URL each request came in on.",
    )
    no_auth: Annotated[bool, Cli(SERVE)] = Field(
        False, description="Serve /v1 without tokens. Only on a machine nobody else can reach."
    )
    no_worker: Annotated[bool, Cli(SERVE)] = Field(
        False, description="Run the API alone; workers run elsewhere ('ovis-server worker')."
    )
    url_ttl_seconds: Annotated[int, Cli(SERVE, name="url-ttl")] = Field(
        7 * DAY, ge=1, description="Seconds an output file URL stays valid after it is handed out."
    )
    base_price_usd: Annotated[float, Cli(SERVE)] = Field(
        0.0,
        ge=0,
        description="Price per output image shown in the catalogue and as each result's cost.",
    )
    max_queued: Annotated[int, Cli(SERVE)] = Field(
        10_000, ge=0, description="Queued requests in all before submits get 429 (0: no limit)."
    )
    max_queued_per_token: Annotated[int, Cli(SERVE)] = Field(
        1_000,
        ge=0,
        description="Queued requests per token before its submits get 429 (0: no limit).",
    )
    rate_limit_per_minute: Annotated[int, Cli(SERVE, name="rate-limit")] = Field(
        600, ge=0, description="Submits per minute per token before 429 (0: no limit)."
    )
    retention_seconds: Annotated[
        int, Cli(SERVE, name="retention", show_default="7d", metavar="DURATION")
    ] = Field(
        7 * DAY,
        description="How long finished requests and their files are kept (90s, 12h, 7d...).",
    )
    cleanup_interval_seconds: Annotated[
        float, Cli(SERVE, name="cleanup-interval", show_default="10m", metavar="DURATION")
    ] = Field(600.0, description="How often expired requests are looked for.")
    webhook_retry_schedule: Annotated[str, Cli(SERVE)] = Field(
        DEFAULT_WEBHOOK_SCHEDULE,
        description="Delays of a webhook's attempts, each after the one before (0 first: at "
        "once); a message the receiver does not take (2xx within 10 s) by the last is given up.",
    )
    allow_private_webhooks: Annotated[bool, Cli(SERVE)] = Field(
        False,
        description="Send webhooks to loopback, private and link-local addresses too (receivers "
        "on your internal network); by default only public addresses are reached.",
    )
    metrics_token: Annotated[str | None, Cli(SERVE)] = Field(
        None,
        repr=False,
        description="Bearer token Prometheus sends to read /metrics (at least 16 characters). "
        "Without it /metrics answers 401, unless --metrics-public.",
    )
    metrics_public: Annotated[bool, Cli(SERVE)] = Field(
        False,
        description="Serve /metrics to anyone, without a token. Only where nobody else can "
        "connect.",
    )
    log_level: Annotated[Literal["debug", "info", "warning", "error"], Cli(WORKER)] = "info"
    # The HTTP edge (see api/limits.py); 0 turns a cap off, no allowed_hosts allows any.
    max_body_size: Annotated[int, Cli(SERVE, show_default="1MiB", metavar="SIZE")] = Field(
        1024 * 1024,
        description="Largest request body taken (1048576, 512KiB, 1MiB); larger ones get 413 "
        "unread (0: no limit).",
    )
    max_streams_per_token: Annotated[int, Cli(SERVE)] = Field(
        20,
        ge=0,
        description="Status streams and 'Prefer: wait' submits one token holds open at once "
        "before 429 (0: no limit).",
    )
    max_connections: Annotated[int, Cli(SERVE)] = Field(
        1000,
        ge=0,
        description="Requests in progress at once, server-wide, before 503 with Retry-After "
        "(probes and /metrics excepted; 0: no limit).",
    )
    allowed_hosts: Annotated[tuple[str, ...], Cli(SERVE, show_default=False, metavar="TEXT")] = (
        Field(
            (),
            description="Comma-separated Host names this server answers to (*.example.com "
            "allowed); others get 400. Default: any, and absolute URLs follow the client's Host "
            "unless --public-url.",
        )
    )
    model: Annotated[str, Cli(MODEL)] = Field(
        OVIS_IMAGE.default_weights,
        description="A hub id, a local diffusers directory, 'tiny' (a tiny random model, for "
        "trying it anywhere) or 'random-full' (the real 7B architecture with random weights, "
        "built on the GPU without a download, for load tests). Random models' images are noise.",
    )
    device: Annotated[str, Cli(MODEL)] = Field(
        "auto", description="cpu, cuda, cuda:N or mps; auto picks CUDA when present."
    )
    dtype: Annotated[Literal["auto", "bfloat16", "float16", "float32"], Cli(MODEL)] = Field(
        "auto", description="Weights dtype: auto is bfloat16 on CUDA, float32 elsewhere."
    )
    compile: Annotated[Literal["auto", "on", "off"], Cli(MODEL)] = Field(
        "auto", description="torch.compile the repeated transformer blocks; auto: on CUDA only."
    )
    fp8: Annotated[bool, Cli(MODEL)] = Field(
        False,
        description="FP8 matmuls in the transformer (torchao, Hopper-class GPUs). "
        "Changes numerics.",
    )
    memory: Annotated[MemoryChoice, Cli(MODEL)] = Field(
        "auto",
        description="How much of the model stays on the GPU, from fastest to smallest: full, "
        "text-encoder-offload, 8bit (torchao; changes numerics), group-offload-block, "
        "group-offload-leaf. auto: the fastest that keeps the image and fits.",
    )
    gpu_memory: Annotated[str | None, Cli(MODEL, metavar="SIZE")] = Field(
        None,
        description="GPU memory the worker may plan with and use (24GiB, 16GB, or a fraction "
        "such as 0.5); the allocator is capped to it, so a large GPU can stand in for a small "
        "one. Default: what is free.",
    )
    # Warm-up before ready, and how torch.compile shapes its graphs (engine/warmup.py).
    warmup: Annotated[Literal["auto", "on", "off"], Cli(WORKER)] = Field(
        "auto",
        description="Before reporting ready, run the default image size at every batch size "
        "the worker will form, and each preset size once, so that no request waits for "
        "torch.compile; auto: when compiling.",
    )
    compile_dynamic: Annotated[bool, Cli(MODEL)] = Field(
        False,
        description="Compile with dynamic shapes from the first call (one graph for every batch "
        "and image size: fewer compiles, speed not yet measured); default: torch's automatic "
        "dynamic shapes, static first.",
    )
    lease_seconds: Annotated[float, Cli(WORKER)] = Field(
        30.0,
        ge=0.5,
        description="A running job whose worker is silent this long goes back to the queue.",
    )
    max_attempts: Annotated[int, Cli(WORKER)] = Field(
        3,
        ge=1,
        description="Workers a job may lose (crash, kill) before it fails instead of rerunning.",
    )
    stall_timeout_seconds: Annotated[
        float, Cli(WORKER, name="stall-timeout", show_default="600", metavar="DURATION")
    ] = Field(
        600.0,
        description="A worker whose job makes no step this long is ended and replaced (a hang).",
    )
    max_batch: Annotated[str, Cli(WORKER, metavar="AUTO|N")] = Field(
        "auto",
        description="Queued jobs of one size, steps and guidance that a worker runs in one "
        "call; auto: 4 on CUDA (fewer if the memory plan has no room), 1 elsewhere.",
    )
    storage: Annotated[str | None, Cli(WORKER)] = Field(
        None,
        description="s3://BUCKET/PREFIX to keep outputs in a bucket (presigned URLs); default: "
        "the data directory.",
    )
    s3_endpoint_url: Annotated[str | None, Cli(WORKER)] = Field(
        None,
        description="S3 endpoint for MinIO, Ceph, R2…; default: AWS_ENDPOINT_URL or AWS itself.",
    )
    database_url: Annotated[str | None, Cli(STORE)] = Field(
        None,
        description="postgresql://user:password@host/db for a shared job store; default: SQLite "
        "in the data directory.",
    )
    data_dir: Annotated[Path, Cli(DATA, show_default="~/.local/share/ovis-server")] = Field(
        default_factory=default_data_dir,
        description="Where the job database, output files and built checkpoints live.",
    )
    # Not an option: tuned by tests and benchmarks that build Settings themselves.
    heartbeat_seconds: float = 5.0

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments > ``OVIS_SERVER_*`` > the ``--config`` file > defaults."""
        environment = environment_values()
        given = getattr(init_settings, "init_kwargs", {})
        config = given.get("config_file") or environment.get("config_file")
        return (
            init_settings,
            _MappingSource(settings_cls, environment),
            _MappingSource(settings_cls, file_values(config)),
        )

    @field_validator("retention_seconds", "cleanup_interval_seconds", "stall_timeout_seconds",
                     mode="before")  # fmt: skip
    @classmethod
    def _duration(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = parse_duration(value)
        if isinstance(value, int | float) and not value > 0:
            raise ValueError("a duration must be positive")
        return int(value) if isinstance(value, float) else value

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        parse_schedule(value)
        return value

    @field_validator("max_batch", mode="before")
    @classmethod
    def _batch(cls, value: Any) -> str:
        text = str(value).strip().lower()
        if text != "auto" and not (text.isdigit() and int(text) >= 1):
            raise ValueError(f"{value!r} is neither 'auto' nor a whole number from 1")
        return text

    @field_validator("max_body_size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return parse_size(value) if isinstance(value, str) else value

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(",")
        if not isinstance(value, list | tuple):
            return value
        names = tuple(str(name).strip() for name in value if str(name).strip())
        for pattern in names:
            if "*" in pattern[1:] or (pattern.startswith("*") and not pattern.startswith("*.")):
                raise ValueError(
                    f"{pattern!r}: a wildcard stands alone or starts a name, as in *.example.com"
                )
        return names

    @field_validator("gpu_memory")
    @classmethod
    def _memory_size(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parse_memory_size(value)
        return value.strip()

    @field_validator("metrics_token")
    @classmethod
    def _long_token(cls, value: str | None) -> str | None:
        if value is not None and len(value.strip()) < MIN_METRICS_TOKEN:
            raise ValueError(
                f"use a long random string (at least {MIN_METRICS_TOKEN} characters), "
                "e.g. from 'openssl rand -hex 32'"
            )
        return None if value is None else value.strip()

    @model_validator(mode="after")
    def _one_way_to_metrics(self) -> Settings:
        if self.metrics_token and self.metrics_public:
            raise ValueError("give --metrics-token or --metrics-public, not both")
        return self

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("public_url")
    @classmethod
    def _no_trailing_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else None

    def batch_limit(self, device_type: str, planned: int | None = None) -> int:
        """``--max-batch``: auto batches up to 4 on CUDA, where it pays, and 1 elsewhere,
        where a batch of 1 keeps the same seed giving bit-identical pixels; on CUDA no
        more than the memory plan found room for (``planned``)."""
        if self.max_batch == "auto":
            default = 4 if device_type == "cuda" else 1
            return default if planned is None else max(1, min(default, planned))
        return int(self.max_batch)

    @property
    def auth(self) -> bool:
        return not self.no_auth

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

    def warms_up(self, compiling: bool) -> bool:
        """``--warmup``: auto warms up when the engine compiles."""
        return self.warmup == "on" or (self.warmup == "auto" and compiling)

    @property
    def compile_cache_dir(self) -> Path:
        """Where torch.compile keeps what it compiled, across restarts."""
        return self.data_dir / "compile-cache"

    @property
    def db_url(self) -> str:
        from ovis_server.db.connect import sqlite_url

        return self.database_url or sqlite_url(self.data_dir)

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"
