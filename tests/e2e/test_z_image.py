"""Z-Image-Turbo, the second model family: its catalogue entry and schema, its tiny build
(the real classes, loaded through from_pretrained), the engine's images against the stock
ZImagePipeline's for the same seed (single, batched, cancelled), and a whole ``serve
--model tiny --model-id tongyi-mai/z-image/turbo`` answering the RunComfy and OpenAI routes."""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from ovis_server.catalogue import (
    IMAGE_SIZE_PRESETS,
    OVIS_IMAGE,
    Z_IMAGE_TURBO,
    ModelRegistry,
    ZImageInput,
)
from ovis_server.config import Settings
from ovis_server.engine.families import Z_IMAGE, family_of_directory, get_family
from ovis_server.engine.memory import model_sizes
from ovis_server.engine.pipeline import Engine, GenerationCancelled
from ovis_server.engine.request import GenerationRequest
from ovis_server.engine.weights import resolve_weights, tiny_checkpoint_dir

from .bodies import Z_IMAGE_ID
from .fake_hub import FakeHub
from .helpers import (
    TOLERANCE,
    Server,
    http_get,
    max_diff,
    run_cli,
    start_server,
    wait_for,
    wait_result,
)

ALIAS = "z-image-turbo"


def request(**overrides: Any) -> GenerationRequest:
    fields: dict[str, Any] = {
        "prompt": "a hand-painted sign that reads Z-IMAGE",
        "negative_prompt": "",
        "width": 256,
        "height": 256,
        "num_inference_steps": 8,
        "guidance_scale": 0.0,
        "seed": 2024,
    }
    fields.update(overrides)
    return GenerationRequest(**fields)


# --- the catalogue entry --------------------------------------------------------------------


def test_the_catalogue_has_z_image_turbo_by_id_and_alias(tmp_path: Path) -> None:
    # Served when --model-id names it, by id or alias; not by default.
    assert ModelRegistry.from_settings(Settings(data_dir=tmp_path)).ids() == [OVIS_IMAGE.model_id]
    both = Settings(data_dir=tmp_path, model_ids=(OVIS_IMAGE.model_id, ALIAS))
    models = ModelRegistry.from_settings(both)
    assert models.ids() == [
        OVIS_IMAGE.model_id, Z_IMAGE_ID, f"{Z_IMAGE_ID}/image-to-image", f"{Z_IMAGE_ID}/lora",
    ]  # fmt: skip
    spec = models.get(Z_IMAGE_ID)
    assert spec is not None
    assert models.resolve(ALIAS) is spec
    assert spec.default_weights == "Tongyi-MAI/Z-Image-Turbo"
    assert spec.family == Z_IMAGE
    assert spec.categories == ("text-to-image",)


def test_its_schema_has_runcomfys_fields_and_defaults() -> None:
    schema = Z_IMAGE_TURBO.input_schema()
    props = schema["properties"]
    assert list(props) == ["prompt", "image_size", "num_inference_steps", "seed", "output_format"]
    assert schema["required"] == ["prompt"]
    assert schema["additionalProperties"] is False
    steps = props["num_inference_steps"]
    assert (steps["minimum"], steps["maximum"], steps["default"]) == (1, 8, 8)
    assert props["image_size"]["default"] == "landscape_4_3"
    presets = props["image_size"]["anyOf"][0]["enum"]
    assert presets == list(IMAGE_SIZE_PRESETS)
    assert props["output_format"]["enum"] == ["jpeg", "png", "webp"]
    assert props["output_format"]["default"] == "png"
    # The same dialect as Ovis-Image's: each shared field's schema is the same.
    ovis = OVIS_IMAGE.input_schema()
    for name in ("image_size", "seed", "output_format"):
        assert props[name] == ovis["properties"][name]
    assert schema["$defs"] == ovis["$defs"]


def test_defaults_make_an_eight_step_request_without_guidance() -> None:
    generation = ZImageInput.model_validate({"prompt": "x", "seed": 3}).to_generation_request(3)
    assert (generation.width, generation.height) == (1024, 768)
    assert generation.num_inference_steps == 8
    assert generation.guidance_scale == 0.0
    custom = ZImageInput.model_validate(
        {"prompt": "x", "image_size": {"width": 512, "height": 320}, "num_inference_steps": 1}
    )
    assert custom.dimensions() == (512, 320)
    assert ZImageInput.model_validate({"prompt": "x", "aspect_ratio": "16:9"}).dimensions() == (
        1024,
        576,
    )


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"num_inference_steps": 9}, "num_inference_steps"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": 1.0}, "guidance_scale"),
        ({"negative_prompt": "blurry"}, "negative_prompt"),
        ({"image_size": "huge"}, "image_size"),
    ],
)
def test_fields_it_does_not_take_are_refused_naming_them(extra: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ZImageInput.model_validate({"prompt": "x", **extra})
    assert [error["loc"][0] for error in caught.value.errors()] == [field]


# --- the tiny build and the engine ------------------------------------------------------------


def test_tiny_checkpoint_has_the_real_classes(z_tiny_weights: Path) -> None:
    index = json.loads((z_tiny_weights / "model_index.json").read_text())
    assert index["_class_name"] == "ZImagePipeline"
    assert index["text_encoder"] == ["transformers", "Qwen3Model"]
    assert index["transformer"] == ["diffusers", "ZImageTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    transformer = json.loads((z_tiny_weights / "transformer" / "config.json").read_text())
    assert (transformer["dim"], transformer["n_layers"], transformer["n_refiner_layers"]) == (
        32,
        1,
        1,
    )
    text = json.loads((z_tiny_weights / "text_encoder" / "config.json").read_text())
    assert transformer["cap_feat_dim"] == text["hidden_size"] == 32
    assert transformer["dim"] // transformer["n_heads"] == sum(transformer["axes_dims"])
    assert transformer["axes_lens"] == [1024, 512, 512]
    scheduler = json.loads((z_tiny_weights / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["shift"] == 3.0
    assert scheduler["use_dynamic_shifting"] is False
    assert family_of_directory(z_tiny_weights) == Z_IMAGE


def test_the_engine_loads_it_as_a_z_image_pipeline(z_engine: Engine) -> None:
    assert type(z_engine.pipeline).__name__ == "ZImagePipeline"
    assert z_engine.family.name == Z_IMAGE
    assert z_engine.memory.profile == "full"


def test_engine_matches_stock_single(z_engine: Engine) -> None:
    wanted = request()
    image = z_engine.generate(wanted)
    assert image.size == (256, 256)
    assert max_diff(image, z_engine.generate_stock(wanted)) <= TOLERANCE
    # Not a constant image: the comparison means something.
    assert np.asarray(image).std() > 1


def test_engine_matches_stock_at_1024x576(z_engine: Engine) -> None:
    # The size where axes_lens smaller than the defaults index out of range.
    wanted = request(width=1024, height=576, num_inference_steps=2)
    assert max_diff(z_engine.generate(wanted), z_engine.generate_stock(wanted)) <= TOLERANCE


def test_a_batch_with_prompts_of_different_lengths_equals_each_alone(z_engine: Engine) -> None:
    batch = [
        request(prompt="first", seed=1),
        request(prompt="a much longer second prompt, with many more tokens than the first", seed=2),
        request(prompt="first", seed=3),
    ]
    together = z_engine.generate_batch(batch)
    for alone, image in zip(batch, together, strict=True):
        assert image is not None
        assert max_diff(image, z_engine.generate_stock(alone)) <= TOLERANCE
    first, _, third = together
    assert first is not None
    assert third is not None
    assert max_diff(first, third) > TOLERANCE  # seeds differ, so do images


def test_with_guidance_it_matches_stock_too(z_engine: Engine) -> None:
    # Z-Image-Turbo runs without; the family also runs the base model's guidance as stock.
    wanted = request(guidance_scale=3.0, negative_prompt="dark", num_inference_steps=3)
    assert max_diff(z_engine.generate(wanted), z_engine.generate_stock(wanted)) <= TOLERANCE


def test_a_cancelled_request_leaves_the_batch_and_progress_is_per_step(z_engine: Engine) -> None:
    batch = [request(seed=10, num_inference_steps=4), request(seed=11, num_inference_steps=4)]
    seen: list[tuple[int, int, tuple[int, ...]]] = []

    def stop_first_at_two(step: int, total: int, active: Sequence[int]) -> Collection[int]:
        seen.append((step, total, tuple(active)))
        return {0} if step == 2 else set()

    first, second = z_engine.generate_batch(batch, stop_first_at_two)
    assert first is None
    assert second is not None
    assert seen == [(1, 4, (0, 1)), (2, 4, (0, 1)), (3, 4, (1,)), (4, 4, (1,))]
    assert max_diff(second, z_engine.generate_stock(batch[1])) <= TOLERANCE
    with pytest.raises(GenerationCancelled):
        z_engine.generate(request(num_inference_steps=3), on_step=lambda step, total: step < 1)


def test_prompt_features_are_cached_with_their_own_length(z_engine: Engine) -> None:
    first = z_engine.prompts.get("a cached prompt")
    hits = z_engine.prompts.hits
    assert z_engine.prompts.get("a cached prompt") is first
    assert z_engine.prompts.hits == hits + 1
    assert first.ndim == 2  # tokens x hidden: the prompt's own tokens only, no padding
    longer = z_engine.prompts.get("a cached prompt that is longer")
    assert longer.shape[0] > first.shape[0]
    assert torch.equal(first, z_engine._encode_prompt("a cached prompt"))


def test_a_prompt_longer_than_512_tokens_is_reported_cut(z_engine: Engine) -> None:
    assert z_engine.prompt_warnings(request(prompt="short")) == []
    (warning,) = z_engine.prompt_warnings(request(prompt="x" * 600))
    assert warning.startswith("prompt truncated: the model reads 512 text tokens")


@pytest.mark.parametrize("profile", ["text-encoder-offload", "group-offload-block"])
def test_memory_profiles_that_move_weights_keep_the_image(
    z_engine: Engine, z_tiny_weights: Path, profile: str
) -> None:
    moved = Engine.load(str(z_tiny_weights), device="cpu", memory=profile)
    assert moved.memory.profile == profile
    wanted = request(num_inference_steps=2)
    assert np.array_equal(np.asarray(moved.generate(wanted)), np.asarray(z_engine.generate(wanted)))


def test_random_full_is_the_real_architecture() -> None:
    family = get_family(Z_IMAGE)
    pipeline = family.build_random_full("meta", torch.bfloat16)
    sizes = model_sizes(pipeline, family.memory_reference)
    # Z-Image-Turbo: a 6.15B transformer, the 4.02B Qwen3-4B text encoder, FLUX.1's VAE.
    assert sizes.transformer.parameters == family.memory_reference.parameters["transformer"]
    assert round(sizes.transformer.parameters / 1e9, 2) == 6.15
    assert sizes.text_encoder.parameters == family.memory_reference.parameters["text_encoder"]
    assert round(sizes.text_encoder.parameters / 1e9, 2) == 4.02
    assert sizes.vae.parameters == family.memory_reference.parameters["vae"]


def test_tiny_means_each_familys_own_build(tmp_path: Path, z_tiny_weights: Path) -> None:
    ovis_dir, z_dir = tiny_checkpoint_dir(tmp_path), tiny_checkpoint_dir(tmp_path, Z_IMAGE)
    assert ovis_dir != z_dir
    z_dir.parent.mkdir(parents=True)
    z_dir.symlink_to(z_tiny_weights)  # built already: resolve_weights finds it
    assert resolve_weights("tiny", tmp_path, Z_IMAGE) == str(z_dir)
    assert family_of_directory(resolve_weights("tiny", tmp_path, Z_IMAGE)) == Z_IMAGE


def test_generate_takes_the_models_own_fields_and_defaults(
    tmp_path: Path, z_tiny_weights: Path
) -> None:
    out = tmp_path / "z.png"
    made = run_cli(
        "generate", "a red bicycle", "-o", str(out), "--model", str(z_tiny_weights),
        "--model-id", Z_IMAGE_ID, "--image-size", "256x192", "--steps", "2", "--seed", "1",
        "--data-dir", str(tmp_path),
    )  # fmt: skip
    assert "seed 1: wrote 256x192 png" in made.stderr
    with Image.open(out) as image:
        assert image.size == (256, 192)
    refused = run_cli(
        "generate", "x", "-o", str(out), "--model", str(z_tiny_weights), "--model-id", Z_IMAGE_ID,
        "--guidance-scale", "2", "--data-dir", str(tmp_path), check=False,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "guidance_scale" in refused.stderr


def test_random_full_on_a_cpu_is_refused_naming_z_image(tmp_path: Path) -> None:
    refused = run_cli(
        "generate", "x", "-o", str(tmp_path / "x.png"), "--model", "random-full",
        "--model-id", Z_IMAGE_ID, "--device", "cpu", "--data-dir", str(tmp_path), check=False,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "real Z-Image-Turbo architecture" in refused.stderr


def test_download_fetches_its_weights_with_progress(
    tmp_path: Path, z_tiny_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    repo = "Tongyi-MAI/Z-Image-Turbo"  # the spec's default weights
    with FakeHub(repo, z_tiny_weights) as hub:
        env = {"HF_HOME": str(tmp_path / "hf-home"), "HF_ENDPOINT": hub.url}
        fetched = run_cli(
            "download", "--model-id", Z_IMAGE_ID, "--data-dir", str(tmp_path), env=env
        )
    progress = rf"^downloading {repo}: [0-9.]+ [kM]B in \d+ of \d+ files"
    assert re.search(progress, fetched.stdout, re.M)
    assert re.search(rf"^downloaded {repo}: ", fetched.stdout, re.M)
    folder = Path(fetched.stdout.strip().splitlines()[-1].split(" load it from ")[1])
    assert family_of_directory(folder) == Z_IMAGE
    tiny = run_cli("download", "--model-id", Z_IMAGE_ID, "--model", "tiny", "--data-dir",
                   str(tmp_path))  # fmt: skip
    assert str(tiny_checkpoint_dir(tmp_path, Z_IMAGE)) in tiny.stdout
    assert family_of_directory(tiny_checkpoint_dir(tmp_path, Z_IMAGE)) == Z_IMAGE


# --- served end to end ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def z_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``ovis-server serve --model tiny --model-id tongyi-mai/z-image/turbo`` (the tiny build
    made by the server itself in its data directory)."""
    data_dir = tmp_path_factory.mktemp("z-serve")
    server = start_server(data_dir, "tiny", "--model-id", Z_IMAGE_ID, "--no-auth", timeout=120)
    try:
        with server.client() as client:
            wait_for(lambda: client.get("/readyz").status_code == 200, timeout=300)
        yield server
    finally:
        server.stop()


def test_serve_runs_a_job_through_the_runcomfy_route(z_server: Server) -> None:
    with z_server.client() as client:
        listed = client.get("/v1/models?include_schema=true").json()
        rows = {row["model_id"]: row for row in listed["models"]}
        detail = client.get(f"/v1/models/{Z_IMAGE_ID}").json()
        assert rows[Z_IMAGE_ID]["input_schema"] == detail["input_schema"]
        props = detail["input_schema"]["properties"]
        assert list(props) == list(Z_IMAGE_TURBO.input_schema()["properties"])
        steps = props["num_inference_steps"]
        assert (steps["minimum"], steps["maximum"], steps["default"]) == (1, 8, 8)
        assert "guidance_scale" not in props

        for field, value in [("guidance_scale", 1), ("num_inference_steps", 9)]:
            refused = client.post(f"/v1/models/{Z_IMAGE_ID}", json={"prompt": "x", field: value})
            assert refused.status_code == 422
            assert refused.json()["error_code"] == 422001
            assert field in refused.json()["error_message"]

        body = {"prompt": "a red bicycle", "image_size": "square", "num_inference_steps": 2,
                "seed": 7}  # fmt: skip
        submitted = client.post(f"/v1/models/{Z_IMAGE_ID}", json=body)
        assert submitted.status_code == 200, submitted.text
        result = wait_result(client, submitted.json()["request_id"], timeout=300)
        assert result["status"] == "succeeded", result
        assert result["model_id"] == Z_IMAGE_ID
        assert result["seed"] == 7
        image = Image.open(io.BytesIO(http_get(result["output"]["image"]).content))
        assert image.size == (512, 512)


@pytest.mark.parametrize("name", [Z_IMAGE_ID, ALIAS])
def test_serve_runs_a_job_through_the_openai_route(z_server: Server, name: str) -> None:
    with openai.OpenAI(base_url=z_server.base_url + "/v1", api_key="unused") as sdk:
        answer = sdk.images.generate(
            model=name,
            prompt="a lighthouse at dusk",
            size="256x192",
            response_format="b64_json",
            extra_body={"seed": 3, "num_inference_steps": 2},
        )
        assert answer.data is not None
        (data,) = answer.data
        assert data.b64_json is not None
        image = Image.open(io.BytesIO(base64.b64decode(data.b64_json)))
        assert image.size == (256, 192)
        with pytest.raises(openai.BadRequestError) as caught:
            sdk.images.generate(model=name, prompt="x", extra_body={"guidance_scale": 2.0})
        assert caught.value.status_code == 400
        assert "guidance_scale" in str(caught.value.body)
