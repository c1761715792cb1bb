"""Z-Image-Turbo image to image (``tongyi-mai/z-image/turbo/image-to-image``): the catalogue
entry, the engine against diffusers' ZImageImg2ImgPipeline on the tiny checkpoint, and jobs
served end to end with the input image fetched once by the API."""

from __future__ import annotations

import io
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from ovis_server.catalogue.z_image_edit import (
    STORED_IMAGE_REFERENCE,
    Z_IMAGE_EDIT,
    ZImageEditInput,
    auto_size,
)
from ovis_server.engine.pipeline import Engine, IncompatibleBatchError
from ovis_server.engine.request import GenerationRequest
from ovis_server.inputs.images import check_image

from .bodies import Z_IMAGE_ID
from .helpers import TOLERANCE, max_diff, run_cli

MODEL_ID = "tongyi-mai/z-image/turbo/image-to-image"


def png(width: int, height: int, seed: int = 0) -> bytes:
    """A smooth random picture (gradients plus noise), as PNG bytes."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs * 255 / width, ys * 255 / height, (xs + ys) * 127 / (width + height)], -1)
    pixels = np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def request(**overrides: Any) -> GenerationRequest:
    fields: dict[str, Any] = {
        "prompt": "the same street at night",
        "negative_prompt": "",
        "width": 256,
        "height": 192,
        "num_inference_steps": 8,
        "guidance_scale": 0.0,
        "seed": 2024,
        "strength": 0.6,
        "init_image": png(256, 192),
    }
    fields.update(overrides)
    return GenerationRequest(**fields)


# --- the catalogue entry --------------------------------------------------------------------


def test_its_schema_has_runcomfys_fields_and_defaults() -> None:
    props = Z_IMAGE_EDIT.input_schema()["properties"]
    assert list(props) == [
        "prompt", "image_url", "strength", "image_size", "num_inference_steps", "seed",
        "output_format",
    ]  # fmt: skip
    assert Z_IMAGE_EDIT.input_schema()["required"] == ["prompt", "image_url"]
    assert (props["strength"]["minimum"], props["strength"]["maximum"]) == (0.0, 1.0)
    assert props["strength"]["default"] == 0.6
    assert props["image_size"]["default"] == "auto"
    steps = props["num_inference_steps"]
    assert (steps["minimum"], steps["maximum"], steps["default"]) == (1, 8, 8)
    assert Z_IMAGE_EDIT.variant_of == "tongyi-mai/z-image/turbo"


def test_auto_size_keeps_the_aspect_ratio_at_about_a_megapixel() -> None:
    assert auto_size(4000, 3000) == (1184, 880)
    assert auto_size(100, 100) == (1024, 1024)
    width, height = auto_size(1920, 1080)
    assert width % 16 == height % 16 == 0
    assert abs(width / height - 16 / 9) < 0.02
    assert 0.9e6 < width * height < 1.1e6


def test_stored_input_settles_auto_and_keeps_a_short_reference() -> None:
    sent = ZImageEditInput.model_validate({"prompt": "x", "image_url": "data:image/png;base64,AA"})
    with pytest.raises(ValueError, match="auto"):
        sent.to_generation_request(1)
    stored = sent.with_input_image(640, 480)
    assert stored.image_url == STORED_IMAGE_REFERENCE
    assert stored.reads_input_image()
    again = ZImageEditInput.model_validate(stored.model_dump())  # as the worker reads it
    generation = again.to_generation_request(5)
    assert (generation.width, generation.height) == auto_size(640, 480)
    assert generation.strength == 0.6
    assert generation.steps_run == 5  # int(8 - 8 x 0.6) = 3 skipped


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"prompt": "x"}, "image_url"),
        ({"prompt": "x", "image_url": "https://a.example/b.png", "strength": 1.5}, "strength"),
        ({"prompt": "x", "image_url": "https://a.example/b.png", "strength": 0.0}, "strength"),
        ({"prompt": "x", "image_url": "https://a.example/b.png", "image_size": "big"},
         "image_size"),
    ],
)  # fmt: skip
def test_bad_fields_are_refused_naming_them(fields: dict[str, Any], named: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ZImageEditInput.model_validate(fields)
    assert named in str(caught.value)


# --- the engine against the stock pipeline --------------------------------------------------


def test_engine_matches_stock_img2img_single(z_engine: Engine) -> None:
    wanted = request()
    steps: list[tuple[int, int]] = []

    def on_step(step: int, total: int) -> bool:
        steps.append((step, total))
        return True

    image = z_engine.generate(wanted, on_step=on_step)
    assert steps[-1] == (5, 5)  # the steps actually run: strength's share of eight
    stock = z_engine.generate_stock(wanted)
    assert max_diff(image, stock) <= TOLERANCE
    assert np.asarray(image).std() > 1
    # The input shows through: a text-to-image run of the same seed is another image.
    plain = z_engine.generate_stock(request(init_image=None, strength=1.0))
    assert max_diff(image, plain) > TOLERANCE


def test_a_batch_equals_each_alone(z_engine: Engine) -> None:
    batch = [
        request(seed=1, init_image=png(256, 192, seed=1)),
        request(seed=2, prompt="a much longer second prompt, with more tokens than the first",
                init_image=png(256, 192, seed=2)),
        request(seed=1, init_image=png(256, 192, seed=3)),
    ]  # fmt: skip
    together = z_engine.generate_batch(batch)
    for alone, image in zip(batch, together, strict=True):
        assert image is not None
        assert max_diff(image, z_engine.generate_stock(alone)) <= TOLERANCE
    first, _, third = together
    assert first is not None
    assert third is not None
    assert max_diff(first, third) > TOLERANCE  # same seed, other input images


def test_strength_decides_the_batch_and_the_steps(z_engine: Engine) -> None:
    with pytest.raises(IncompatibleBatchError):
        z_engine.generate_batch([request(strength=0.6), request(strength=0.8)])
    wanted = request(strength=0.3, num_inference_steps=8, width=128, height=128,
                     init_image=png(300, 200))  # fmt: skip
    assert wanted.steps_run == 3
    seen: list[tuple[int, int, tuple[int, ...]]] = []

    def record(step: int, total: int, active: Sequence[int]) -> Collection[int]:
        seen.append((step, total, tuple(active)))
        return ()

    (image,) = z_engine.generate_batch([wanted], record)
    assert image is not None
    assert image.size == (128, 128)  # the input is resized
    assert [total for _, total, _ in seen] == [3, 3, 3]


def test_the_variant_runs_on_its_models_engine_in_the_worker(z_engine: Engine) -> None:
    from ovis_server.catalogue.z_image import Z_IMAGE_TURBO
    from ovis_server.worker.placement import Placement

    base = Z_IMAGE_TURBO.model_id
    placement = Placement.single(Z_IMAGE_TURBO, z_engine, 1)
    placement.add_variant(Z_IMAGE_EDIT)
    assert placement.claimable() == [base, MODEL_ID]
    assert placement.queue_ids() == [base, MODEL_ID]
    assert placement.engine_of(MODEL_ID) is z_engine
    assert placement.get(MODEL_ID) is placement.get(base)
    assert placement.spec_of(MODEL_ID) is Z_IMAGE_EDIT
    assert placement.spec_of(base) is Z_IMAGE_TURBO
    # A variant's queued jobs count as its model's when the worker weighs a swap.
    assert placement.heads_by_model({MODEL_ID: 5.0, base: 7.0}) == {base: 5.0}
    assert [m.model_id for m in placement.detail().models or []] == [base]  # loaded once
    lone = Placement(lambda spec: z_engine)
    with pytest.raises(ValueError, match="variant"):
        lone.add_variant(Z_IMAGE_EDIT)


# --- generate ---------------------------------------------------------------------------------


def test_generate_runs_image_to_image_from_a_local_file(
    tmp_path: Path, z_tiny_weights: Path, z_engine: Engine
) -> None:
    source = tmp_path / "in.png"
    source.write_bytes(png(160, 96, seed=4))
    out = tmp_path / "out.png"
    # --model in its per-model form, as serve takes it: the variant runs on its model's.
    made = run_cli(
        "generate", "the same street at night", "-o", str(out), "--model",
        f"{Z_IMAGE_ID}={z_tiny_weights}", "--model-id", Z_IMAGE_ID, "--image", str(source),
        "--strength", "0.6", "--seed", "2024", "--data-dir", str(tmp_path),
        env={"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    width, height = auto_size(160, 96)  # image_size auto: the input's shape
    assert f"seed 2024: wrote {width}x{height} png" in made.stderr
    # The engine's image for the same request, the input image as the API would store it.
    stored = check_image(source.read_bytes(), 10**8).png
    wanted = request(width=width, height=height, init_image=stored)
    with Image.open(out) as image:
        assert max_diff(image, z_engine.generate(wanted)) <= TOLERANCE

    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    refused = run_cli(
        "generate", "x", "-o", str(tmp_path / "no.png"), "--model", str(z_tiny_weights),
        "--model-id", Z_IMAGE_ID, "--image", str(bad), "--data-dir", str(tmp_path), check=False,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "--image" in refused.stderr
    assert "is not an image (PNG, JPEG or WEBP)" in refused.stderr
    ovis = run_cli(
        "generate", "x", "-o", str(tmp_path / "no.png"), "--model", "tiny", "--image",
        str(source), "--data-dir", str(tmp_path), check=False,
    )  # fmt: skip
    assert ovis.returncode == 2
    assert "--model-id aidc-ai/ovis-image takes no input image" in ovis.stderr
    missing = run_cli(
        "generate", "x", "-o", str(tmp_path / "no.png"), "--model", "tiny", "--model-id",
        Z_IMAGE_ID, "--image", str(tmp_path / "typo.png"), "--strength", "0.5", check=False,
    )  # fmt: skip
    assert missing.returncode == 2
    assert f"{tmp_path / 'typo.png'}: no such file" in missing.stderr
    too_long = run_cli(
        "generate", "x", "-o", str(tmp_path / "no.png"), "--model", "tiny", "--model-id",
        Z_IMAGE_ID, "--image", str(tmp_path / ("a" * 300 + ".png")), check=False,
    )  # fmt: skip
    assert too_long.returncode == 2
    assert "cannot be read (OSError)" in too_long.stderr
    assert "Traceback" not in too_long.stderr
    assert not (tmp_path / "no.png").exists()
