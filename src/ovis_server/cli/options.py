"""The click options of ``serve``, ``worker``, ``generate`` and the admin commands, made from
the fields of :class:`~ovis_server.config.Settings`: their names, env vars, defaults and help
come from there, and so does their checking (the model's validators)."""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import annotated_types
import click
from click.core import ParameterSource
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from ovis_server.config import SETTINGS_JSON_ENV, Settings
from ovis_server.settings_sources import Cli, SettingsFileError, cli_of, env_name, option_name

F = TypeVar("F", bound=Callable[..., Any])


def command_fields(command: str) -> list[tuple[str, FieldInfo, Cli]]:
    """The Settings fields that ``command`` takes, in their order."""
    fields = []
    for name, field in Settings.model_fields.items():
        cli = cli_of(field)
        if cli is not None and command in cli.commands:
            fields.append((name, field, cli))
    return fields


def _bare(annotation: Any) -> Any:
    """``X | None`` -> ``X``."""
    if get_origin(annotation) in (Union, types.UnionType):
        (annotation,) = [arg for arg in get_args(annotation) if arg is not type(None)]
    return annotation


def _lower_bound(field: FieldInfo) -> float | None:
    bounds = [item.ge for item in field.metadata if isinstance(item, annotated_types.Ge)]
    return float(bounds[0]) if bounds else None  # type: ignore[arg-type]


def _click_type(field: FieldInfo, cli: Cli) -> Any:
    """The type that shows in ``--help``; values are checked by the model. A field with a
    metavar (a duration, ``auto|N``) takes text that the model parses."""
    annotation = _bare(field.annotation)
    if cli.metavar is not None:
        return click.STRING
    if get_origin(annotation) is Literal:
        return click.Choice(get_args(annotation))
    low = _lower_bound(field)
    if annotation is int:
        return click.INT if low is None else click.IntRange(min=int(low))
    if annotation is float:
        return click.FLOAT if low is None else click.FloatRange(min=low)
    if annotation is Path:
        return click.Path(path_type=Path)
    return click.STRING


def _default(field: FieldInfo, cli: Cli) -> tuple[Any, str | bool]:
    """What ``--help`` shows as the default (click's default and show_default). The
    command passes on only the options given on its command line, never these."""
    if cli.show_default is False or field.default_factory is not None:
        return None, cli.show_default or False
    if isinstance(cli.show_default, str):
        return cli.show_default, True
    return field.default, field.default is not None


def settings_option(name: str, field: FieldInfo, cli: Cli) -> Callable[[F], F]:
    """One field's option. Only a value given on the command line is used: the model reads
    the environment and the config file itself, and has the defaults."""
    flag = f"--{option_name(name, cli)}"
    common: dict[str, Any] = {
        "envvar": env_name(name, cli),
        "show_envvar": True,
        "help": field.description,
    }
    if field.annotation is bool:
        return click.option(flag, name, is_flag=True, default=False, **common)
    if cli.multiple:
        show = cli.show_default if isinstance(cli.show_default, str) else False
        return click.option(
            flag, name, multiple=True, metavar=cli.metavar, show_default=show, **common
        )
    default, show_default = _default(field, cli)
    return click.option(
        flag,
        name,
        type=_click_type(field, cli),
        default=default,
        metavar=cli.metavar,
        show_default=show_default,
        **common,
    )


def load_settings(given: dict[str, Any]) -> Settings:
    """Settings from the options given on the command line, then ``OVIS_SERVER_*``, then the
    config file; what is wrong with a value is said as click says it."""
    try:
        return Settings(**given)
    except SettingsFileError as exc:
        raise click.BadParameter(str(exc), param_hint="'--config'") from None
    except ValidationError as exc:
        raise click.UsageError("; ".join(_problem(error) for error in exc.errors())) from None


def _problem(error: Any) -> str:
    name = str(error["loc"][0]) if error["loc"] else ""
    field = Settings.model_fields.get(name)
    cli = cli_of(field) if field is not None else None
    message = str(error["msg"]).removeprefix("Value error, ")
    if cli is None:
        return message
    return f"invalid value for '--{option_name(name, cli)}' ({env_name(name, cli)}): {message}"


def settings_options(command: str, from_json: bool = False) -> Callable[[F], F]:
    """The options of every Settings field ``command`` takes; the command gets one
    ``settings`` argument in their place. ``from_json``: a hidden ``--settings-json``
    (env ``OVIS_SERVER_SETTINGS_JSON``), a whole serialized Settings that replaces them all,
    which is how ``serve`` hands its settings to the worker it starts."""
    fields = command_fields(command)

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(**kwargs: Any) -> Any:
            ctx = click.get_current_context()
            given = {}
            for name, _field, _cli in fields:
                value = kwargs.pop(name)
                if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE:
                    given[name] = value
            serialized = kwargs.pop("settings_json", None)
            if serialized:
                try:
                    kwargs["settings"] = Settings.model_validate_json(serialized)
                except ValidationError as exc:
                    raise click.UsageError(f"--settings-json: {exc}") from None
            else:
                kwargs["settings"] = load_settings(given)
            return func(**kwargs)

        decorated: Any = wrapper
        if from_json:
            decorated = click.option(
                "--settings-json", envvar=SETTINGS_JSON_ENV, default=None, hidden=True
            )(decorated)
        for name, field, cli in reversed(fields):
            decorated = settings_option(name, field, cli)(decorated)
        return decorated  # type: ignore[no-any-return]

    return decorate
