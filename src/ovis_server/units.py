"""The values options take, written as people write them: durations (``90s``, ``7d``), byte
sizes (``1MiB``), GPU memory (``24GiB`` or a fraction), retry schedules, devices, host
name patterns."""

from __future__ import annotations

import re
from collections.abc import Iterable

DAY = 24 * 3600

# Standard Webhooks' suggestion: at once, then 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.
DEFAULT_WEBHOOK_SCHEDULE = "0,5s,5m,30m,2h,5h,10h,10h"
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": float(DAY)}
# ASCII digits only: \d would take any script's digits (a full-width one, say).
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def parse_duration(text: str) -> float:
    """Seconds, given as a number (``3600``) or as numbers with units, Go's way, as
    Replicate's Cancel-After takes them: ``1500ms``, ``90s``, ``30m``, ``1h30m``, ``7d``."""
    cleaned = text.strip().lower()
    if _NUMBER.fullmatch(cleaned):
        return float(cleaned)
    if cleaned and _DURATION_PART.sub("", cleaned) == "":
        return sum(float(n) * _UNITS[unit] for n, unit in _DURATION_PART.findall(cleaned))
    raise ValueError(f"{text.strip()[:50]!r} is not a duration such as 3600, 90s, 30m, 1h30m or 7d")


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


ALL_DEVICES = "all"
_GPU_ENTRY = re.compile(r"(?:cuda:)?([0-9]+)")


def parse_devices(text: str) -> tuple[str, ...]:
    """``--devices``: ``("all",)``, or one entry per worker, each ``cpu`` or a GPU number
    (``cuda:2`` is ``2``); a GPU listed twice is refused (two workers would each plan with
    the whole GPU's memory)."""
    entries = tuple(item.strip().lower() for item in text.split(","))
    if entries == (ALL_DEVICES,):
        return entries
    normalized = []
    for entry in entries:
        match = _GPU_ENTRY.fullmatch(entry)
        if entry == "cpu":
            normalized.append(entry)
        elif match is not None:
            normalized.append(str(int(match.group(1))))
        else:
            raise ValueError(
                f"{text!r}: give 'all', or a comma-separated list of GPU numbers (0,2 or "
                "cuda:0,cuda:2) and 'cpu' entries (cpu,cpu for two CPU workers)"
            )
    for gpu in {entry for entry in normalized if entry != "cpu"}:
        if normalized.count(gpu) > 1:
            raise ValueError(
                f"{text!r}: GPU {gpu} is listed twice; each GPU takes one worker, which "
                "plans with that GPU's memory"
            )
    return tuple(normalized)


def parse_host_patterns(names: Iterable[object]) -> tuple[str, ...]:
    """``--allowed-hosts``: the names, stripped, empty ones left out; ValueError for a
    wildcard anywhere but alone or at the start of a name (``*.example.com``)."""
    patterns = tuple(str(name).strip() for name in names if str(name).strip())
    for pattern in patterns:
        if pattern != "*" and (
            "*" in pattern[1:] or (pattern.startswith("*") and not pattern.startswith("*."))
        ):
            raise ValueError(
                f"{pattern!r}: a wildcard stands alone or starts a name, as in *.example.com"
            )
    return patterns


def parse_batch_size(value: object) -> str:
    """``--max-batch``: ``auto``, or a whole number from 1 (as text)."""
    text = str(value).strip().lower()
    if text != "auto" and not (text.isdigit() and int(text) >= 1):
        raise ValueError(f"{value!r} is neither 'auto' nor a whole number from 1")
    return text
