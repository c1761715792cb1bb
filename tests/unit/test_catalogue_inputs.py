"""Each catalogue model's input validation, in process: what a submit body may carry."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from ovis_server.catalogue.ovis_image import OVIS_IMAGE
from ovis_server.catalogue.registry import BUILT_IN, VARIANTS, ModelRegistry
from ovis_server.catalogue.spec import ModelInput, ModelSpec
from ovis_server.catalogue.text_to_image import (
    IMAGE_SIZE_PRESETS,
    MAX_PROMPT_CHARS,
    aspect_ratio_size,
)
from ovis_server.catalogue.z_image import Z_IMAGE_TURBO
from ovis_server.catalogue.z_image_edit import (
    STORED_IMAGE_REFERENCE,
    Z_IMAGE_EDIT,
    auto_size,
)
from ovis_server.catalogue.z_image_lora import MAX_LORAS, Z_IMAGE_LORA
from ovis_server.model_names import BUILT_IN_NAMES

ALL = (*BUILT_IN, *VARIANTS)
IMAGE = "https://example.com/photo.png"


def base(spec: ModelSpec) -> dict[str, Any]:
    """The smallest valid body for ``spec``."""
    body: dict[str, Any] = {"prompt": "a lighthouse at dusk"}
    if spec is Z_IMAGE_EDIT:
        body["image_url"] = IMAGE
    return body


def check(spec: ModelSpec, **fields: Any) -> ModelInput:
    return spec.input_model.model_validate(base(spec) | fields)


def refused(spec: ModelSpec, **fields: Any) -> str:
    """The error's field locations, joined."""
    with pytest.raises(ValidationError) as caught:
        check(spec, **fields)
    return " ".join(".".join(map(str, e["loc"])) for e in caught.value.errors())


def test_the_catalogue_is_the_four_models() -> None:
    assert [s.model_id for s in ALL] == [
        "aidc-ai/ovis-image",
        "tongyi-mai/z-image/turbo",
        "tongyi-mai/z-image/turbo/image-to-image",
        "tongyi-mai/z-image/turbo/lora",
    ]
    names = {n for s in ALL for n in (s.model_id, *s.aliases)}
    assert names == BUILT_IN_NAMES


@pytest.mark.parametrize("spec", ALL, ids=lambda s: s.model_id)
def test_the_smallest_body_is_valid(spec: ModelSpec) -> None:
    assert check(spec).model_dump()["prompt"] == "a lighthouse at dusk"


@pytest.mark.parametrize("spec", ALL, ids=lambda s: s.model_id)
def test_an_unknown_field_is_refused(spec: ModelSpec) -> None:
    assert "colour" in refused(spec, colour="red")


@pytest.mark.parametrize("spec", ALL, ids=lambda s: s.model_id)
def test_the_prompt_is_required(spec: ModelSpec) -> None:
    body = base(spec)
    del body["prompt"]
    with pytest.raises(ValidationError, match="prompt"):
        spec.input_model.model_validate(body)


@pytest.mark.parametrize("spec", ALL, ids=lambda s: s.model_id)
@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_a_blank_prompt_is_refused(spec: ModelSpec, prompt: str) -> None:
    assert "prompt" in refused(spec, prompt=prompt)


@pytest.mark.parametrize("spec", ALL, ids=lambda s: s.model_id)
def test_a_prompt_over_the_limit_is_refused(spec: ModelSpec) -> None:
    assert check(spec, prompt="a" * MAX_PROMPT_CHARS)
    assert "prompt" in refused(spec, prompt="a" * (MAX_PROMPT_CHARS + 1))


@pytest.mark.parametrize("spec", ALL, ids=lambda s: s.model_id)
@pytest.mark.parametrize("value", [1, None, ["a"], {"text": "a"}])
def test_a_prompt_that_is_not_a_string_is_refused(spec: ModelSpec, value: object) -> None:
    assert "prompt" in refused(spec, prompt=value)


@pytest.mark.parametrize("spec", ALL, ids=lambda s: s.model_id)
@pytest.mark.parametrize("steps", [0, -1, 51, "8", 2.5, True])
def test_steps_out_of_bounds_or_not_integers_are_refused(spec: ModelSpec, steps: object) -> None:
    assert "num_inference_steps" in refused(spec, num_inference_steps=steps)


def test_step_bounds_differ_by_model() -> None:
    assert check(OVIS_IMAGE, num_inference_steps=50)
    for spec in (Z_IMAGE_TURBO, Z_IMAGE_LORA, Z_IMAGE_EDIT):
        assert check(spec, num_inference_steps=8)
        assert "num_inference_steps" in refused(spec, num_inference_steps=9)


@pytest.mark.parametrize("spec", ALL, ids=lambda s: s.model_id)
@pytest.mark.parametrize("seed", [-1, 2**63, "1", 1.0])
def test_bad_seeds_are_refused(spec: ModelSpec, seed: object) -> None:
    assert "seed" in refused(spec, seed=seed)


@pytest.mark.parametrize("spec", ALL, ids=lambda s: s.model_id)
def test_a_given_seed_is_kept_and_a_missing_one_drawn_in_32_bits(spec: ModelSpec) -> None:
    assert check(spec, seed=2**63 - 1).resolved_seed() == 2**63 - 1
    assert 0 <= check(spec).resolved_seed() < 2**32


@pytest.mark.parametrize("spec", ALL, ids=lambda s: s.model_id)
@pytest.mark.parametrize("fmt", ["gif", "PNG", "", 1])
def test_unknown_output_formats_are_refused(spec: ModelSpec, fmt: object) -> None:
    assert "output_format" in refused(spec, output_format=fmt)


@pytest.mark.parametrize("spec", ALL, ids=lambda s: s.model_id)
@pytest.mark.parametrize("preset", sorted(IMAGE_SIZE_PRESETS))
def test_every_preset_is_accepted(spec: ModelSpec, preset: str) -> None:
    request = check(spec, image_size=preset).to_generation_request(1)
    assert (request.width, request.height) == IMAGE_SIZE_PRESETS[preset]


@pytest.mark.parametrize("spec", ALL, ids=lambda s: s.model_id)
@pytest.mark.parametrize(
    "size",
    [
        "huge",
        {"width": 1000, "height": 1024},  # not a multiple of 16
        {"width": 48, "height": 512},  # below 64
        {"width": 2064, "height": 512},  # above 2048
        {"width": 512},
        {"width": 512, "height": 512, "depth": 3},
        {"width": "512", "height": 512},
        [512, 512],
    ],
)
def test_bad_image_sizes_are_refused(spec: ModelSpec, size: object) -> None:
    assert "image_size" in refused(spec, image_size=size)


@pytest.mark.parametrize("spec", ALL, ids=lambda s: s.model_id)
def test_a_custom_size_reaches_the_request(spec: ModelSpec) -> None:
    request = check(spec, image_size={"width": 2048, "height": 64}).to_generation_request(7)
    assert (request.width, request.height, request.seed) == (2048, 64, 7)


def test_auto_is_a_size_only_for_image_to_image() -> None:
    assert check(Z_IMAGE_EDIT, image_size="auto")
    for spec in (OVIS_IMAGE, Z_IMAGE_TURBO, Z_IMAGE_LORA):
        assert "image_size" in refused(spec, image_size="auto")


@pytest.mark.parametrize("spec", [OVIS_IMAGE, Z_IMAGE_TURBO, Z_IMAGE_LORA])
@pytest.mark.parametrize(
    ("ratio", "size"),
    [("16:9", (1024, 576)), ("1:1", (1024, 1024)), ("9:16", (576, 1024)), ("2:1", (1456, 720))],
)
def test_aspect_ratio_sets_the_size(spec: ModelSpec, ratio: str, size: tuple[int, int]) -> None:
    request = check(spec, aspect_ratio=ratio).to_generation_request(1)
    assert (request.width, request.height) == size


@pytest.mark.parametrize("spec", [OVIS_IMAGE, Z_IMAGE_TURBO, Z_IMAGE_LORA])
@pytest.mark.parametrize("ratio", ["16x9", "0:1", "16:", "1:1000", "-1:1", "1.5:1"])
def test_malformed_or_extreme_ratios_are_refused(spec: ModelSpec, ratio: str) -> None:
    assert "aspect_ratio" in refused(spec, aspect_ratio=ratio)


@pytest.mark.parametrize("spec", [OVIS_IMAGE, Z_IMAGE_TURBO, Z_IMAGE_LORA])
def test_aspect_ratio_and_image_size_together_are_refused(spec: ModelSpec) -> None:
    with pytest.raises(ValidationError, match="both given"):
        check(spec, aspect_ratio="1:1", image_size="square")


def test_image_to_image_has_no_aspect_ratio() -> None:
    assert "aspect_ratio" in refused(Z_IMAGE_EDIT, aspect_ratio="1:1")


@pytest.mark.parametrize(("ratio", "multiple"), [("3:2", 16), ("21:9", 16), ("7:5", 16)])
def test_ratio_sizes_are_whole_patches_near_a_megapixel(ratio: str, multiple: int) -> None:
    size = aspect_ratio_size(ratio)
    assert isinstance(size, tuple)
    width, height = size
    assert width % multiple == 0
    assert height % multiple == 0
    assert 0.9 < width * height / 1024**2 < 1.1


def test_ovis_image_has_negative_prompt_and_guidance() -> None:
    request = check(OVIS_IMAGE, negative_prompt="blur", guidance_scale=20).to_generation_request(1)
    assert request.negative_prompt == "blur"
    assert request.guidance_scale == 20
    assert "guidance_scale" in refused(OVIS_IMAGE, guidance_scale=0.5)
    assert "guidance_scale" in refused(OVIS_IMAGE, guidance_scale=20.5)


@pytest.mark.parametrize("spec", [Z_IMAGE_TURBO, Z_IMAGE_LORA, Z_IMAGE_EDIT])
@pytest.mark.parametrize("field", ["negative_prompt", "guidance_scale"])
def test_z_image_takes_no_negative_prompt_or_guidance(spec: ModelSpec, field: str) -> None:
    assert field in refused(spec, **{field: "x" if field == "negative_prompt" else 2.0})


def test_image_to_image_needs_an_image_url() -> None:
    with pytest.raises(ValidationError, match="image_url"):
        Z_IMAGE_EDIT.input_model.model_validate({"prompt": "x"})
    assert "image_url" in refused(Z_IMAGE_EDIT, image_url="")


@pytest.mark.parametrize("strength", [-0.1, 1.1, "0.5"])
def test_image_to_image_strength_bounds(strength: object) -> None:
    assert "strength" in refused(Z_IMAGE_EDIT, strength=strength)


def test_strength_zero_runs_no_step_and_is_refused() -> None:
    with pytest.raises(ValidationError, match="strength 0 runs no step"):
        check(Z_IMAGE_EDIT, strength=0.0)
    assert check(Z_IMAGE_EDIT, strength=1.0)


def test_image_to_image_names_its_image_until_stored() -> None:
    edit = check(Z_IMAGE_EDIT)
    assert edit.reads_input_image()
    assert edit.image_urls() == {"image_url": IMAGE}
    stored = edit.with_input_image(2000, 1000)
    assert stored.image_urls() == {}
    assert stored.model_dump()["image_url"] == STORED_IMAGE_REFERENCE
    request = stored.to_generation_request(1)
    assert (request.width, request.height) == auto_size(2000, 1000)
    assert request.width > request.height


@pytest.mark.parametrize(("width", "height"), [(1, 1), (10_000, 10), (10, 10_000), (640, 480)])
def test_auto_size_is_within_bounds_and_whole_patches(width: int, height: int) -> None:
    across, down = auto_size(width, height)
    assert 64 <= across <= 2048
    assert 64 <= down <= 2048
    assert across % 16 == 0
    assert down % 16 == 0


def test_text_models_read_no_input_image() -> None:
    for spec in (OVIS_IMAGE, Z_IMAGE_TURBO, Z_IMAGE_LORA):
        assert not check(spec).reads_input_image()
        assert not spec.takes_images
    assert Z_IMAGE_EDIT.takes_images


def test_takes_loras_is_true_for_the_lora_variant_alone() -> None:
    assert [spec.model_id for spec in (*BUILT_IN, *VARIANTS) if spec.takes_loras] == [
        Z_IMAGE_LORA.model_id
    ]


def test_loras_reach_the_request_with_their_scales() -> None:
    body = check(Z_IMAGE_LORA, loras=[{"path": " ink ", "scale": 0.5}, {"path": "owner/name"}])
    assert body.lora_paths() == [" ink ", "owner/name"]
    assert body.to_generation_request(1).loras == (("ink", 0.5), ("owner/name", 1.0))


@pytest.mark.parametrize(
    "loras",
    [
        [{"path": f"l{i}"} for i in range(MAX_LORAS + 1)],
        [{"path": ""}],
        [{"path": "a" * 2049}],
        [{"path": "ink", "scale": -0.1}],
        [{"path": "ink", "scale": 4.5}],
        [{"path": "ink", "weight": 1}],
        [{"scale": 1.0}],
        ["ink"],
        {"path": "ink"},
    ],
)
def test_bad_loras_are_refused(loras: object) -> None:
    assert "loras" in refused(Z_IMAGE_LORA, loras=loras)


@pytest.mark.parametrize("spec", [OVIS_IMAGE, Z_IMAGE_TURBO, Z_IMAGE_EDIT])
def test_only_the_lora_variant_takes_loras(spec: ModelSpec) -> None:
    assert "loras" in refused(spec, loras=[{"path": "ink"}])


def test_variants_name_their_base_model() -> None:
    assert Z_IMAGE_EDIT.variant_of == Z_IMAGE_TURBO.model_id
    assert Z_IMAGE_LORA.variant_of == Z_IMAGE_TURBO.model_id
    assert Z_IMAGE_EDIT.family == Z_IMAGE_LORA.family == Z_IMAGE_TURBO.family


def test_registry_resolves_ids_and_aliases() -> None:
    registry = ModelRegistry(ALL)
    assert registry.resolve("ovis-image") is OVIS_IMAGE
    assert registry.resolve("z-image-turbo") is Z_IMAGE_TURBO
    assert registry.get("z-image-turbo") is None
    assert registry.resolve("OVIS-IMAGE") is None
    assert registry.names()[-2:] == ["ovis-image", "z-image-turbo"]


def test_registry_refuses_two_models_of_one_name() -> None:
    with pytest.raises(ValueError, match="two models are called"):
        ModelRegistry([OVIS_IMAGE, OVIS_IMAGE])


def test_registry_search_filters() -> None:
    registry = ModelRegistry(ALL)
    assert [s.model_id for s in registry.search(category="image-to-image")] == [
        Z_IMAGE_EDIT.model_id
    ]
    assert registry.search(category=" Text-To-Image ") == [OVIS_IMAGE, Z_IMAGE_TURBO, Z_IMAGE_LORA]
    assert registry.search(search="OVIS") == [OVIS_IMAGE]
    assert registry.search(kind="workflow") == []
    assert registry.categories() == ["image-to-image", "text-to-image"]
