"""The fast engine gives the stock pipeline's image for the same seed (float32, CPU)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import pytest
import torch

from ovis_server.catalogue import IMAGE_SIZE_PRESETS
from ovis_server.engine.pipeline import Engine, GenerationCancelled, IncompatibleBatchError
from ovis_server.engine.request import GenerationRequest

from .helpers import TOLERANCE, max_diff


def request(**overrides: Any) -> GenerationRequest:
    fields: dict[str, Any] = {
        "prompt": "a bakery sign that reads FRESH BREAD",
        "negative_prompt": "",
        "width": 256,
        "height": 256,
        "num_inference_steps": 28,
        "guidance_scale": 5.0,
        "seed": 2024,
    }
    fields.update(overrides)
    return GenerationRequest(**fields)


@pytest.mark.parametrize("preset", list(IMAGE_SIZE_PRESETS))
def test_engine_matches_stock_for_every_preset(engine: Engine, preset: str) -> None:
    width, height = IMAGE_SIZE_PRESETS[preset]
    wanted = request(width=width, height=height, negative_prompt="blurry")
    assert max_diff(engine.generate(wanted), engine.generate_stock(wanted)) <= TOLERANCE


def test_engine_matches_stock_without_guidance(engine: Engine) -> None:
    wanted = request(guidance_scale=1.0, num_inference_steps=8)
    assert max_diff(engine.generate(wanted), engine.generate_stock(wanted)) <= TOLERANCE


def test_a_batch_of_four_equals_each_alone(engine: Engine) -> None:
    batch = [
        request(prompt="first", seed=1),
        request(prompt="second", negative_prompt="dark", seed=2),
        request(prompt="third", seed=3),
        request(prompt="first", seed=4),
    ]
    together = engine.generate_batch(batch)
    for alone, image in zip(batch, together, strict=True):
        assert image is not None
        assert max_diff(image, engine.generate(alone)) <= TOLERANCE
        assert max_diff(image, engine.generate_stock(alone)) <= TOLERANCE


def test_a_cancelled_request_leaves_the_batch_and_the_others_go_on(engine: Engine) -> None:
    batch = [request(seed=10, num_inference_steps=6), request(seed=11, num_inference_steps=6)]
    seen: list[tuple[int, tuple[int, ...]]] = []

    def stop_first_at_three(step: int, total: int, active: Sequence[int]) -> Collection[int]:
        seen.append((step, tuple(active)))
        return {0} if step == 3 else set()

    first, second = engine.generate_batch(batch, stop_first_at_three)
    assert first is None
    assert second is not None
    assert seen[2] == (3, (0, 1))
    assert seen[3] == (4, (1,))
    assert max_diff(second, engine.generate(batch[1])) <= TOLERANCE
    with pytest.raises(GenerationCancelled):
        engine.generate_batch(batch, lambda step, total, active: set(active))


def test_a_batch_must_share_size_steps_and_guidance(engine: Engine) -> None:
    with pytest.raises(IncompatibleBatchError):
        engine.generate_batch([request(), request(width=512)])


def test_cached_prompt_embeddings_are_identical(engine: Engine) -> None:
    fresh = engine._encode_prompt("a cached prompt")
    first = engine.prompts.get("a cached prompt")
    hits = engine.prompts.hits
    second = engine.prompts.get("a cached prompt")
    assert engine.prompts.hits == hits + 1
    assert second is first
    assert torch.equal(first, fresh)
    # The empty negative prompt is encoded once per process, however many images use it.
    engine.generate(request(num_inference_steps=1, seed=5))
    misses = engine.prompts.misses
    engine.generate(request(num_inference_steps=1, seed=6))
    assert engine.prompts.misses == misses


def test_prompt_cache_is_bounded() -> None:
    from ovis_server.engine.prompts import PromptCache

    calls: list[str] = []

    def encode(text: str) -> torch.Tensor:
        calls.append(text)
        return torch.zeros(1)

    cache = PromptCache(encode, capacity=2)
    for text in ("a", "b", "a", "c", "b"):
        cache.get(text)
    assert len(cache) == 2
    assert calls == ["a", "b", "c", "b"]  # "b" was the least recently used when "c" came
