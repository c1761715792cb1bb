"""How a setting shows outside the program: its :class:`Cli` metadata names the option
(``--url-ttl``), and with it the environment variable (``OVIS_SERVER_URL_TTL``) and the config
file key (``url_ttl``); the sources here read the environment and the TOML file for
:class:`~ovis_server.config.Settings`."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

ENV_PREFIX = "OVIS_SERVER_"


# Which commands take a setting: "admin" is the token and db commands.
SERVE = frozenset({"serve"})
WORKER = frozenset({"serve", "worker"})
MODEL = frozenset({"serve", "worker", "generate"})
# Input images are judged where they are read: the API (serve) and generate.
INPUT_IMAGES = frozenset({"serve", "generate"})
STORE = frozenset({"serve", "worker", "admin"})
DATA = frozenset({"serve", "worker", "generate", "admin", "download"})
# ``ovis-server download`` takes --model (and the data directory, for ``tiny``).
DOWNLOAD = frozenset({"download"})


@dataclass(frozen=True)
class Cli:
    """How a Settings field shows on the command line."""

    commands: frozenset[str]
    name: str | None = None  # the option without its dashes; default: the field's name
    show_default: str | bool | None = None  # None: the default itself, when there is one
    metavar: str | None = None
    multiple: bool = False  # the option repeats (--model-id A --model-id B): a tuple


def cli_of(field: FieldInfo) -> Cli | None:
    return next((item for item in field.metadata if isinstance(item, Cli)), None)


def option_name(field_name: str, cli: Cli) -> str:
    """``url-ttl``: the option without dashes, for ``--url-ttl``."""
    return cli.name or field_name.replace("_", "-")


def env_name(field_name: str, cli: Cli) -> str:
    return ENV_PREFIX + option_name(field_name, cli).upper().replace("-", "_")


class SettingsFileError(ValueError):
    """A config file that cannot be read, or that names a setting there is none of."""


def _option_fields(settings_cls: type[BaseSettings]) -> dict[str, str]:
    """Config file key / option name (with underscores) -> field name."""
    names = {}
    for field_name, field in settings_cls.model_fields.items():
        cli = cli_of(field)
        if cli is not None and field_name != "config_file":
            names[option_name(field_name, cli).replace("-", "_")] = field_name
    return names


class MappingSource(PydanticBaseSettingsSource):
    """A source whose values are already known, keyed by field name."""

    def __init__(self, settings_cls: type[BaseSettings], values: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self.values = values

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.values)


def environment_values(settings_cls: type[BaseSettings]) -> dict[str, Any]:
    """The settings given as ``OVIS_SERVER_*`` variables (empty ones count as unset)."""
    values = {}
    for field_name, field in settings_cls.model_fields.items():
        cli = cli_of(field)
        if cli is not None and os.environ.get(env_name(field_name, cli)):
            values[field_name] = os.environ[env_name(field_name, cli)]
    return values


def file_values(settings_cls: type[BaseSettings], path: Path | str | None) -> dict[str, Any]:
    """The settings in a TOML config file: keys are the options' names (``url_ttl = 3600``,
    ``no_auth = true``); dashes and underscores both do."""
    if path is None:
        return {}
    try:
        with Path(path).expanduser().open("rb") as file:
            data = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsFileError(f"cannot read config file {path}: {exc}") from None
    fields = _option_fields(settings_cls)
    values = {}
    for key, value in data.items():
        field_name = fields.get(key.replace("-", "_"))
        if field_name is None:
            raise SettingsFileError(f"config file {path}: there is no setting {key!r}")
        values[field_name] = value
    return values


def ranked_sources(
    settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource
) -> tuple[PydanticBaseSettingsSource, ...]:
    """Settings' sources, first the strongest: arguments > ``OVIS_SERVER_*`` > the
    ``--config`` file (named by an argument or the environment) > defaults."""
    environment = environment_values(settings_cls)
    given = getattr(init_settings, "init_kwargs", {})
    config = given.get("config_file") or environment.get("config_file")
    return (
        init_settings,
        MappingSource(settings_cls, environment),
        MappingSource(settings_cls, file_values(settings_cls, config)),
    )
