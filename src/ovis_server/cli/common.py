"""What the server and the client commands share: logging and reading an image size."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ovis_server.catalogue.text_to_image import IMAGE_SIZE_PRESETS

SUFFIX_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def configure_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


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
