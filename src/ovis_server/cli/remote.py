"""The client side: talk to a running server (``run``, ``status``, ``result``, ``cancel``,
``delete``)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ovis_server.catalogue.text_to_image import IMAGE_SIZE_PRESETS
from ovis_server.cli.common import (
    SUFFIX_FORMATS,
    input_options,
    output_options,
    parse_image_size,
    parse_lora,
)
from ovis_server.model_names import DEFAULT_MODEL_ID
from ovis_server.settings_sources import ENV_PREFIX

if TYPE_CHECKING:
    from tqdm import tqdm

    from ovis_server.client import Status


def client_options(func: Any) -> Any:
    func = click.option(
        "--token",
        envvar=ENV_PREFIX + "TOKEN",
        show_envvar=True,
        help="The API token (Bearer).",
    )(func)
    return click.option(
        "--url",
        envvar=[ENV_PREFIX + "URL", "RUNCOMFY_MODEL_API_BASE"],
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


@click.command("run")
@click.argument("prompt")
@output_options("Where to save the image.")
@click.option("--negative-prompt", default=None)
@click.option(
    "--image-size", default=None, help=f"One of {', '.join(IMAGE_SIZE_PRESETS)}, or WIDTHxHEIGHT."
)
@click.option("--num-inference-steps", "--steps", type=int, default=None)
@click.option("--guidance-scale", type=float, default=None)
@click.option("--seed", type=int, default=None)
@input_options(
    "The input image of an image-to-image model: a local file (sent as a data URI) or an https URL."
)
@click.option("--model-id", default=DEFAULT_MODEL_ID, show_default=True)
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
    image: str | None,
    strength: float | None,
    loras: tuple[str, ...],
    output_format: str | None,
    model_id: str,
    url: str,
    token: str | None,
) -> None:
    """Generate on a server: queue position, then a step progress bar; Ctrl-C cancels."""
    from tqdm import tqdm

    from ovis_server.client import Client, JobFailedError

    payload: dict[str, Any] = {"prompt": prompt}
    optional = {
        "negative_prompt": negative_prompt,
        "image_size": parse_image_size(image_size) if image_size else None,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "image_url": image,  # a local file goes as a data URI (the SDK's submit)
        "strength": strength,
        "loras": [parse_lora(lora) for lora in loras] or None,
        "output_format": output_format or SUFFIX_FORMATS.get(output.suffix.lower()),
    }
    payload.update({key: value for key, value in optional.items() if value is not None})
    with Client(url, token) as client:
        submission = client.submit(payload, model_id)
        bar = None
        try:  # from here on, Ctrl-C cancels the request just made
            click.echo(f"request {submission.request_id}", err=True)
            bar = tqdm(total=1, unit="step", desc="queued", leave=True)
            show = functools.partial(show_progress, bar)
            result = client.wait(submission.request_id, on_progress=show, poll_interval=0.25)
        except KeyboardInterrupt:
            if bar is not None:
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


def show_progress(bar: tqdm[Any], status: Status) -> None:
    """A status on ``run``'s progress bar: the queue position, then the steps."""
    if status.status == "in_queue":
        bar.set_description(f"queued, position {status.queue_position}")
    elif status.progress is not None:
        bar.total = status.progress.total
        bar.set_description("denoising")
        bar.update(status.progress.step - bar.n)
    else:
        bar.set_description(status.status)


def _printing_command(name: str, method: str, doc: str) -> click.Command:
    """``ovis-server NAME REQUEST_ID``: print what ``Client.METHOD(request_id)`` answers."""

    @click.command(name, help=doc)
    @click.argument("request_id")
    @client_options
    @_client_errors
    def command(request_id: str, url: str, token: str | None) -> None:
        from ovis_server.client import Client

        with Client(url, token) as client:
            _print_json(getattr(client, method)(request_id))

    return command


status_remote = _printing_command("status", "status", "Print a request's status.")
result_remote = _printing_command("result", "result", "Print a request's result.")
cancel_remote = _printing_command("cancel", "cancel", "Cancel a request.")


@click.command("delete")
@click.argument("request_id")
@client_options
@_client_errors
def delete_remote(request_id: str, url: str, token: str | None) -> None:
    """Delete a request and its output files (a running job stops)."""
    from ovis_server.client import Client

    with Client(url, token) as client:
        client.delete(request_id)
    click.echo(f"deleted {request_id}", err=True)
