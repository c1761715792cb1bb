"""The server side: ``serve`` (the API and its worker) and ``worker``; local ``generate`` is
in ``generate.py``."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Iterable

import click

from ovis_server.catalogue.registry import ModelRegistry, UnknownModelError
from ovis_server.catalogue.spec import ModelSpec
from ovis_server.cli.common import (
    configure_logging,
    exit_without_teardown,
    imports_out_of_the_collectors_reach,
)
from ovis_server.cli.options import settings_options
from ovis_server.config import Settings

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def model_registry(settings: Settings) -> ModelRegistry:
    """The models ``--model-id`` serves, or a usage error naming the one that is unknown."""
    try:
        return ModelRegistry.from_settings(settings)
    except UnknownModelError as exc:
        raise click.UsageError(str(exc)) from None


def served_model(
    models: ModelRegistry, settings: Settings, devices: Iterable[str] = ()
) -> ModelSpec:
    """The first model ``--model-id`` names, or a usage error. Says at once that ``--model
    random-full`` cannot run on one of ``devices`` (default: ``--device``), instead of
    starting a worker that fails to load it and is restarted over and over."""
    from ovis_server.engine.weights import RANDOM_FULL

    try:
        model = models.served(settings)
    except UnknownModelError as exc:
        raise click.UsageError(str(exc)) from None
    if not any(spec.weights(settings.for_model(spec.names)) == RANDOM_FULL for spec in models):
        return model
    from ovis_server.engine.families import get_family
    from ovis_server.engine.loading import EngineLoadError, check_random_full_device, pick_device

    for device in sorted(set(devices)) or [settings.device]:
        try:
            check_random_full_device(pick_device(device), get_family(model.family))
        except EngineLoadError as exc:
            raise click.ClickException(str(exc)) from None
    return model


@click.command()
@settings_options("serve")
def serve(settings: Settings) -> None:
    """Serve the Model API, with worker processes beside it that run the model: one per
    GPU by default (--devices)."""
    from ovis_server.api.app import create_app
    from ovis_server.api.large_buffers import map_large_buffers
    from ovis_server.api.middleware.access_log import redact_access_log
    from ovis_server.api.server import ApiServer, server_config
    from ovis_server.worker.supervisor import DevicesError, WorkerPool, plan_workers

    configure_logging(settings.log_level)
    logger = logging.getLogger("ovis_server.serve")
    map_large_buffers()  # a 16 MiB body, once answered, is not kept resident
    models = model_registry(settings)
    try:
        slots = plan_workers(settings)
    except DevicesError as exc:
        raise click.UsageError(str(exc)) from None
    if not settings.no_worker:
        served_model(models, settings, [slot.device for slot in slots])
    try:
        app = create_app(settings, models)
    except ValueError as exc:  # a --storage or --database-url it cannot use
        raise click.ClickException(str(exc)) from None
    host = settings.host
    if host not in LOOPBACK_HOSTS and not settings.public_url and not settings.allowed_hosts:
        logger.warning(
            "listening on %s without --public-url or --allowed-hosts: absolute URLs in "
            "answers (status, result, file links) follow whatever Host header a client sends",
            host,
        )
    if settings.no_auth:
        logger.warning(
            "--no-auth: anyone who can reach %s:%d can use this server",
            settings.host,
            settings.port,
        )
    elif app.state.tokens.count() == 0:
        info, secret = app.state.tokens.create("default")
        click.echo(
            first_token_block(settings, info.id, secret, app.state.tokens.webhook_secret(info.id))
        )
    registry = app.state.workers
    hostname = socket.gethostname()

    def worker_exited(pid: int) -> None:
        """A worker seen to exit gives its jobs back to the queue and leaves /readyz at
        once, not when its lease runs out and its heartbeat goes stale."""
        released = app.state.store.release_dead_worker(hostname, pid, settings.max_attempts)
        if released:
            logger.warning("released %d job(s) of worker process %d, which died", released, pid)
        registry.forget_process(hostname, pid)

    workers = WorkerPool.for_slots(settings, slots, on_exit=worker_exited)
    if len(slots) > 1:
        logger.info("starting %d workers: %s", len(slots), ", ".join(slot.name for slot in slots))
    # uvicorn shuts down on SIGINT/SIGTERM, then restores the handlers it found and raises
    # the signal again. Finding these, the signal ends here and the worker is stopped in
    # order below instead of being orphaned by an abrupt exit.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda _signum, _frame: None)
    workers.start()
    try:
        config = server_config(app, settings)
        redact_access_log()  # after uvicorn.Config, which configures its loggers
        ApiServer(config, app.state.hub).run()
    finally:
        workers.stop()
    exit_without_teardown(0)  # the workers have stopped and uvicorn has closed its connections


def first_token_block(settings: Settings, token_id: str, secret: str, webhook_secret: str) -> str:
    """What the first start prints about the token it made: framed, so it stands out."""
    # Listening on every interface: loopback is one of them.
    everywhere = settings.host in ("0.0.0.0", "::", "")  # noqa: S104
    host = "127.0.0.1" if everywhere else settings.host
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    url = settings.public_url or f"http://{host}:{settings.port}"
    rule = "=" * 78
    return (
        f"\n{rule}\n"
        f"No API token existed in {settings.data_dir}, so one was made ({token_id}).\n"
        "It is shown only this once. Send it as 'Authorization: Bearer <token>', paste it\n"
        "into the playground, or set it for the examples in the README:\n\n"
        f"    export OVIS_SERVER_URL={url}\n"
        f"    export OVIS_SERVER_TOKEN={secret}\n\n"
        f"Its webhooks are signed with {webhook_secret}\n"
        "('ovis-server token webhook-secret' shows it again).\n"
        f"{rule}\n"
    )


@click.command()
@click.option("--parent-pid", type=int, default=None, hidden=True)
# Set by serve: the worker's device as serve numbers it (a GPU worker sees only its own GPU,
# as cuda:0), and the worker's name in its log lines when serve runs several.
@click.option("--device-label", default=None, hidden=True)
@click.option("--log-name", default=None, hidden=True)
@settings_options("worker", from_json=True)
def worker(
    settings: Settings, parent_pid: int | None, device_label: str | None, log_name: str | None
) -> None:
    """Run a worker: load the model on one device and take jobs from the queue.

    Run one per GPU (--device cuda:N) on any number of hosts, pointed at the same
    --database-url and --storage as the API replicas.
    """
    started = time.perf_counter()  # the time to ready the worker reports counts its imports
    models = model_registry(settings)  # the catalogue only: an unknown model is said at once
    # Out of the collector's reach, each full collection while the models load does not
    # scan them again: on the tiny model (2-core machine) the worker's imports took 0.45 s
    # less CPU so, and its models' pipeline modules, imported on first use, 0.45 s more.
    with imports_out_of_the_collectors_reach():
        import ovis_server.engine.pipeline  # noqa: F401  (torch and diffusers)
        from ovis_server.engine.download import DownloadInterrupted
        from ovis_server.engine.families import import_pipeline_classes
        from ovis_server.engine.loading import EngineLoadError
        from ovis_server.engine.weights import WeightsNotFoundError
        from ovis_server.worker.process import run_worker

        import_pipeline_classes(spec.family for spec in models)

    configure_logging(settings.log_level)
    if log_name:
        name_log_lines(log_name)
    served_model(models, settings)
    try:
        run_worker(
            settings,
            parent_pid=parent_pid,
            device_label=device_label,
            models=models,
            started=started,
        )
    except DownloadInterrupted:
        # Stopped while downloading: what is downloaded stays in the cache. Download threads
        # still busy with a file would hold the interpreter's exit until it is done.
        logging.shutdown()
        os._exit(0)
    except (EngineLoadError, WeightsNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    # Stopped: every job it held is recorded or given back, and its threads are joined.
    exit_without_teardown(0)


def name_log_lines(name: str) -> None:
    """Start every log line with the worker's name (serve's console mixes its workers')."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s [{name}] %(name)s: %(message)s")
        )
