"""The ``ovis-server`` command line."""

from __future__ import annotations

import logging
import secrets
import sys
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from ovis_server import __version__
from ovis_server.catalogue import IMAGE_SIZE_PRESETS, OVIS_IMAGE, OvisImageInput
from ovis_server.config import ENV_PREFIX, default_data_dir
from ovis_server.engine.images import encode_image

RANDOM_SEED_BOUND = 2**32


def _env(name: str) -> str:
    return ENV_PREFIX + name


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


def model_options(func: Any) -> Any:
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
        help="A hub id, a local diffusers directory, or 'tiny' (random weights, for trying it).",
    )(func)


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


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem, each naming the field."""
    lines = []
    for error in exc.errors(include_url=False):
        field = ".".join(str(part) for part in error["loc"]) or "body"
        lines.append(f"{field}: {error['msg']}")
    return "; ".join(lines)


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
        raise click.UsageError(format_validation_error(exc)) from None

    configure_logging("warning")
    try:
        engine = Engine.load(resolve_weights(model, data_dir), device=device, dtype=dtype)
    except (EngineLoadError, WeightsNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None

    used_seed = request.seed if request.seed is not None else secrets.randbelow(RANDOM_SEED_BOUND)
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
