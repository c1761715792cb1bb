"""The values options and headers take, as people write them (ovis_server.units)."""

from __future__ import annotations

import pytest

from ovis_server.units import parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("3600", 3600),
        ("0", 0),
        ("90s", 90),
        ("1500ms", 1.5),
        ("30m", 1800),
        ("1h30m", 5400),
        ("1.5h", 5400),
        ("7d", 7 * 86400),
        (" 12H ", 12 * 3600),
    ],
)
def test_durations_are_read_as_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "-5s", "5 s", "5x", "1h-30m", "nan", "1e3"])
def test_what_is_no_duration_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)
