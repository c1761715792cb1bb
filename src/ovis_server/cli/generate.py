"""``generate``: one image made locally, with the server's model, input and LoRA rules."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import click
from pydantic import ValidationError

from ovis_server.catalogue.registry import ModelRegistry
from ovis_server.catalogue.spec import ModelInput, ModelSpec, field_problems
from ovis_server.catalogue.text_to_image import IMAGE_SIZE_PRESETS, SIZE_MULTIPLE
from ovis_server.cli.common import (
    SUFFIX_FORMATS,
    configure_logging,
    exit_without_teardown,
    imports_out_of_the_collectors_reach,
    input_options,
    output_options,
    parse_image_size,
    parse_lora,
)
from ovis_server.cli.options import settings_options
from ovis_server.cli.server import model_registry, served_model
from ovis_server.config import Settings

if TYPE_CHECKING:
    from ovis_server.engine.request import GenerationRequest

# What generate's --image is when it is not a local file (the input-image rules judge it).
REMOTE_IMAGES = ("https://", "http://", "data:")


def model_taking(models: ModelRegistry, model: ModelSpec, image: bool, loras: bool) -> ModelSpec:
    """``model``, or the variant of it that takes an input image or LoRAs where ``generate``
    is given them (as the API's ``.../image-to-image`` and ``.../lora`` ids do); a usage
    error where none does."""
    if not image and not loras:
        return model
    for spec in (model, *(spec for spec in models if spec.variant_of == model.model_id)):
        if (not image or spec.takes_images) and (not loras or spec.takes_loras):
            return spec
    wanted = " and ".join(
        what for what, given in (("input image", image), ("LoRAs", loras)) if given
    )
    together = " together" if image and loras else ""
    raise click.UsageError(f"--model-id {model.model_id} takes no {wanted}{together}")


def local_inputs(validated: ModelInput, seed: int, settings: Settings) -> GenerationRequest:
    """What ``generate`` asks the engine for: ``validated`` with ``seed``, its input image (a
    local file, or fetched) and its LoRAs as local files, each judged as the server judges
    a request's; a usage error naming the option otherwise."""
    import asyncio
    import dataclasses

    from ovis_server.inputs.images import (
        ImageInputError,
        check_image,
        image_policy_from_settings,
        load_input_image,
    )
    from ovis_server.worker.failures import InvalidJobError
    from ovis_server.worker.loras import LoraFiles

    if validated.reads_input_image():
        source = next(iter(validated.image_urls().values()), None)
        if source is None:  # the stored image's reference: none of the user's
            raise click.BadParameter("not a file or an https or data: URL", param_hint="--image")
        policy = image_policy_from_settings(settings)
        try:
            if source[:8].lower().startswith(REMOTE_IMAGES):
                image = asyncio.run(load_input_image(source, policy))
            else:
                image = check_image(
                    read_local_image(source, policy.fetch.max_bytes), policy.max_pixels
                )
        except ImageInputError as exc:
            data_uri = source[:5].lower() == "data:"
            shown = source[:60] + "..." if data_uri and len(source) > 80 else source
            raise click.BadParameter(f"{shown}: {exc}", param_hint="--image") from None
        stored = validated.with_input_image(image.width, image.height)  # auto: its shape
        generation = dataclasses.replace(stored.to_generation_request(seed), init_image=image.png)
    else:
        generation = validated.to_generation_request(seed)
    if generation.loras:
        try:
            generation = LoraFiles.from_settings(settings).localise(generation)
        except InvalidJobError as exc:
            raise click.BadParameter(str(exc), param_hint="--lora") from None
    return generation


def read_local_image(name: str, max_bytes: int) -> bytes:
    """The bytes of the local file ``name`` (at most ``max_bytes``); ImageInputError saying
    why there are none."""
    from ovis_server.inputs.images import ImageInputError

    try:
        path = Path(name).expanduser()
        if not path.is_file():
            raise ImageInputError("no such file")
        with path.open("rb") as file:
            data = file.read(max_bytes + 1)
    except (OSError, RuntimeError) as exc:  # a name too long, ~nobody/, unreadable
        raise ImageInputError(f"cannot be read ({exc.__class__.__name__})") from None
    if len(data) > max_bytes:
        raise ImageInputError(f"is larger than {max_bytes} bytes")
    return data


@click.command()
@click.argument("prompt")
@output_options("Where to write the image; its suffix picks the format unless --output-format.")
@click.option(
    "--negative-prompt", default=None, help="What the image should not show (Ovis-Image)."
)
@click.option(
    "--image-size",
    default=None,
    help=f"One of {', '.join(IMAGE_SIZE_PRESETS)}, or WIDTHxHEIGHT (multiples of {SIZE_MULTIPLE}). "
    "Default: the model's (landscape_4_3; auto, the input image's shape, for image to image).",
)
@click.option(
    "--num-inference-steps", "--steps", type=int, default=None,
    help="Default: the model's (28 for Ovis-Image, 8 for Z-Image-Turbo).",
)  # fmt: skip
@click.option(
    "--guidance-scale", type=float, default=None, help="Default: the model's (Ovis-Image: 5)."
)
@click.option("--seed", type=int, default=None, help="Omit for a random seed (printed).")
@input_options(
    "The input image (image to image): a local file, an https URL or a data: URI; the "
    "model's image-to-image variant runs."
)
@settings_options("generate")
def generate(
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
    settings: Settings,
) -> None:
    """Generate one image locally, with a progress bar, and write it to OUTPUT. An input
    image and LoRAs are judged by the server's rules (--max-input-image-size,
    --lora-downloads and the rest of them)."""
    chosen_format = output_format or SUFFIX_FORMATS.get(output.suffix.lower())
    if chosen_format is None:
        raise click.UsageError(
            f"cannot tell the image format from {output.name!r}: use a .png, .jpg or .webp "
            "name, or --output-format"
        )
    if strength is not None and image is None:
        raise click.UsageError("--strength goes with --image (image to image)")
    models = model_registry(settings)
    model = model_taking(models, served_model(models, settings), bool(image), bool(loras))
    try:
        # Options left out take the model's defaults; one the model lacks is refused by it.
        given = {
            "negative_prompt": negative_prompt,
            "image_size": parse_image_size(image_size) if image_size else None,
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "image_url": image,
            "strength": strength,
            "loras": [parse_lora(lora) for lora in loras] or None,
        }
        request = model.input_model.model_validate(
            {
                "prompt": prompt,
                "seed": seed,
                "output_format": chosen_format,
                **{name: value for name, value in given.items() if value is not None},
            }
        )
    except ValidationError as exc:
        raise click.UsageError("; ".join(field_problems(exc.errors()))) from None
    used_seed = request.resolved_seed()
    # What the worker is given besides the fields (before the weights load: a bad input
    # image or LoRA is said at once).
    generation = local_inputs(request, used_seed, settings)

    configure_logging("warning")
    # A first run downloads the weights: show its progress lines.
    logging.getLogger("ovis_server.engine.download").setLevel(logging.INFO)
    # A variant runs on its model's weights: --model's entry for the model (as in serve).
    base = models.get(model.base_model_id) or model
    with imports_out_of_the_collectors_reach():  # as the worker imports them
        from tqdm import tqdm

        from ovis_server.engine.families import import_pipeline_classes
        from ovis_server.engine.images import encode_image
        from ovis_server.engine.loading import EngineLoadError
        from ovis_server.engine.weights import WeightsNotFoundError

        import_pipeline_classes([base.family])
    try:
        engine = model.load_engine(settings.for_model(base.names))
    except (EngineLoadError, WeightsNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        # Perhaps mid-download: its threads would hold the exit until their files are done.
        click.echo("interrupted", err=True)
        os._exit(130)
    click.echo(engine.memory.describe(), err=True)

    with tqdm(total=generation.num_inference_steps, unit="step", desc="denoising") as bar:

        def on_step(step: int, total: int) -> bool:
            bar.total = total  # image to image runs only strength's share of the steps
            bar.update(step - bar.n)
            return True

        made = engine.generate(generation, on_step=on_step)
    output.parent.mkdir(parents=True, exist_ok=True)
    # As the worker reads it from a job's input.
    output.write_bytes(encode_image(made, request.model_dump().get("output_format", "png")))
    click.echo(
        f"seed {used_seed}: wrote {made.width}x{made.height} {chosen_format} to {output}",
        err=True,
    )
    exit_without_teardown(0)  # the image is written: skip the model's teardown
