"""The ``ovis-server`` command line: the server's commands (``server``), an image made
locally (``generate``), looking after its data (``admin``) and a client of a running server
(``remote``); the options of the first three are made from
:class:`ovis_server.config.Settings` (``options``)."""

from __future__ import annotations

import click

from ovis_server import __version__
from ovis_server.cli.admin import db, download, tiny_model, token
from ovis_server.cli.common import parse_image_size
from ovis_server.cli.generate import generate
from ovis_server.cli.remote import (
    cancel_remote,
    delete_remote,
    result_remote,
    run_remote,
    status_remote,
)
from ovis_server.cli.server import serve, worker

__all__ = ["main", "parse_image_size"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ovis-server")
def main() -> None:
    """A self-hosted, RunComfy-compatible Model API for Ovis-Image-7B."""


for command in (
    tiny_model,
    download,
    generate,
    serve,
    worker,
    token,
    db,
    run_remote,
    status_remote,
    result_remote,
    cancel_remote,
    delete_remote,
):
    main.add_command(command)
