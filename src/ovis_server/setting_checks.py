"""How setting values are read and checked: pydantic validators that the fields of
:class:`ovis_server.config.Settings` carry in their ``Annotated`` metadata.

Each takes what a command line, the environment or a config file gives (text, or a list
from a TOML file) and returns the field's value, or raises ValueError with the message
the user sees after the option's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import AfterValidator, BeforeValidator

from ovis_server import units
from ovis_server.model_names import extra_model_items, model_id_list

MIN_METRICS_TOKEN = 16


def _positive_duration(value: Any) -> Any:
    if isinstance(value, str):
        value = units.parse_duration(value)
    if isinstance(value, int | float) and not value > 0:
        raise ValueError("a duration must be positive")
    return int(value) if isinstance(value, float) else value


def _schedule(value: str) -> str:
    units.parse_schedule(value)
    return value


def _size(value: Any) -> Any:
    return units.parse_size(value) if isinstance(value, str) else value


def _comma_list(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


def _host_patterns(value: Any) -> Any:
    if isinstance(value, str):
        value = value.split(",")
    return units.parse_host_patterns(value) if isinstance(value, list | tuple) else value


def _devices(value: Any) -> Any:
    if isinstance(value, list | tuple):
        value = ",".join(str(item) for item in value)
    return None if value is None else ",".join(units.parse_devices(str(value)))


def _extra_models(value: Any) -> Any:
    if isinstance(value, str):
        value = value.split(",")
    return extra_model_items(value) if isinstance(value, list | tuple) else value


def _model_ids(value: Any) -> Any:
    if isinstance(value, str):
        value = (value,)
    return model_id_list(value) if isinstance(value, list | tuple) else value


def _memory_size(value: str | None) -> str | None:
    if value is None:
        return None
    units.parse_memory_size(value)
    return value.strip()


def _long_token(value: str | None) -> str | None:
    if value is not None and len(value.strip()) < MIN_METRICS_TOKEN:
        raise ValueError(
            f"use a long random string (at least {MIN_METRICS_TOKEN} characters), "
            "e.g. from 'openssl rand -hex 32'"
        )
    return None if value is None else value.strip()


def _absolute(value: Path) -> Path:
    return value.expanduser().resolve()


def _no_trailing_slash(value: str | None) -> str | None:
    return value.rstrip("/") if value else None


DURATION = BeforeValidator(_positive_duration)  # "90s", "7d" or seconds; positive
SCHEDULE = AfterValidator(_schedule)  # webhook retry delays, "10s,1m,5m"
BATCH_SIZE = BeforeValidator(units.parse_batch_size)  # "auto" or N
SIZE = BeforeValidator(_size)  # "16MiB", "2GB" or bytes
COMMA_LIST = BeforeValidator(_comma_list)  # "a, b" as ("a", "b")
HOST_PATTERNS = BeforeValidator(_host_patterns)
DEVICES = BeforeValidator(_devices)  # "all", "0,2", "cpu,cpu"
EXTRA_MODELS = BeforeValidator(_extra_models)  # "ID=WEIGHTS,ID=WEIGHTS"
MODEL_IDS = BeforeValidator(_model_ids)
MEMORY_SIZE = AfterValidator(_memory_size)  # "24GiB"
LONG_TOKEN = AfterValidator(_long_token)
ABSOLUTE = AfterValidator(_absolute)
NO_TRAILING_SLASH = AfterValidator(_no_trailing_slash)
