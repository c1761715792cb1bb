"""Durations and sizes as settings write them: ``90s``, ``12h``, ``1MiB``, ``24GiB``."""

from __future__ import annotations

import re

DAY = 24 * 3600
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": DAY}


def parse_duration(text: str) -> float:
    """Seconds, or a number with a unit: ``90s``, ``30m``, ``12h``, ``7d``."""
    text = text.strip().lower()
    factor = _UNITS.get(text[-1:])
    try:
        seconds = float(text[:-1] if factor else text) * (factor or 1)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration such as 3600, 90s, 30m, 12h or 7d") from None
    if not seconds >= 0:
        raise ValueError(f"{text!r}: a duration cannot be negative")
    return seconds


def parse_schedule(text: str) -> tuple[float, ...]:
    """``--webhook-retry-schedule``: each attempt's delay after the one before, as
    durations (``0,5s,5m,2h``); the first attempt is sent at once, so the first is 0."""
    delays = tuple(parse_duration(item) for item in text.split(","))
    if delays[0] != 0:
        raise ValueError("the first attempt is sent at once: start the schedule with 0")
    return delays


_BYTE_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
}  # fmt: skip
# ``--gpu-memory`` units: a bare number is GiB (or, at most 1, a fraction of the GPU).
_MEMORY_UNITS = {"": _BYTE_UNITS["gib"]} | {
    unit: _BYTE_UNITS[unit] for unit in ("g", "gib", "gb", "m", "mib", "mb")
}


def parse_memory_size(text: str) -> float:
    """``--gpu-memory``: a size (``24GiB``, ``24G`` or ``24`` are GiB; ``24GB`` is 10^9
    bytes; ``MiB``, ``MB``) in bytes, or a fraction of the GPU's memory (``0.5``)."""
    cleaned = text.strip().lower().replace(" ", "")
    number = cleaned.rstrip("gimb")
    unit = cleaned[len(number) :]
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    if unit not in _MEMORY_UNITS or not value > 0:
        raise ValueError(
            f"{text!r} is not a memory size such as 24GiB, 16GB, 12000MiB or a fraction "
            "of the GPU's memory such as 0.5"
        )
    if not unit and value <= 1:
        return value
    return value * _MEMORY_UNITS[unit]


_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)")


def parse_size(text: str) -> int:
    """Bytes, or a number with a unit: ``1MiB``, ``512KiB``, ``2MB``, ``1048576``."""
    match = _SIZE.fullmatch(text.strip().lower())
    if match is None or match.group(2) not in _BYTE_UNITS:
        raise ValueError(f"{text!r} is not a size such as 1048576, 512KiB or 1MiB")
    return int(float(match.group(1)) * _BYTE_UNITS[match.group(2)])
