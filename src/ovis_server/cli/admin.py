"""Looking after a server's data: ``token``, ``db``, ``tiny-model`` and ``download``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ovis_server.catalogue.registry import ModelRegistry, UnknownModelError
from ovis_server.cli.options import settings_options
from ovis_server.config import Settings
from ovis_server.model_names import DEFAULT_MODEL_ID

if TYPE_CHECKING:
    from ovis_server.catalogue.spec import ModelSpec
    from ovis_server.tokens import TokenStore


@click.command("tiny-model")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--model-id",
    default=None,
    help="The catalogue model (id or alias) whose family to build: aidc-ai/ovis-image "
    "(default) or tongyi-mai/z-image/turbo.",
)
def tiny_model(directory: Path, model_id: str | None) -> None:
    """Write a tiny checkpoint with random weights to DIRECTORY: Ovis-Image's, or the
    family of --model-id's.

    It has the real component classes and loads like the real model, but its images are
    noise. Use it for tests and to try the API without a GPU.
    """
    from ovis_server.catalogue.registry import BUILT_IN
    from ovis_server.engine.tiny import write_tiny_checkpoint

    models = ModelRegistry(BUILT_IN)
    spec = models.resolve(model_id) if model_id else models.get(DEFAULT_MODEL_ID)
    if spec is None:
        raise click.UsageError(
            f"--model-id {model_id!r} is not a built-in model; there are "
            f"{', '.join(models.names())}"
        )
    if directory.exists() and any(directory.iterdir()):
        raise click.UsageError(f"{directory} exists and is not empty")
    written = write_tiny_checkpoint(directory, spec.family)
    click.echo(str(written))


@click.command("download")
@settings_options("download")
def download(settings: Settings) -> None:
    """Download the weights of every model --model-id names ahead of time (by default
    aidc-ai/ovis-image and every --extra-models id: what serve loads; about 20 GB for
    Ovis-Image-7B, about 20 GB for Z-Image-Turbo), with progress, into the Hugging Face cache
    that serve and worker load them from (HF_HOME, by default ~/.cache/huggingface). Does
    nothing for weights that are there already."""
    from ovis_server.engine.download import fetch_weights
    from ovis_server.engine.weights import WeightsNotFoundError

    # Every name and its weights first, so that a mistake in one is said before anything
    # downloads; then the downloads, one model after another.
    try:
        served = [spec for spec in ModelRegistry.from_settings(settings) if spec.variant_of is None]
    except UnknownModelError as exc:
        raise click.UsageError(str(exc)) from None
    several = len(served) > 1
    wanted = _hub_weights(settings, served)
    console = _Console(sys.stdout.isatty())
    failed: list[str] = []
    for spec, weights in wanted:
        try:
            fetched = fetch_weights(
                weights,
                log=console.line,
                status_line=console.redraw if console.tty else None,
                interval=0.5 if console.tty else 1.0,
            )
        except KeyboardInterrupt:
            console.line(
                "interrupted: the files downloaded stay in the cache; run again for the rest"
            )
            # Download threads busy with a file would hold the exit until it is done.
            sys.stdout.flush()
            os._exit(130)
        except WeightsNotFoundError as exc:
            console.end_redraw()
            if not several:
                raise click.ClickException(str(exc)) from None
            failed.append(f"{spec.model_id}: {exc}")
            console.line(f"failed: {failed[-1]}")  # said now too, in case of a Ctrl-C later
            continue
        if fetched.downloaded:
            # With several models, serve takes each one's weights in --model's per-model form.
            option = f"{spec.model_id}={weights}" if several else weights
            click.echo(
                f"done: serve and worker with --model {option} load it from {fetched.folder}"
            )
        else:
            click.echo(
                f"{spec.model_id}: nothing to download" if several else "nothing to download"
            )
    if failed:
        raise click.ClickException(
            f"{len(failed)} of {len(wanted)} models did not download:\n" + "\n".join(failed)
        )


def _hub_weights(settings: Settings, served: list[ModelSpec]) -> list[tuple[ModelSpec, str]]:
    """The hub weights of each model ``served`` (no LoRA variants: they load their base
    model's), each once; says (and leaves out) those that are built or local, and stops at a
    --model that is wrong."""
    from ovis_server.engine.weights import (
        RANDOM_FULL,
        TINY,
        WeightsNotFoundError,
        is_hub_id,
        resolve_weights,
        tiny_checkpoint_dir,
    )

    wanted: list[tuple[ModelSpec, str]] = []
    for spec in served:
        model = spec.weights(settings.for_model(spec.names))
        prefix = f"{spec.model_id}: " if len(served) > 1 else ""
        if model == RANDOM_FULL:
            click.echo(
                f"{prefix}random-full is built on the GPU when a worker starts: nothing to download"
            )
            continue
        tiny = tiny_checkpoint_dir(settings.data_dir, spec.family) / "model_index.json"
        existed = tiny.is_file()
        try:
            weights = resolve_weights(model, settings.data_dir, spec.family)
        except WeightsNotFoundError as exc:
            raise click.UsageError(f"{prefix}{exc}") from None
        if model == TINY:
            click.echo(f"{prefix}the tiny model is {'already' if existed else 'now'} at {weights}")
        elif not is_hub_id(weights):
            click.echo(f"{prefix}{weights} is a local directory: nothing to download")
        else:
            first = next((other for other, taken in wanted if taken == weights), None)
            if first is None:
                wanted.append((spec, weights))
            else:
                click.echo(f"{prefix}the same weights as {first.model_id}: {weights}")
    return wanted


class _Console:
    """Lines, and on a terminal one progress line redrawn in place."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.drawn = 0

    def redraw(self, text: str) -> None:
        click.echo("\r" + text.ljust(self.drawn), nl=False)
        self.drawn = len(text)

    def end_redraw(self) -> None:
        if self.drawn:
            click.echo()
            self.drawn = 0

    def line(self, text: str) -> None:
        self.end_redraw()
        click.echo(text)


@click.group()
def token() -> None:
    """Create, list and revoke API tokens."""


def _token_store(settings: Settings) -> TokenStore:
    from ovis_server.db.connect import connect, migrate
    from ovis_server.tokens import TokenStore

    db = connect(settings.db_url)
    migrate(db)
    return TokenStore(db)


@token.command("create")
@click.option("--name", required=True, help="Who or what the token is for.")
@settings_options("admin")
def token_create(name: str, settings: Settings) -> None:
    """Create a token; its secret is printed alone on the last line, once."""
    from ovis_server.tokens import TokenError

    store = _token_store(settings)
    try:
        info, secret = store.create(name)
    except TokenError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"webhook signing secret: {store.webhook_secret(info.id)}")
    click.echo(f"created token {info.id} ({info.name}); it is shown only now:")
    click.echo(secret)


@token.command("list")
@settings_options("admin")
def token_list(settings: Settings) -> None:
    """List tokens (never their secrets)."""
    rows = _token_store(settings).list()
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
@settings_options("admin")
def token_revoke(id_or_name: str, settings: Settings) -> None:
    """Revoke a token by id, or by name when one active token has it."""
    from ovis_server.tokens import TokenError

    try:
        info = _token_store(settings).revoke(id_or_name)
    except TokenError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"revoked token {info.id} ({info.name})")


@token.command("webhook-secret")
@click.argument("id_or_name")
@settings_options("admin")
def token_webhook_secret(id_or_name: str, settings: Settings) -> None:
    """Print the secret that signs the webhooks of a token's requests ('anonymous': those
    of a --no-auth server)."""
    from ovis_server.api.auth import ANONYMOUS
    from ovis_server.tokens import TokenError

    store = _token_store(settings)
    try:
        token_id = ANONYMOUS if id_or_name == ANONYMOUS else store.find(id_or_name).id
    except TokenError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(store.webhook_secret(token_id))


@click.group()
def db() -> None:
    """The job database."""


@db.command("upgrade")
@settings_options("admin")
def db_upgrade(settings: Settings) -> None:
    """Apply the schema migrations the database lacks (serve and worker also do on start)."""
    from ovis_server.db.connect import connect, current_revisions, migrate

    engine = connect(settings.db_url)
    migrate(engine)
    revision = ", ".join(current_revisions(engine))
    click.echo(f"{engine.url.render_as_string(hide_password=True)} is at revision {revision}")
