"""Command-line values the client commands parse before anything is sent."""

from __future__ import annotations

import click
import pytest

from ovis_server.catalogue.registry import BUILT_IN, VARIANTS, ModelRegistry
from ovis_server.catalogue.spec import ModelSpec
from ovis_server.cli.common import parse_lora
from ovis_server.cli.generate import model_taking


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


REGISTRY = ModelRegistry((*BUILT_IN, *VARIANTS))


def spec_of(model_id: str) -> ModelSpec:
    spec = REGISTRY.get(model_id)
    assert spec is not None, model_id
    return spec


@pytest.mark.parametrize(
    ("model", "image", "loras", "chosen"),
    [
        ("aidc-ai/ovis-image", False, False, "aidc-ai/ovis-image"),
        ("tongyi-mai/z-image/turbo", True, False, "tongyi-mai/z-image/turbo/image-to-image"),
        ("tongyi-mai/z-image/turbo", False, True, "tongyi-mai/z-image/turbo/lora"),
    ],
)
def test_generate_runs_the_variant_that_takes_its_inputs(
    model: str, image: bool, loras: bool, chosen: str
) -> None:
    assert model_taking(REGISTRY, spec_of(model), image, loras).model_id == chosen


@pytest.mark.parametrize(
    ("model", "image", "loras", "message"),
    [
        ("aidc-ai/ovis-image", False, True, "--model-id aidc-ai/ovis-image takes no LoRAs"),
        (
            "tongyi-mai/z-image/turbo",
            True,
            True,
            "--model-id tongyi-mai/z-image/turbo takes no input image and LoRAs together",
        ),
    ],
)
def test_generate_refuses_inputs_no_variant_takes(
    model: str, image: bool, loras: bool, message: str
) -> None:
    with pytest.raises(click.UsageError) as caught:
        model_taking(REGISTRY, spec_of(model), image, loras)
    assert caught.value.message == message
