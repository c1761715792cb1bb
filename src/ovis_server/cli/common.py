"""What the server and the client commands share: logging, reading an image size, and
the options of an image to make (its output, its input image and LoRAs)."""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import click

from ovis_server.catalogue.text_to_image import IMAGE_SIZE_PRESETS

SUFFIX_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def configure_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@contextlib.contextmanager
def imports_out_of_the_collectors_reach() -> Iterator[None]:
    """Run the block (imports of torch, diffusers and transformers) with the garbage
    collector off, then freeze what it made out of the collector's reach: half a million
    objects that live as long as the process, which each full collection would otherwise
    scan again while the models load."""
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def exit_without_teardown(code: int = 0) -> NoReturn:
    """End the process as a normal exit would, less the interpreter's teardown: the exit
    handlers run (logging's flushes and closes its handlers), the standard streams are
    flushed, then the process ends. Tearing down torch's, diffusers' and transformers'
    modules, half a million objects freed one by one, cost a worker 0.7 to 0.9 s of CPU
    after its work was done (benchmarks/worker_start.py: 2-core machine, tiny model). For
    commands that have finished their work and joined the threads doing it: any thread
    still running ends with the process."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # closed, or a broken pipe
            stream.flush()
    os._exit(code)


def parse_image_size(value: str) -> str | dict[str, int]:
    """A preset name, or WIDTHxHEIGHT for a custom size."""
    if value in IMAGE_SIZE_PRESETS:
        return value
    width, sep, height = value.lower().partition("x")
    if sep and width.isdigit() and height.isdigit():
        return {"width": int(width), "height": int(height)}
    return value  # let the schema say what is wrong with it


def output_options(help_text: str) -> Callable[[Any], Any]:
    """``-o/--output`` and ``--output-format``, as ``generate`` and ``run`` take them."""

    def decorate(func: Any) -> Any:
        func = click.option(
            "--output-format", type=click.Choice(["png", "jpeg", "webp"]), default=None
        )(func)
        return click.option(
            "-o",
            "--output",
            type=click.Path(dir_okay=False, path_type=Path),
            required=True,
            help=help_text,
        )(func)

    return decorate


def input_options(image_help: str) -> Callable[[Any], Any]:
    """``--image`` (``image_help`` says what it takes), ``--strength`` and ``--lora``, as
    ``generate`` and ``run`` take them."""

    def decorate(func: Any) -> Any:
        func = click.option(
            "--lora",
            "loras",
            multiple=True,
            metavar="PATH[:SCALE]",
            help="A LoRA, for a model that takes them (repeat for several): one of the "
            "server's (<data-dir>/loras/NAME.safetensors, GET /v1/loras), or a hub id or https "
            "URL where the server's --lora-downloads allows; scale 1 unless given, e.g. "
            "watercolour:0.8.",
        )(func)
        func = click.option("--strength", type=float, default=None, help="Image to image: 0 to 1.")(
            func
        )
        return click.option("--image", default=None, help=image_help)(func)

    return decorate


def parse_lora(value: str) -> dict[str, Any]:
    """``--lora PATH[:SCALE]`` as a ``loras`` item: a number after the last colon is the
    scale (a URL's own colons are not followed by one), else the whole value is the path."""
    path, colon, scale = value.rpartition(":")
    try:
        number = float(scale) if colon and path else None
    except ValueError:
        number = None
    if number is None:
        return {"path": value}
    if not math.isfinite(number):
        raise click.BadParameter(f"{value!r}: the scale is not a number", param_hint="--lora")
    return {"path": path, "scale": number}
