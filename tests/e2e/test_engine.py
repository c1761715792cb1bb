"""The engine on the tiny checkpoint: real diffusers classes, real pipeline, on the CPU."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ovis_server.catalogue import IMAGE_SIZE_PRESETS
from ovis_server.engine.images import encode_image
from ovis_server.engine.loading import EngineLoadError
from ovis_server.engine.pipeline import Engine, GenerationCancelled
from ovis_server.engine.request import GenerationRequest
from ovis_server.engine.weights import WeightsNotFoundError, resolve_weights

from .helpers import run_cli


def request(**overrides: Any) -> GenerationRequest:
    fields: dict[str, Any] = {
        "prompt": "a neon sign that reads OVIS",
        "negative_prompt": "",
        "width": 128,
        "height": 96,
        "num_inference_steps": 4,
        "guidance_scale": 5.0,
        "seed": 1234,
    }
    fields.update(overrides)
    return GenerationRequest(**fields)


def pixels(image: Image.Image) -> np.ndarray[Any, Any]:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_tiny_checkpoint_is_diffusers_format_with_the_real_classes(tiny_weights: Path) -> None:
    index = json.loads((tiny_weights / "model_index.json").read_text())
    assert index["_class_name"] == "OvisImagePipeline"
    assert index["text_encoder"] == ["transformers", "Qwen3Model"]
    assert index["transformer"] == ["diffusers", "OvisImageTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["tokenizer"][1].startswith("Qwen2Tokenizer")

    vae = json.loads((tiny_weights / "vae" / "config.json").read_text())
    assert len(vae["block_out_channels"]) == 4  # 8x downsampling, like the real VAE
    assert vae["mid_block_add_attention"] is False
    scheduler = json.loads((tiny_weights / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["use_dynamic_shifting"] is True
    assert (scheduler["base_shift"], scheduler["max_shift"]) == (0.5, 1.15)
    assert (tiny_weights / "tokenizer" / "tokenizer.json").is_file()


def test_tiny_checkpoint_loads_through_from_pretrained(engine: Engine) -> None:
    pipe = engine.pipeline
    assert type(pipe).__name__ == "OvisImagePipeline"
    assert pipe.vae_scale_factor == 8
    assert pipe.tokenizer.chat_template
    # The pipeline's chat template call works on our tokenizer, as on the real one.
    messages = pipe._get_messages("hello")
    assert messages[0].startswith("<|im_start|>user\n")
    assert "<think>" in messages[0]
    assert str(engine.device) == "cpu"


def test_same_seed_gives_identical_pixels(engine: Engine) -> None:
    first = engine.generate(request(seed=7))
    second = engine.generate(request(seed=7))
    other = engine.generate(request(seed=8))
    assert first.size == (128, 96)
    assert np.array_equal(pixels(first), pixels(second))
    assert not np.array_equal(pixels(first), pixels(other))


def test_progress_after_every_step(engine: Engine) -> None:
    seen: list[tuple[int, int]] = []

    def record(step: int, total: int) -> bool:
        seen.append((step, total))
        return True

    engine.generate(request(num_inference_steps=5), on_step=record)
    assert seen == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]


def test_cancel_stops_at_the_step_boundary_without_decoding(engine: Engine) -> None:
    decodes: list[int] = []
    hook = engine.pipeline.vae.decoder.register_forward_hook(lambda *_: decodes.append(1))
    seen: list[int] = []

    def stop_after_two(step: int, total: int) -> bool:
        seen.append(step)
        return step < 2

    try:
        with pytest.raises(GenerationCancelled):
            engine.generate(request(num_inference_steps=6), on_step=stop_after_two)
        assert seen == [1, 2]
        assert decodes == []
        engine.generate(request(num_inference_steps=1))
        assert decodes == [1]  # the hook does see a decode when one happens
    finally:
        hook.remove()


@pytest.mark.parametrize("image_format", ["png", "jpeg", "webp"])
def test_encodings_decode_to_the_same_size(engine: Engine, image_format: str) -> None:
    image = engine.generate(request(num_inference_steps=1))
    data = encode_image(image, image_format)  # type: ignore[arg-type]
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[image_format]
    assert decoded.size == (128, 96)
    if image_format == "png":
        assert np.array_equal(pixels(decoded), pixels(image))


def test_request_rejects_sizes_the_model_cannot_patch() -> None:
    with pytest.raises(ValueError, match="multiples of 16"):
        request(width=100)


def test_resolve_weights(tmp_path: Path, tiny_weights: Path) -> None:
    assert resolve_weights("AIDC-AI/Ovis-Image-7B", tmp_path) == "AIDC-AI/Ovis-Image-7B"
    assert resolve_weights(str(tiny_weights), tmp_path) == str(tiny_weights.resolve())
    with pytest.raises(WeightsNotFoundError, match=r"model_index\.json"):
        resolve_weights(str(tmp_path), tmp_path)
    with pytest.raises(WeightsNotFoundError, match="neither"):
        resolve_weights("not a model", tmp_path)
    built = resolve_weights("tiny", tmp_path)
    assert Path(built, "model_index.json").is_file()
    assert resolve_weights("tiny", tmp_path) == built  # built once, then reused
    assert resolve_weights("random-full", tmp_path) == "random-full"  # built by Engine.load


def test_random_full_is_refused_on_a_cpu() -> None:
    # Refused before anything is built: the full-size model would take ~36 GB here.
    with pytest.raises(EngineLoadError, match=r"random-full .*36 GB.*--device cuda"):
        Engine.load("random-full", device="cpu")


def test_generate_command_renders_square_hd_and_reports_the_seed(
    tmp_path: Path, tiny_weights: Path
) -> None:
    out = tmp_path / "out.png"
    result = run_cli(
        "generate",
        "hello",
        "-o",
        str(out),
        "--model",
        str(tiny_weights),
        "--image-size",
        "square_hd",
        "--data-dir",
        str(tmp_path),
    )
    assert "28/28" in result.stderr  # the progress bar reached the last step
    seed = int(result.stderr.split("seed ")[1].split(":")[0])
    with Image.open(out) as image:
        assert image.size == IMAGE_SIZE_PRESETS["square_hd"]
        first = pixels(image)
    again = tmp_path / "again.png"
    run_cli(
        "generate",
        "hello",
        "-o",
        str(again),
        "--model",
        str(tiny_weights),
        "--image-size",
        "square_hd",
        "--seed",
        str(seed),
        "--data-dir",
        str(tmp_path),
    )
    with Image.open(again) as image:
        assert np.array_equal(pixels(image), first)


def test_generate_command_rejects_bad_input_naming_the_field(tmp_path: Path) -> None:
    result = run_cli(
        "generate",
        "hello",
        "-o",
        str(tmp_path / "x.png"),
        "--steps",
        "51",
        "--model",
        "tiny",
        "--data-dir",
        str(tmp_path),
        check=False,
    )
    assert result.returncode == 2
    assert "num_inference_steps" in result.stderr
    assert not (tmp_path / "models").exists()  # rejected before any model work


def test_prompt_warnings_name_what_the_model_cut(engine: Engine) -> None:
    """The pipeline cuts a prompt's message to 256 text tokens; the tiny tokenizer makes a
    token of every byte, so 300 characters are beyond it and 20 are not."""

    def request(prompt: str, negative: str = "", guidance: float = 5.0) -> GenerationRequest:
        return GenerationRequest(prompt, negative, 64, 64, 1, guidance, 0)

    assert engine.prompt_warnings(request("a shop sign that reads OVIS")) == []
    (cut,) = engine.prompt_warnings(request("x" * 300))
    assert cut.startswith("prompt truncated: the model reads 256 text tokens")
    assert "about 300 tokens" in cut
    (negative,) = engine.prompt_warnings(request("short", negative="y" * 300))
    assert negative.startswith("negative_prompt truncated")
    # Without guidance the negative prompt is not read at all: nothing to say.
    assert engine.prompt_warnings(request("short", negative="y" * 300, guidance=1.0)) == []
