"""Every setting of ``serve``, ``worker``, ``generate`` and the admin commands, in one place.

Each field of :class:`Settings` is the single source of a setting's type, default, check and
help text; its :class:`~ovis_server.settings_sources.Cli` metadata names the option
(``--url-ttl``), and with it the environment variable (``OVIS_SERVER_URL_TTL``) and the config
file key (``url_ttl``), and says which commands take it. ``ovis_server.cli.options`` builds
the click options from these fields. Precedence: command line > environment > config file
(``--config``) > defaults.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

import platformdirs
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from ovis_server import units
from ovis_server.memory_profiles import MEMORY_CHOICES as MEMORY_CHOICES
from ovis_server.memory_profiles import MemoryChoice
from ovis_server.model_names import (
    DEFAULT_MODEL_ID,
    check_model_weights,
    parse_model_weights,
)
from ovis_server.setting_checks import (
    ABSOLUTE,
    BATCH_SIZE,
    COMMA_LIST,
    DEVICES,
    DURATION,
    EXTRA_MODELS,
    HOST_PATTERNS,
    LONG_TOKEN,
    MEMORY_SIZE,
    MODEL_IDS,
    NO_TRAILING_SLASH,
    SCHEDULE,
    SIZE,
)
from ovis_server.settings_sources import (
    DATA,
    DOWNLOAD,
    ENV_PREFIX,
    INPUT_IMAGES,
    MODEL,
    SERVE,
    STORE,
    WORKER,
    Cli,
    ranked_sources,
)

# How ``serve`` hands the worker it starts its whole Settings, as JSON (not argv: the
# database URL's password must not show in ``ps``).
SETTINGS_JSON_ENV = ENV_PREFIX + "SETTINGS_JSON"


# /metrics tokens are long random strings.


def default_data_dir() -> Path:
    """ovis-server's folder under the user's data home (``~/.local/share/ovis-server``)."""
    return Path(platformdirs.user_data_dir("ovis-server", appauthor=False))


class Settings(BaseSettings):
    """Everything ``serve`` and ``worker`` are configured with (flags, env, config file)."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    config_file: Annotated[Path | None, Cli(DATA, name="config", metavar="PATH")] = None
    """A TOML file of settings (keys: option names, e.g. url_ttl = 3600); the command line and the
    environment override it."""
    host: Annotated[str, Cli(SERVE)] = "127.0.0.1"
    """Interface to listen on; 0.0.0.0 for every one."""
    port: Annotated[int, Cli(SERVE)] = 8000
    public_url: Annotated[str | None, Cli(SERVE), NO_TRAILING_SLASH] = None
    """The URL clients reach this server at (behind a proxy); result, status and file URLs start
    with it. Default: the URL each request came in on."""
    no_auth: Annotated[bool, Cli(SERVE)] = False
    """Serve /v1 without tokens. Only on a machine nobody else can reach."""
    no_worker: Annotated[bool, Cli(SERVE)] = False
    """Run the API alone; workers run elsewhere ('ovis-server worker')."""
    url_ttl_seconds: Annotated[int, Cli(SERVE, name="url-ttl")] = Field(7 * units.DAY, ge=1)
    """Seconds an output file URL stays valid after it is handed out."""
    base_price_usd: Annotated[float, Cli(SERVE)] = Field(0.0, ge=0)
    """Price per output image shown in the catalogue and as each result's cost."""
    max_queued: Annotated[int, Cli(SERVE)] = Field(10_000, ge=0)
    """Queued requests in all before submits get 429 (0: no limit)."""
    max_queued_per_token: Annotated[int, Cli(SERVE)] = Field(1_000, ge=0)
    """Queued requests per token before its submits get 429 (0: no limit)."""
    rate_limit_per_minute: Annotated[int, Cli(SERVE, name="rate-limit")] = Field(600, ge=0)
    """Submits per minute per token before 429 (0: no limit)."""
    retention_seconds: Annotated[
        int, Cli(SERVE, name="retention", show_default="7d", metavar="DURATION"), DURATION
    ] = 7 * units.DAY
    """How long finished requests and their files are kept (90s, 12h, 7d...)."""
    cleanup_interval_seconds: Annotated[
        float, Cli(SERVE, name="cleanup-interval", show_default="10m", metavar="DURATION"), DURATION
    ] = 600.0
    """How often expired requests are looked for."""
    webhook_retry_schedule: Annotated[str, Cli(SERVE), SCHEDULE] = units.DEFAULT_WEBHOOK_SCHEDULE
    """Delays of a webhook's attempts, each after the one before (0 first: at once); a message the
    receiver does not take (2xx within 10 s) by the last is given up."""
    allow_private_webhooks: Annotated[bool, Cli(SERVE)] = False
    """Send webhooks to loopback, private and link-local addresses too (receivers on your internal
    network); by default only public addresses are reached."""
    metrics_token: Annotated[str | None, Cli(SERVE), LONG_TOKEN] = Field(None, repr=False)
    """Bearer token Prometheus sends to read /metrics (at least 16 characters). Without it
    /metrics answers 401, unless --metrics-public."""
    metrics_public: Annotated[bool, Cli(SERVE)] = False
    """Serve /metrics to anyone, without a token. Only where nobody else can connect."""
    log_level: Annotated[Literal["debug", "info", "warning", "error"], Cli(WORKER)] = "info"
    # The HTTP edge (see api/middleware/); 0 turns a cap off, no allowed_hosts allows any.
    max_body_size: Annotated[int, Cli(SERVE, show_default="1MiB", metavar="SIZE"), SIZE] = (
        1024 * 1024
    )
    """Largest request body taken (1048576, 512KiB, 1MiB); larger ones get 413 unread (0: no
    limit)."""
    # Input images (image_url): fetched or decoded once, by the API, at submit (inputs/).
    allow_private_image_urls: Annotated[bool, Cli(INPUT_IMAGES)] = False
    """Fetch image_url from loopback, private and link-local addresses too, and over plain http;
    by default only https URLs of public addresses are fetched."""
    max_input_image_size: Annotated[
        int, Cli(INPUT_IMAGES, show_default="50MB", metavar="SIZE"), SIZE
    ] = 50 * 1000 * 1000
    """Largest input image taken (fetched, or decoded from a data URI); larger ones are a 422."""
    max_input_image_pixels: Annotated[int, Cli(INPUT_IMAGES)] = Field(40_000_000, ge=1)
    """Most pixels an input image may have (width x height, read before decoding it)."""
    max_image_body_size: Annotated[int, Cli(SERVE, show_default="16MiB", metavar="SIZE"), SIZE] = (
        16 * 1024 * 1024
    )
    """Largest request body of a submit to a model with an image input (data URIs are large);
    other bodies keep --max-body-size."""
    # LoRAs (loras[].path): the operator's in <data-dir>/loras/, downloads only if allowed.
    lora_downloads: Annotated[
        tuple[Literal["hub", "url"], ...],
        Cli(MODEL, show_default=False, metavar="TEXT"),
        COMMA_LIST,
    ] = ()
    """Where else a request's LoRA may come from: hub (a Hugging Face repo id), url (an https URL
    of a .safetensors file), or hub,url; workers download them. Default: only the operator's
    LoRAs in <data-dir>/loras/."""
    max_lora_size: Annotated[int, Cli(MODEL, show_default="2GB", metavar="SIZE"), SIZE] = (
        2 * 1000 * 1000 * 1000
    )
    """Largest LoRA file a worker downloads or loads."""
    max_loaded_loras: Annotated[int, Cli(WORKER)] = Field(8, ge=1)
    """LoRAs a worker keeps loaded into its model at once (the least recently used go first)."""
    lora_hotswap_rank: Annotated[int, Cli(MODEL)] = Field(32, ge=0, le=1024)
    """A compiled worker's LoRA slot, per LoRA: a job's LoRAs may have 3x this rank together
    (more fails the job). Switching LoRAs then never recompiles; the slot costs memory and
    compute on every job of a model that takes LoRAs. 0: no slot (switching recompiles)."""
    lora_cache_size: Annotated[int, Cli(MODEL, show_default="20GB", metavar="SIZE"), SIZE] = (
        20 * 1000 * 1000 * 1000
    )
    """Disk space for downloaded LoRAs (<data-dir>/lora-cache/; the least recently used go
    first)."""
    max_streams_per_token: Annotated[int, Cli(SERVE)] = Field(20, ge=0)
    """Status streams and 'Prefer: wait' submits one token holds open at once before 429 (0: no
    limit)."""
    max_connections: Annotated[int, Cli(SERVE)] = Field(1000, ge=0)
    """Requests in progress at once, server-wide, before 503 with Retry-After (probes and /metrics
    excepted; 0: no limit)."""
    allowed_hosts: Annotated[
        tuple[str, ...], Cli(SERVE, show_default=False, metavar="TEXT"), HOST_PATTERNS
    ] = ()
    """Comma-separated Host names this server answers to (*.example.com allowed); others get 400.
    Default: any, and absolute URLs follow the client's Host unless --public-url."""
    model: Annotated[str | None, Cli(MODEL | DOWNLOAD, show_default=False)] = None
    """The weights to load: a hub id, a local diffusers directory, 'tiny' (a tiny random model,
    for trying it anywhere) or 'random-full' (the real architecture with random weights,
    built on the GPU without a download, for load tests); random models' images are noise.
    With several --model-id, tiny and random-full build each model's own, and other weights
    are given per model, comma-separated ID=WEIGHTS. Default: each model's own
    (AIDC-AI/Ovis-Image-7B for aidc-ai/ovis-image)."""
    # Which catalogue entries a worker runs and the API offers, and the operator's own
    # (catalogue/registry.py).
    model_ids: Annotated[
        tuple[str, ...],
        Cli(
            MODEL | DOWNLOAD,
            name="model-id",
            multiple=True,
            metavar="ID",
            show_default=f"{DEFAULT_MODEL_ID} and every --extra-models id",
        ),
        MODEL_IDS,
    ] = ()
    """A model to serve (a catalogue id or alias); repeat it for several (comma-separated in the
    environment and the config file). A worker loads them all and takes only their jobs; the
    API lists and takes exactly these, so give an API replica every id its workers serve."""
    extra_models: Annotated[
        tuple[str, ...],
        Cli(MODEL | DOWNLOAD, show_default=False, metavar="ID=WEIGHTS,..."),
        EXTRA_MODELS,
    ] = ()
    """More catalogue entries: Ovis-Image checkpoints (fine-tunes) under ids of their own,
    comma-separated ID=WEIGHTS, WEIGHTS as --model takes them. Give the API and its workers the
    same list."""
    swap_after_seconds: Annotated[
        float, Cli(WORKER, name="swap-after", show_default="30s", metavar="DURATION"), DURATION
    ] = 30.0
    """Where a worker's device cannot hold all its models at once: how long another model's
    oldest job may wait before the worker swaps that model in, even while the resident model
    still has jobs (it swaps at once when the resident model has none)."""
    resident_models: Annotated[int, Cli(WORKER, metavar="N", show_default="0: as many as fit")] = (
        Field(0, ge=0)
    )
    """Keep at most this many models on the device at once and swap the others in on demand
    (1 forces swapping, e.g. to try it on a CPU); 0: as many as the memory plan fits."""
    device: Annotated[str, Cli(MODEL)] = "auto"
    """cpu, cuda, cuda:N or mps; auto picks CUDA when present."""
    dtype: Annotated[Literal["auto", "bfloat16", "float16", "float32"], Cli(MODEL)] = "auto"
    """Weights dtype: auto is bfloat16 on CUDA, float32 elsewhere."""
    compile: Annotated[Literal["auto", "on", "off"], Cli(MODEL)] = "auto"
    """torch.compile the repeated transformer blocks; auto: on CUDA only."""
    fp8: Annotated[bool, Cli(MODEL)] = False
    """FP8 matmuls in the transformer (torchao, Hopper-class GPUs). Changes numerics."""
    memory: Annotated[MemoryChoice, Cli(MODEL)] = "auto"
    """How much of the model stays on the GPU, from fastest to smallest: full,
    text-encoder-offload, 8bit (torchao; changes numerics), group-offload-block,
    group-offload-leaf. auto: the fastest that keeps the image and fits."""
    gpu_memory: Annotated[str | None, Cli(MODEL, metavar="SIZE"), MEMORY_SIZE] = None
    """GPU memory the worker may plan with and use (24GiB, 16GB, or a fraction such as 0.5); the
    allocator is capped to it, so a large GPU can stand in for a small one. Default: what is
    free."""
    # Warm-up before ready, and how torch.compile shapes its graphs (engine/warmup.py).
    warmup: Annotated[Literal["auto", "on", "off"], Cli(WORKER)] = "auto"
    """Before reporting ready, run the default image size at every batch size the worker will
    form, and each preset size once, so that no request waits for torch.compile; auto: when
    compiling."""
    compile_dynamic: Annotated[bool, Cli(MODEL)] = False
    """Compile with dynamic shapes from the first call (one graph for every batch and image size:
    fewer compiles, speed not yet measured); default: torch's automatic dynamic shapes, static
    first."""
    lease_seconds: Annotated[float, Cli(WORKER)] = Field(30.0, ge=0.5)
    """A running job whose worker is silent this long goes back to the queue."""
    max_attempts: Annotated[int, Cli(WORKER)] = Field(3, ge=1)
    """Workers a job may lose (crash, kill) before it fails instead of rerunning."""
    stall_timeout_seconds: Annotated[
        float, Cli(WORKER, name="stall-timeout", show_default="600", metavar="DURATION"), DURATION
    ] = 600.0
    """A worker whose job makes no step this long is ended and replaced (a hang)."""
    max_batch: Annotated[str, Cli(WORKER, metavar="AUTO|N"), BATCH_SIZE] = "auto"
    """Queued jobs of one size, steps and guidance that a worker runs in one call; auto: 4 on CUDA
    (fewer if the memory plan has no room), 1 elsewhere."""
    storage: Annotated[str | None, Cli(WORKER)] = None
    """s3://BUCKET/PREFIX to keep outputs in a bucket (presigned URLs); default: the data
    directory."""
    s3_endpoint_url: Annotated[str | None, Cli(WORKER)] = None
    """S3 endpoint for MinIO, Ceph, R2…; default: AWS_ENDPOINT_URL or AWS itself."""
    database_url: Annotated[str | None, Cli(STORE)] = None
    """postgresql://user:password@host/db for a shared job store; default: SQLite in the data
    directory."""
    data_dir: Annotated[Path, Cli(DATA, show_default="~/.local/share/ovis-server"), ABSOLUTE] = (
        Field(default_factory=default_data_dir)
    )
    """Where the job database, output files and built checkpoints live."""
    # serve's workers: one per device (see worker/supervisor.py).
    devices: Annotated[
        str | None, Cli(SERVE, show_default="all", metavar="all|N,N|cpu"), DEVICES
    ] = None
    """The workers serve starts, one per entry: all (one per visible CUDA GPU, or one worker where
    there is none), GPU numbers such as 0,2 (each worker pinned to its GPU), or cpu (cpu,cpu
    starts two). --device instead picks one device for one worker; not both."""
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
        return ranked_sources(settings_cls, init_settings)

    @model_validator(mode="after")
    def _weights_per_model(self) -> Settings:
        check_model_weights(self.model, self.model_ids)
        return self

    @model_validator(mode="after")
    def _one_way_to_metrics(self) -> Settings:
        if self.metrics_token and self.metrics_public:
            raise ValueError("give --metrics-token or --metrics-public, not both")
        return self

    def batch_limit(self, device_type: str, planned: int | None = None) -> int:
        """``--max-batch``: auto batches up to 4 on CUDA, where it pays, and 1 elsewhere,
        where a batch of 1 keeps the same seed giving bit-identical pixels; on CUDA no
        more than the memory plan found room for (``planned``)."""
        if self.max_batch == "auto":
            default = 4 if device_type == "cuda" else 1
            return default if planned is None else max(1, min(default, planned))
        return int(self.max_batch)

    @property
    def model_id(self) -> str:
        """The first model served (by id or alias): the one ``generate`` takes."""
        return self.model_ids[0] if self.model_ids else DEFAULT_MODEL_ID

    def weights_for(self, names: Sequence[str]) -> str | None:
        """``--model`` for the model called ``names`` (its id and aliases): the value itself,
        or its own entry of the per-model form; None: the model's own default weights."""
        if self.model is None or "=" not in self.model:
            return self.model
        given = parse_model_weights(self.model)
        return next((given[name] for name in names if name in given), None)

    def for_model(self, names: Sequence[str]) -> Settings:
        """These settings with ``--model`` as it applies to the model called ``names``."""
        return self.model_copy(update={"model": self.weights_for(names)})

    @property
    def auth(self) -> bool:
        return not self.no_auth

    @property
    def gpu_memory_bytes(self) -> float | None:
        """``--gpu-memory`` as bytes, or as a fraction of the GPU's memory when at most 1."""
        return None if self.gpu_memory is None else units.parse_memory_size(self.gpu_memory)

    @property
    def webhook_schedule(self) -> tuple[float, ...]:
        return units.parse_schedule(self.webhook_retry_schedule)

    @property
    def compile_flag(self) -> bool | None:
        """``--compile auto|on|off``: None lets the engine decide (compile on CUDA)."""
        return None if self.compile == "auto" else self.compile == "on"

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

    @property
    def loras_dir(self) -> Path:
        """The operator's LoRAs: ``<name>.safetensors``."""
        return self.data_dir / "loras"

    @property
    def lora_cache_dir(self) -> Path:
        """Where workers keep downloaded LoRAs."""
        return self.data_dir / "lora-cache"
