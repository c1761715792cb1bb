"""The ``ovis-server`` command line."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from ovis_server import __version__
from ovis_server.catalogue import IMAGE_SIZE_PRESETS, OVIS_IMAGE, OvisImageInput, field_problems
from ovis_server.config import (
    DAY,
    DEFAULT_WEBHOOK_SCHEDULE,
    ENV_PREFIX,
    Settings,
    compile_choice,
    default_data_dir,
    parse_duration,
    parse_memory_size,
    parse_schedule,
    parse_size,
)
from ovis_server.engine.images import encode_image


def _env(name: str) -> str:
    return ENV_PREFIX + name


def database_option(func: Any) -> Any:
    return click.option(
        "--database-url",
        default=None,
        envvar=_env("DATABASE_URL"),
        show_envvar=True,
        help="postgresql://user:password@host/db for a shared job store; default: SQLite "
        "in the data directory.",
    )(func)


def storage_options(func: Any) -> Any:
    func = click.option(
        "--s3-endpoint-url",
        default=None,
        envvar=_env("S3_ENDPOINT_URL"),
        show_envvar=True,
        help="S3 endpoint for MinIO, Ceph, R2…; default: AWS_ENDPOINT_URL or AWS itself.",
    )(func)
    return click.option(
        "--storage",
        default=None,
        envvar=_env("STORAGE"),
        show_envvar=True,
        help="s3://BUCKET/PREFIX to keep outputs in a bucket (presigned URLs); default: "
        "the data directory.",
    )(func)


def data_dir_option(func: Any) -> Any:
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=default_data_dir,
        envvar=_env("DATA_DIR"),
        show_envvar=True,
        show_default="~/.local/share/ovis-server",
        help="Where the job database, output files and built checkpoints live.",
    )(func)


def memory_options(func: Any) -> Any:
    from ovis_server.config import MEMORY_CHOICES

    func = click.option(
        "--gpu-memory",
        type=MEMORY_SIZE,
        default=None,
        envvar=_env("GPU_MEMORY"),
        show_envvar=True,
        help="GPU memory the worker may plan with and use (24GiB, 16GB, or a fraction such "
        "as 0.5); the allocator is capped to it, so a large GPU can stand in for a small "
        "one. Default: what is free.",
    )(func)
    return click.option(
        "--memory",
        type=click.Choice(MEMORY_CHOICES),
        default="auto",
        envvar=_env("MEMORY"),
        show_envvar=True,
        show_default=True,
        help="How much of the model stays on the GPU, from fastest to smallest: full, "
        "text-encoder-offload, 8bit (torchao; changes numerics), group-offload-block, "
        "group-offload-leaf. auto: the fastest that keeps the image and fits.",
    )(func)


def model_options(func: Any) -> Any:
    func = memory_options(func)
    func = click.option(
        "--fp8",
        is_flag=True,
        envvar=_env("FP8"),
        show_envvar=True,
        help="FP8 matmuls in the transformer (torchao, Hopper-class GPUs). Changes numerics.",
    )(func)
    func = click.option(
        "--compile",
        "compile_mode",
        type=click.Choice(["auto", "on", "off"]),
        default="auto",
        envvar=_env("COMPILE"),
        show_envvar=True,
        show_default=True,
        help="torch.compile the repeated transformer blocks; auto: on CUDA only.",
    )(func)
    func = click.option(
        "--dtype",
        type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
        default="auto",
        envvar=_env("DTYPE"),
        show_envvar=True,
        show_default=True,
        help="Weights dtype: auto is bfloat16 on CUDA, float32 elsewhere.",
    )(func)
    func = click.option(
        "--device",
        default="auto",
        envvar=_env("DEVICE"),
        show_envvar=True,
        show_default=True,
        help="cpu, cuda, cuda:N or mps; auto picks CUDA when present.",
    )(func)
    return click.option(
        "--model",
        default=OVIS_IMAGE.default_weights,
        envvar=_env("MODEL"),
        show_envvar=True,
        show_default=True,
        help="A hub id, a local diffusers directory, 'tiny' (a tiny random model, for trying "
        "it anywhere) or 'random-full' (the real 7B architecture with random weights, built on "
        "the GPU without a download, for load tests). Random models' images are noise.",
    )(func)


def refuse_random_full_on_cpu(model: str, device: str) -> None:
    """Say at once that ``--model random-full`` cannot run here, instead of starting a
    worker that fails to load it and is restarted over and over."""
    from ovis_server.engine.weights import RANDOM_FULL

    if model != RANDOM_FULL:
        return
    from ovis_server.engine.pipeline import EngineLoadError, check_random_full_device, pick_device

    try:
        check_random_full_device(pick_device(device))
    except EngineLoadError as exc:
        raise click.ClickException(str(exc)) from None


class Duration(click.ParamType):  # type: ignore[type-arg]
    """Seconds, or a number with a unit: 90s, 30m, 12h, 7d."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            seconds = parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if seconds <= 0:
            self.fail("a duration must be positive", param, ctx)
        return int(seconds)


DURATION = Duration()


def _check_schedule(_ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        parse_schedule(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None
    return value


MIN_METRICS_TOKEN = 16


def _check_metrics_token(
    _ctx: click.Context, param: click.Parameter, value: str | None
) -> str | None:
    if value is not None and len(value.strip()) < MIN_METRICS_TOKEN:
        raise click.BadParameter(
            f"use a long random string (at least {MIN_METRICS_TOKEN} characters), "
            "e.g. from 'openssl rand -hex 32'",
            param=param,
        )
    return value.strip() if value is not None else None


class MemorySize(click.ParamType):  # type: ignore[type-arg]
    """``--gpu-memory``: 24GiB, 16GB, 12000MiB, or a fraction of the GPU's memory."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            parse_memory_size(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return str(value).strip()


MEMORY_SIZE = MemorySize()


class BatchLimit(click.ParamType):  # type: ignore[type-arg]
    """``auto`` or a whole number from 1."""

    name = "auto|N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip().lower()
        if text != "auto" and not (text.isdigit() and int(text) >= 1):
            self.fail(f"{value!r} is neither 'auto' nor a whole number from 1", param, ctx)
        return text


BATCH_LIMIT = BatchLimit()


class Size(click.ParamType):  # type: ignore[type-arg]
    """Bytes, or a number with a unit: 1048576, 512KiB, 1MiB."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SIZE = Size()


def _check_hosts(_ctx: click.Context, param: click.Parameter, value: str) -> str:
    for name in value.split(","):
        pattern = name.strip()
        if "*" in pattern[1:] or (pattern.startswith("*") and not pattern.startswith("*.")):
            raise click.BadParameter(
                f"{pattern!r}: a wildcard stands alone or starts a name, as in *.example.com",
                param=param,
            )
    return value


def edge_options(func: Any) -> Any:
    """What one client may send and hold open (api/limits.py)."""
    func = click.option(
        "--allowed-hosts",
        callback=_check_hosts,
        default="",
        envvar=_env("ALLOWED_HOSTS"),
        show_envvar=True,
        help="Comma-separated Host names this server answers to (*.example.com allowed); "
        "others get 400. Default: any, and absolute URLs follow the client's Host unless "
        "--public-url.",
    )(func)
    func = click.option(
        "--max-connections",
        type=click.IntRange(min=0),
        default=1000,
        envvar=_env("MAX_CONNECTIONS"),
        show_envvar=True,
        show_default=True,
        help="Requests in progress at once, server-wide, before 503 with Retry-After "
        "(probes and /metrics excepted; 0: no limit).",
    )(func)
    func = click.option(
        "--max-streams-per-token",
        type=click.IntRange(min=0),
        default=20,
        envvar=_env("MAX_STREAMS_PER_TOKEN"),
        show_envvar=True,
        show_default=True,
        help="Status streams and 'Prefer: wait' submits one token holds open at once "
        "before 429 (0: no limit).",
    )(func)
    return click.option(
        "--max-body-size",
        type=SIZE,
        default="1MiB",
        envvar=_env("MAX_BODY_SIZE"),
        show_envvar=True,
        show_default=True,
        help="Largest request body taken (1048576, 512KiB, 1MiB); larger ones get 413 "
        "unread (0: no limit).",
    )(func)


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def configure_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ovis-server")
def main() -> None:
    """A self-hosted, RunComfy-compatible Model API for Ovis-Image-7B."""


@main.command("tiny-model")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def tiny_model(directory: Path) -> None:
    """Write a tiny Ovis-Image checkpoint with random weights to DIRECTORY.

    It has the real component classes and loads like the real model, but its images are
    noise. Use it for tests and to try the API without a GPU.
    """
    from ovis_server.engine.tiny import write_tiny_checkpoint

    if directory.exists() and any(directory.iterdir()):
        raise click.UsageError(f"{directory} exists and is not empty")
    written = write_tiny_checkpoint(directory)
    click.echo(str(written))


def parse_image_size(value: str) -> str | dict[str, int]:
    """A preset name, or WIDTHxHEIGHT for a custom size."""
    if value in IMAGE_SIZE_PRESETS:
        return value
    width, sep, height = value.lower().partition("x")
    if sep and width.isdigit() and height.isdigit():
        return {"width": int(width), "height": int(height)}
    return value  # let the schema say what is wrong with it


_SUFFIX_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


@main.command()
@click.argument("prompt")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where to write the image; its suffix picks the format unless --output-format.",
)
@click.option("--negative-prompt", default="", help="What the image should not show.")
@click.option(
    "--image-size",
    default="landscape_4_3",
    show_default=True,
    help=f"One of {', '.join(IMAGE_SIZE_PRESETS)}, or WIDTHxHEIGHT (multiples of 16).",
)
@click.option("--num-inference-steps", "--steps", type=int, default=28, show_default=True)
@click.option("--guidance-scale", type=float, default=5.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Omit for a random seed (printed).")
@click.option("--output-format", type=click.Choice(["png", "jpeg", "webp"]), default=None)
@model_options
@data_dir_option
def generate(
    prompt: str,
    output: Path,
    negative_prompt: str,
    image_size: str,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int | None,
    output_format: str | None,
    model: str,
    device: str,
    dtype: str,
    compile_mode: str,
    fp8: bool,
    memory: str,
    gpu_memory: str | None,
    data_dir: Path,
) -> None:
    """Generate one image locally, with a progress bar, and write it to OUTPUT."""
    from tqdm import tqdm

    from ovis_server.engine.pipeline import Engine, EngineLoadError
    from ovis_server.engine.weights import WeightsNotFoundError, resolve_weights

    chosen_format = output_format or _SUFFIX_FORMATS.get(output.suffix.lower())
    if chosen_format is None:
        raise click.UsageError(
            f"cannot tell the image format from {output.name!r}: use a .png, .jpg or .webp "
            "name, or --output-format"
        )
    try:
        request = OvisImageInput.model_validate(
            {
                "prompt": prompt,
                "negative_prompt": negative_prompt,
                "image_size": parse_image_size(image_size),
                "num_inference_steps": num_inference_steps,
                "guidance_scale": guidance_scale,
                "seed": seed,
                "output_format": chosen_format,
            }
        )
    except ValidationError as exc:
        raise click.UsageError("; ".join(field_problems(exc.errors()))) from None

    configure_logging("warning")
    try:
        engine = Engine.load(
            resolve_weights(model, data_dir),
            device=device,
            dtype=dtype,
            compile=compile_choice(compile_mode),
            fp8=fp8,
            memory=memory,
            gpu_memory=None if gpu_memory is None else parse_memory_size(gpu_memory),
        )
    except (EngineLoadError, WeightsNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(engine.memory.describe(), err=True)

    used_seed = request.resolved_seed()
    with tqdm(total=request.num_inference_steps, unit="step", desc="denoising") as bar:

        def on_step(step: int, total: int) -> bool:
            bar.update(step - bar.n)
            return True

        image = engine.generate(request.to_generation_request(used_seed), on_step=on_step)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(encode_image(image, request.output_format))
    click.echo(
        f"seed {used_seed}: wrote {image.width}x{image.height} {chosen_format} to {output}",
        err=True,
    )


def worker_options(func: Any) -> Any:
    func = click.option(
        "--max-batch",
        type=BATCH_LIMIT,
        default="auto",
        envvar=_env("MAX_BATCH"),
        show_envvar=True,
        show_default=True,
        help="Queued jobs of one size, steps and guidance that a worker runs in one call; "
        "auto: 4 on CUDA (fewer if the memory plan has no room), 1 elsewhere.",
    )(func)
    func = click.option(
        "--stall-timeout",
        type=DURATION,
        default=600,
        envvar=_env("STALL_TIMEOUT"),
        show_envvar=True,
        show_default=True,
        help="A worker whose job makes no step this long is ended and replaced (a hang).",
    )(func)
    func = click.option(
        "--max-attempts",
        type=click.IntRange(min=1),
        default=3,
        envvar=_env("MAX_ATTEMPTS"),
        show_envvar=True,
        show_default=True,
        help="Workers a job may lose (crash, kill) before it fails instead of rerunning.",
    )(func)
    return click.option(
        "--lease-seconds",
        type=click.FloatRange(min=0.5),
        default=30.0,
        envvar=_env("LEASE_SECONDS"),
        show_envvar=True,
        show_default=True,
        help="A running job whose worker is silent this long goes back to the queue.",
    )(func)


@main.command()
@click.option(
    "--host",
    default="127.0.0.1",
    envvar=_env("HOST"),
    show_envvar=True,
    show_default=True,
    help="Interface to listen on; 0.0.0.0 for every one.",
)
@click.option(
    "--port", type=int, default=8000, envvar=_env("PORT"), show_envvar=True, show_default=True
)
@click.option(
    "--public-url",
    default=None,
    envvar=_env("PUBLIC_URL"),
    show_envvar=True,
    help="The URL clients reach this server at (behind a proxy); result, status and "
    "file URLs start with it. Default: the URL each request came in on.",
)
@click.option(
    "--no-auth",
    is_flag=True,
    envvar=_env("NO_AUTH"),
    show_envvar=True,
    help="Serve /v1 without tokens. Only on a machine nobody else can reach.",
)
@click.option(
    "--no-worker",
    is_flag=True,
    envvar=_env("NO_WORKER"),
    show_envvar=True,
    help="Run the API alone; workers run elsewhere ('ovis-server worker').",
)
@click.option(
    "--url-ttl",
    type=click.IntRange(min=1),
    default=7 * DAY,
    envvar=_env("URL_TTL"),
    show_envvar=True,
    show_default=True,
    help="Seconds an output file URL stays valid after it is handed out.",
)
@click.option(
    "--base-price-usd",
    type=click.FloatRange(min=0),
    default=0.0,
    envvar=_env("BASE_PRICE_USD"),
    show_envvar=True,
    show_default=True,
    help="Price per output image shown in the catalogue and as each result's cost.",
)
@click.option(
    "--max-queued",
    type=click.IntRange(min=0),
    default=10_000,
    envvar=_env("MAX_QUEUED"),
    show_envvar=True,
    show_default=True,
    help="Queued requests in all before submits get 429 (0: no limit).",
)
@click.option(
    "--max-queued-per-token",
    type=click.IntRange(min=0),
    default=1_000,
    envvar=_env("MAX_QUEUED_PER_TOKEN"),
    show_envvar=True,
    show_default=True,
    help="Queued requests per token before its submits get 429 (0: no limit).",
)
@click.option(
    "--rate-limit",
    type=click.IntRange(min=0),
    default=600,
    envvar=_env("RATE_LIMIT"),
    show_envvar=True,
    show_default=True,
    help="Submits per minute per token before 429 (0: no limit).",
)
@click.option(
    "--retention",
    type=DURATION,
    default="7d",
    envvar=_env("RETENTION"),
    show_envvar=True,
    show_default=True,
    help="How long finished requests and their files are kept (90s, 12h, 7d...).",
)
@click.option(
    "--cleanup-interval",
    type=DURATION,
    default="10m",
    envvar=_env("CLEANUP_INTERVAL"),
    show_envvar=True,
    show_default=True,
    help="How often expired requests are looked for.",
)
@click.option(
    "--webhook-retry-schedule",
    callback=_check_schedule,
    default=DEFAULT_WEBHOOK_SCHEDULE,
    envvar=_env("WEBHOOK_RETRY_SCHEDULE"),
    show_envvar=True,
    show_default=True,
    help="Delays of a webhook's attempts, each after the one before (0 first: at once); "
    "a message the receiver does not take (2xx within 10 s) by the last is given up.",
)
@click.option(
    "--allow-private-webhooks",
    is_flag=True,
    envvar=_env("ALLOW_PRIVATE_WEBHOOKS"),
    show_envvar=True,
    help="Send webhooks to loopback, private and link-local addresses too (receivers on "
    "your internal network); by default only public addresses are reached.",
)
@click.option(
    "--metrics-token",
    callback=_check_metrics_token,
    default=None,
    envvar=_env("METRICS_TOKEN"),
    show_envvar=True,
    help="Bearer token Prometheus sends to read /metrics (at least 16 characters). "
    "Without it /metrics answers 401, unless --metrics-public.",
)
@click.option(
    "--metrics-public",
    is_flag=True,
    envvar=_env("METRICS_PUBLIC"),
    show_envvar=True,
    help="Serve /metrics to anyone, without a token. Only where nobody else can connect.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    envvar=_env("LOG_LEVEL"),
    show_envvar=True,
    show_default=True,
)
@edge_options
@model_options
@worker_options
@storage_options
@database_option
@data_dir_option
def serve(
    host: str,
    port: int,
    public_url: str | None,
    no_auth: bool,
    no_worker: bool,
    url_ttl: int,
    base_price_usd: float,
    max_queued: int,
    max_queued_per_token: int,
    rate_limit: int,
    retention: int,
    cleanup_interval: int,
    webhook_retry_schedule: str,
    allow_private_webhooks: bool,
    metrics_token: str | None,
    metrics_public: bool,
    log_level: str,
    max_body_size: int,
    max_streams_per_token: int,
    max_connections: int,
    allowed_hosts: str,
    model: str,
    device: str,
    dtype: str,
    compile_mode: str,
    fp8: bool,
    memory: str,
    gpu_memory: str | None,
    lease_seconds: float,
    max_attempts: int,
    stall_timeout: int,
    max_batch: str,
    storage: str | None,
    s3_endpoint_url: str | None,
    database_url: str | None,
    data_dir: Path,
) -> None:
    """Serve the Model API, with a worker process beside it that runs the model."""
    import uvicorn

    from ovis_server.api.access_log import redact_access_log
    from ovis_server.api.app import GRACEFUL_SHUTDOWN_SECONDS, ApiServer, create_app
    from ovis_server.worker.supervisor import (
        WorkerSupervisor,
        worker_command,
        worker_environment,
    )

    configure_logging(log_level)
    logger = logging.getLogger("ovis_server.serve")
    settings = Settings(
        data_dir=data_dir.expanduser().resolve(),
        database_url=database_url,
        storage=storage,
        s3_endpoint_url=s3_endpoint_url,
        public_url=public_url.rstrip("/") if public_url else None,
        auth=not no_auth,
        url_ttl_seconds=url_ttl,
        base_price_usd=base_price_usd,
        model=model,
        device=device,
        dtype=dtype,
        lease_seconds=lease_seconds,
        max_attempts=max_attempts,
        stall_timeout_seconds=stall_timeout,
        max_queued=max_queued,
        max_queued_per_token=max_queued_per_token,
        rate_limit_per_minute=rate_limit,
        retention_seconds=retention,
        cleanup_interval_seconds=cleanup_interval,
        max_batch=max_batch,
        compile=compile_mode,
        fp8=fp8,
        memory=memory,
        gpu_memory=gpu_memory,
        webhook_retry_schedule=webhook_retry_schedule,
        allow_private_webhooks=allow_private_webhooks,
        metrics_token=metrics_token,
        metrics_public=metrics_public,
        max_body_size=max_body_size,
        max_streams_per_token=max_streams_per_token,
        max_connections=max_connections,
        allowed_hosts=tuple(name.strip() for name in allowed_hosts.split(",") if name.strip()),
    )
    if not no_worker:
        refuse_random_full_on_cpu(model, device)
    if metrics_token and metrics_public:
        raise click.UsageError("give --metrics-token or --metrics-public, not both")
    try:
        app = create_app(settings)
    except ValueError as exc:  # a --storage or --database-url it cannot use
        raise click.ClickException(str(exc)) from None
    if host not in LOOPBACK_HOSTS and not settings.public_url and not settings.allowed_hosts:
        logger.warning(
            "listening on %s without --public-url or --allowed-hosts: absolute URLs in "
            "answers (status, result, file links) follow whatever Host header a client sends",
            host,
        )
    if no_auth:
        logger.warning("--no-auth: anyone who can reach %s:%d can use this server", host, port)
    elif app.state.tokens.count() == 0:
        info, secret = app.state.tokens.create("default")
        click.echo(
            f"No API token existed in {settings.data_dir}, so one was created ({info.id}).\n"
            "Its webhooks are signed with "
            f"{app.state.tokens.webhook_secret(info.id)} ('ovis-server token webhook-secret').\n"
            "The token is shown only this once; send it as 'Authorization: Bearer <token>':\n"
            f"{secret}"
        )
    supervisor = (
        None
        if no_worker
        else WorkerSupervisor(worker_command(settings), worker_environment(settings))
    )
    # uvicorn shuts down on SIGINT/SIGTERM, then restores the handlers it found and raises
    # the signal again. Finding these, the signal ends here and the worker is stopped in
    # order below instead of being orphaned by an abrupt exit.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda _signum, _frame: None)
    if supervisor is not None:
        supervisor.start()
    try:
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            proxy_headers=True,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
            # A backstop under the app's own cap (which answers 503 with the error body):
            # connections, idle ones too, beyond twice it get uvicorn's bare 503.
            limit_concurrency=2 * max_connections if max_connections else None,
        )
        redact_access_log()  # after uvicorn.Config, which configures its loggers
        ApiServer(config, app.state.hub).run()
    finally:
        if supervisor is not None:
            supervisor.stop()


@main.command()
@model_options
@worker_options
@storage_options
@database_option
@data_dir_option
@click.option("--parent-pid", type=int, default=None, hidden=True)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    envvar=_env("LOG_LEVEL"),
    show_default=True,
)
def worker(
    model: str,
    device: str,
    dtype: str,
    compile_mode: str,
    fp8: bool,
    memory: str,
    gpu_memory: str | None,
    lease_seconds: float,
    max_attempts: int,
    stall_timeout: int,
    max_batch: str,
    storage: str | None,
    s3_endpoint_url: str | None,
    database_url: str | None,
    data_dir: Path,
    parent_pid: int | None,
    log_level: str,
) -> None:
    """Run a worker: load the model on one device and take jobs from the queue.

    Run one per GPU (--device cuda:N) on any number of hosts, pointed at the same
    --database-url and --storage as the API replicas.
    """
    from ovis_server.engine.pipeline import EngineLoadError
    from ovis_server.engine.weights import WeightsNotFoundError
    from ovis_server.worker.process import run_worker

    configure_logging(log_level)
    refuse_random_full_on_cpu(model, device)
    settings = Settings(
        data_dir=data_dir.expanduser().resolve(),
        database_url=database_url,
        storage=storage,
        s3_endpoint_url=s3_endpoint_url,
        model=model,
        device=device,
        dtype=dtype,
        lease_seconds=lease_seconds,
        max_attempts=max_attempts,
        stall_timeout_seconds=stall_timeout,
        max_batch=max_batch,
        compile=compile_mode,
        fp8=fp8,
        memory=memory,
        gpu_memory=gpu_memory,
    )
    try:
        run_worker(settings, parent_pid=parent_pid)
    except (EngineLoadError, WeightsNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


@main.group()
def token() -> None:
    """Create, list and revoke API tokens."""


def _token_store(data_dir: Path, database_url: str | None) -> Any:
    from ovis_server.db.connect import connect, migrate
    from ovis_server.tokens import TokenStore

    settings = Settings(data_dir=data_dir.expanduser().resolve(), database_url=database_url)
    db = connect(settings.db_url)
    migrate(db)
    return TokenStore(db)


@token.command("create")
@click.option("--name", required=True, help="Who or what the token is for.")
@database_option
@data_dir_option
def token_create(name: str, database_url: str | None, data_dir: Path) -> None:
    """Create a token; its secret is printed alone on the last line, once."""
    from ovis_server.tokens import TokenError

    store = _token_store(data_dir, database_url)
    try:
        info, secret = store.create(name)
    except TokenError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"webhook signing secret: {store.webhook_secret(info.id)}")
    click.echo(f"created token {info.id} ({info.name}); it is shown only now:")
    click.echo(secret)


@token.command("list")
@database_option
@data_dir_option
def token_list(database_url: str | None, data_dir: Path) -> None:
    """List tokens (never their secrets)."""
    rows = _token_store(data_dir, database_url).list()
    if not rows:
        click.echo("no tokens; create one with 'ovis-server token create --name NAME'")
        return
    click.echo(f"{'ID':<21}  {'NAME':<20}  {'STARTS WITH':<12}  {'CREATED':<20}  STATE")
    for info in rows:
        created = info.created_at.strftime("%Y-%m-%d %H:%M:%S")
        state = "active" if info.active else "revoked"
        click.echo(f"{info.id:<21}  {info.name:<20}  {info.hint + '…':<12}  {created:<20}  {state}")


@token.command("revoke")
@click.argument("id_or_name")
@database_option
@data_dir_option
def token_revoke(id_or_name: str, database_url: str | None, data_dir: Path) -> None:
    """Revoke a token by id, or by name when one active token has it."""
    from ovis_server.tokens import TokenError

    try:
        info = _token_store(data_dir, database_url).revoke(id_or_name)
    except TokenError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"revoked token {info.id} ({info.name})")


@token.command("webhook-secret")
@click.argument("id_or_name")
@database_option
@data_dir_option
def token_webhook_secret(id_or_name: str, database_url: str | None, data_dir: Path) -> None:
    """Print the secret that signs the webhooks of a token's requests ('anonymous': those
    of a --no-auth server)."""
    from ovis_server.api.auth import ANONYMOUS
    from ovis_server.tokens import TokenError

    store = _token_store(data_dir, database_url)
    try:
        token_id = ANONYMOUS if id_or_name == ANONYMOUS else store.find(id_or_name).id
    except TokenError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(store.webhook_secret(token_id))


@main.group()
def db() -> None:
    """The job database."""


@db.command("upgrade")
@database_option
@data_dir_option
def db_upgrade(database_url: str | None, data_dir: Path) -> None:
    """Apply the schema migrations the database lacks (serve and worker also do on start)."""
    from alembic.runtime.migration import MigrationContext

    from ovis_server.db.connect import connect, migrate

    settings = Settings(data_dir=data_dir.expanduser().resolve(), database_url=database_url)
    engine = connect(settings.db_url)
    migrate(engine)
    with engine.connect() as conn:
        revision = MigrationContext.configure(conn).get_current_revision()
    click.echo(f"{engine.url.render_as_string(hide_password=True)} is at revision {revision}")


# --- the client side: talk to a running server -------------------------------------------


def client_options(func: Any) -> Any:
    func = click.option(
        "--token",
        envvar=_env("TOKEN"),
        show_envvar=True,
        help="The API token (Bearer).",
    )(func)
    return click.option(
        "--url",
        envvar=[_env("URL"), "RUNCOMFY_MODEL_API_BASE"],
        show_envvar=True,
        default="http://127.0.0.1:8000",
        show_default=True,
        help="The server's base URL.",
    )(func)


def _print_json(model: Any) -> None:
    click.echo(model.model_dump_json(indent=2, exclude_none=True))


def _client_errors(func: Any) -> Any:
    """API errors become a one-line message and exit code 1."""
    import functools

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ovis_server.client import OvisError

        try:
            return func(*args, **kwargs)
        except OvisError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


@main.command("run")
@click.argument("prompt")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where to save the image.",
)
@click.option("--negative-prompt", default=None)
@click.option(
    "--image-size", default=None, help=f"One of {', '.join(IMAGE_SIZE_PRESETS)}, or WIDTHxHEIGHT."
)
@click.option("--num-inference-steps", "--steps", type=int, default=None)
@click.option("--guidance-scale", type=float, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--output-format", type=click.Choice(["png", "jpeg", "webp"]), default=None)
@click.option("--model-id", default=OVIS_IMAGE.model_id, show_default=True)
@client_options
@_client_errors
def run_remote(
    prompt: str,
    output: Path,
    negative_prompt: str | None,
    image_size: str | None,
    num_inference_steps: int | None,
    guidance_scale: float | None,
    seed: int | None,
    output_format: str | None,
    model_id: str,
    url: str,
    token: str | None,
) -> None:
    """Generate on a server: queue position, then a step progress bar; Ctrl-C cancels."""
    from tqdm import tqdm

    from ovis_server.client import Client, JobFailedError, Status

    payload: dict[str, Any] = {"prompt": prompt}
    optional = {
        "negative_prompt": negative_prompt,
        "image_size": parse_image_size(image_size) if image_size else None,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "output_format": output_format or _SUFFIX_FORMATS.get(output.suffix.lower()),
    }
    payload.update({key: value for key, value in optional.items() if value is not None})
    with Client(url, token) as client:
        submission = client.submit(payload, model_id)
        click.echo(f"request {submission.request_id}", err=True)
        bar = tqdm(total=1, unit="step", desc="queued", leave=True)

        def show(status: Status) -> None:
            if status.status == "in_queue":
                bar.set_description(f"queued, position {status.queue_position}")
            elif status.progress is not None:
                bar.total = status.progress.total
                bar.set_description("denoising")
                bar.update(status.progress.step - bar.n)
            else:
                bar.set_description(status.status)

        try:
            result = client.wait(submission.request_id, on_progress=show, poll_interval=0.25)
        except KeyboardInterrupt:
            bar.close()
            answer = client.cancel(submission.request_id)
            click.echo(f"cancel: {answer.outcome}", err=True)
            sys.exit(130)
        bar.close()
        if result.status != "succeeded" or result.image_url is None:
            message = result.error.message if result.error else result.status
            raise JobFailedError(result.request_id, result.status, message or "")
        client.download(result.image_url, output)
    click.echo(f"seed {result.seed}: saved {output}", err=True)


@main.command("status")
@click.argument("request_id")
@client_options
@_client_errors
def status_remote(request_id: str, url: str, token: str | None) -> None:
    """Print a request's status."""
    from ovis_server.client import Client

    with Client(url, token) as client:
        _print_json(client.status(request_id))


@main.command("result")
@click.argument("request_id")
@client_options
@_client_errors
def result_remote(request_id: str, url: str, token: str | None) -> None:
    """Print a request's result."""
    from ovis_server.client import Client

    with Client(url, token) as client:
        _print_json(client.result(request_id))


@main.command("cancel")
@click.argument("request_id")
@client_options
@_client_errors
def cancel_remote(request_id: str, url: str, token: str | None) -> None:
    """Cancel a request."""
    from ovis_server.client import Client

    with Client(url, token) as client:
        _print_json(client.cancel(request_id))


@main.command("delete")
@click.argument("request_id")
@client_options
@_client_errors
def delete_remote(request_id: str, url: str, token: str | None) -> None:
    """Delete a request and its output files (a running job stops)."""
    from ovis_server.client import Client

    with Client(url, token) as client:
        client.delete(request_id)
    click.echo(f"deleted {request_id}", err=True)
