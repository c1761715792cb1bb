"""units.py's parsers at their edges (tests/unit/test_units.py has parse_duration's main cases;
the others were only exercised through servers and the CLI)."""

from __future__ import annotations

import pytest

from ovis_server.units import (
    parse_batch_size,
    parse_devices,
    parse_duration,
    parse_host_patterns,
    parse_memory_size,
    parse_schedule,
    parse_size,
)

GIB = 1024**3


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1d1h1m1s", 90061), ("0.5s", 0.5), ("1m30s", 90), ("2h2h", 14400), ("007", 7)],
)
def test_more_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["1w", "inf", "1h 30m", "ms", ".5s", "1y", "\uff11s", "\u0661\u0662"]
)
def test_more_non_durations(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_a_long_non_duration_is_quoted_short() -> None:
    with pytest.raises(ValueError, match="not a duration") as caught:
        parse_duration("x" * 10_000)
    assert len(str(caught.value)) < 200


def test_schedules_start_at_zero() -> None:
    assert parse_schedule("0,5s,5m,2h") == (0, 5, 300, 7200)
    assert parse_schedule("0") == (0,)
    with pytest.raises(ValueError, match="start the schedule with 0"):
        parse_schedule("5s,5m")
    with pytest.raises(ValueError, match="not a duration"):
        parse_schedule("0,,5s")


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("24GiB", 24 * GIB),
        ("24g", 24 * GIB),
        ("24", 24 * GIB),
        ("24GB", 24 * 10**9),
        ("12000MiB", 12000 * 1024**2),
        ("0.5", 0.5),
        ("1", 1),
        (" 16 GiB ", 16 * GIB),
    ],
)
def test_memory_sizes(text: str, size: float) -> None:
    assert parse_memory_size(text) == pytest.approx(size)


@pytest.mark.parametrize("text", ["0", "-1", "24KiB", "GiB", "nan", "1TiB", "", "abc"])
def test_non_memory_sizes(text: str) -> None:
    with pytest.raises(ValueError, match="not a memory size"):
        parse_memory_size(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1048576", 1048576),
        ("512KiB", 524288),
        ("2MB", 2_000_000),
        ("1.5k", 1536),
        ("1 MiB", 1048576),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["-1", "1TB", "MiB", "1e6", ""])
def test_non_sizes(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "devices"),
    [
        ("all", ("all",)),
        (" ALL ", ("all",)),
        ("0,2", ("0", "2")),
        ("cuda:0, cuda:02", ("0", "2")),
        ("cpu,cpu", ("cpu", "cpu")),
        ("cpu,1", ("cpu", "1")),
    ],
)
def test_devices(text: str, devices: tuple[str, ...]) -> None:
    assert parse_devices(text) == devices


@pytest.mark.parametrize("text", ["all,0", "gpu0", "cuda:", "0,,1", "-1", "mps"])
def test_non_devices(text: str) -> None:
    with pytest.raises(ValueError, match="give 'all'"):
        parse_devices(text)


@pytest.mark.parametrize("text", ["0,0", "cuda:1,1", "0,cuda:00"])
def test_a_gpu_listed_twice_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="listed twice"):
        parse_devices(text)


def test_host_patterns() -> None:
    assert parse_host_patterns([" a.example ", "", "*.example.com", 7]) == (
        "a.example",
        "*.example.com",
        "7",
    )
    # A wildcard alone is any host, as Starlette's own check reads it.
    assert parse_host_patterns(["*"]) == ("*",)


@pytest.mark.parametrize("pattern", ["a.*.com", "*example.com", "example.*", "**"])
def test_misplaced_wildcards_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError, match="wildcard"):
        parse_host_patterns([pattern])


@pytest.mark.parametrize(
    ("value", "text"), [("auto", "auto"), (" AUTO ", "auto"), (4, "4"), ("1", "1")]
)
def test_batch_sizes(value: object, text: str) -> None:
    assert parse_batch_size(value) == text


@pytest.mark.parametrize("value", [0, "0", -1, "1.5", "", "max", None])
def test_non_batch_sizes(value: object) -> None:
    with pytest.raises(ValueError, match="neither 'auto'"):
        parse_batch_size(value)
