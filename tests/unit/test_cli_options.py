"""Command-line values the client commands parse before anything is sent."""

from __future__ import annotations

import click
import pytest

from ovis_server.cli.common import parse_lora


@pytest.mark.parametrize(
    ("value", "item"),
    [
        ("watercolour", {"path": "watercolour"}),
        ("watercolour:0.8", {"path": "watercolour", "scale": 0.8}),
        ("acme/style-lora:2", {"path": "acme/style-lora", "scale": 2.0}),
        ("https://example.com/a.safetensors", {"path": "https://example.com/a.safetensors"}),
        ("https://example.com:8443/a.safetensors:0.5",
         {"path": "https://example.com:8443/a.safetensors", "scale": 0.5}),
        (":0.5", {"path": ":0.5"}),  # no path before the colon: the server judges it
        ("watercolour:strong", {"path": "watercolour:strong"}),
    ],
)  # fmt: skip
def test_a_lora_option_takes_a_scale_after_its_last_colon(
    value: str, item: dict[str, object]
) -> None:
    assert parse_lora(value) == item


@pytest.mark.parametrize("value", ["watercolour:nan", "watercolour:inf", "watercolour:-inf"])
def test_a_scale_that_is_not_a_finite_number_is_refused(value: str) -> None:
    with pytest.raises(click.BadParameter, match="the scale is not a number"):
        parse_lora(value)
