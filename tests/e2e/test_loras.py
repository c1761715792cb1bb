"""LoRAs in the engine (engine/loras.py) on the tiny Z-Image-Turbo checkpoint: a job's
image equals diffusers' stock ZImagePipeline with the same LoRA loaded (single and batched),
scale 0 is the base model, LoRAs that do not fit are refused while the engine goes on, and
loaded adapters stay within their LRU bound; the catalogue entry's schema."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from safetensors.torch import save_file

from ovis_server.catalogue.z_image_lora import Z_IMAGE_LORA, ZImageLoraInput
from ovis_server.engine.loras import LoraMismatchError, quiet_peft
from ovis_server.engine.pipeline import Engine, IncompatibleBatchError
from ovis_server.engine.request import GenerationRequest

from .bodies import Z_IMAGE_ID
from .helpers import TOLERANCE, max_diff, run_cli

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# The stock pipeline's second adapter: PEFT notes that the model has several (as meant).
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")


def make_lora(
    transformer: Any, path: Path, seed: int, rank: int = 2, targets: Sequence[str] = TARGETS
) -> Path:
    """A LoRA file for ``transformer``, as trainers save them: PEFT's state dict of a
    LoraConfig'd copy of the model, keys prefixed ``transformer.``, random non-zero weights."""
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights=False
    )
    with quiet_peft():  # the transformer may hold other adapters
        transformer.add_adapter(config, adapter_name="maker")
        try:
            state = get_peft_model_state_dict(transformer, adapter_name="maker")
        finally:
            transformer.delete_adapters("maker")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Strong enough to change the tiny model's image visibly.
    tensors = {f"transformer.{key}": (value * 3).contiguous() for key, value in state.items()}
    save_file(tensors, str(path))
    return path


def wrong_keys_lora(path: Path) -> Path:
    """Keys of no module of the model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            "transformer.blocks.0.attn.qkv.lora_A.weight": torch.ones(2, 32),
            "transformer.blocks.0.attn.qkv.lora_B.weight": torch.ones(96, 2),
        },
        str(path),
    )
    return path


def wrong_shapes_lora(transformer: Any, path: Path) -> Path:
    """The model's keys, another model's shapes (a wider hidden size)."""
    from safetensors.torch import load_file

    good = load_file(str(make_lora(transformer, path, seed=9)))
    save_file({key: torch.ones(value.shape[0] + 8, value.shape[1]) for key, value in good.items()},
              str(path))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def lora_files(z_engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("loras")
    transformer = z_engine.pipeline.transformer
    return {
        "one": make_lora(transformer, folder / "one.safetensors", seed=1),
        "two": make_lora(
            transformer,
            folder / "two.safetensors",
            seed=2,
            rank=4,
            targets=["to_q", "to_v", "w1", "w3"],
        ),
        "three": make_lora(transformer, folder / "three.safetensors", seed=3),
        "keys": wrong_keys_lora(folder / "keys.safetensors"),
        "shapes": wrong_shapes_lora(transformer, folder / "shapes.safetensors"),
    }


@pytest.fixture(scope="module")
def stock_pipeline(z_tiny_weights: Path) -> Any:
    """diffusers' own ZImagePipeline on the same weights, apart from the engine's."""
    from diffusers import ZImagePipeline

    return ZImagePipeline.from_pretrained(str(z_tiny_weights), torch_dtype=torch.float32)


def stock_with(pipe: Any, request: GenerationRequest, loras: dict[Path, float]) -> Image.Image:
    """The stock call with ``loras`` loaded and set (none: every adapter unloaded)."""
    pipe.unload_lora_weights()
    for index, path in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"stock{index}")
    if loras:
        pipe.set_adapters([f"stock{i}" for i in range(len(loras))], list(loras.values()))
    generator = torch.Generator(device="cpu").manual_seed(request.seed)
    output = pipe(
        prompt=request.prompt,
        width=request.width,
        height=request.height,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=0.0,
        generator=generator,
    )
    image: Image.Image = output.images[0]
    return image


def request(**overrides: Any) -> GenerationRequest:
    fields: dict[str, Any] = {
        "prompt": "a lighthouse in a storm, oil painting",
        "negative_prompt": "",
        "width": 128,
        "height": 128,
        "num_inference_steps": 3,
        "guidance_scale": 0.0,
        "seed": 11,
    }
    fields.update(overrides)
    return GenerationRequest(**fields)


# --- the catalogue entry --------------------------------------------------------------------


def test_its_schema_is_the_text_to_image_fields_plus_loras() -> None:
    schema = Z_IMAGE_LORA.input_schema()
    assert list(schema["properties"]) == [
        "prompt", "image_size", "num_inference_steps", "seed", "output_format", "loras",
    ]  # fmt: skip
    assert schema["required"] == ["prompt"]
    assert schema["properties"]["loras"]["maxItems"] == 3
    item = schema["$defs"]["LoraWeight"]
    assert item["required"] == ["path"]
    scale = item["properties"]["scale"]
    assert (scale["minimum"], scale["maximum"], scale["default"]) == (0.0, 4.0, 1.0)
    assert Z_IMAGE_LORA.variant_of == Z_IMAGE_ID
    fields = ZImageLoraInput.model_validate({"prompt": "x", "loras": [{"path": "a"}]})
    assert fields.to_generation_request(3).loras == (("a", 1.0),)


@pytest.mark.parametrize(
    "loras",
    [
        [{"path": "a"}] * 4,
        [{"path": "a", "scale": 4.5}],
        [{"path": "a", "scale": -0.1}],
        [{"path": ""}],
        [{"path": "a", "weight": 1}],
    ],
)
def test_bad_loras_are_refused_naming_loras(loras: list[dict[str, Any]]) -> None:
    with pytest.raises(ValidationError) as caught:
        ZImageLoraInput.model_validate({"prompt": "x", "loras": loras})
    assert "loras" in str(caught.value)


def test_the_lora_set_is_part_of_the_batch_key() -> None:
    plain = request()
    one = request(loras=(("a", 1.0),))
    assert Z_IMAGE_LORA.batch_key(one) != Z_IMAGE_LORA.batch_key(plain)
    assert Z_IMAGE_LORA.batch_key(one) != Z_IMAGE_LORA.batch_key(request(loras=(("a", 0.5),)))
    assert Z_IMAGE_LORA.batch_key(one) == Z_IMAGE_LORA.batch_key(
        request(seed=3, loras=(("a", 1.0),))
    )
    assert len(Z_IMAGE_LORA.batch_key(request(loras=(("x" * 2048, 4.0),) * 3))) <= 200


# --- the engine against the stock pipeline --------------------------------------------------


def test_a_lora_gives_the_stock_pipelines_image_with_it_loaded(
    z_engine: Engine, lora_files: dict[str, Path], stock_pipeline: Any
) -> None:
    one = lora_files["one"]
    wanted = request(loras=((str(one), 1.0),))
    image = z_engine.generate(wanted)
    assert max_diff(image, stock_with(stock_pipeline, wanted, {one: 1.0})) <= TOLERANCE
    base = z_engine.generate(request())
    assert max_diff(image, base) > TOLERANCE  # the LoRA changes the image
    assert max_diff(base, stock_with(stock_pipeline, request(), {})) <= TOLERANCE


def test_a_batch_with_two_loras_equals_the_stock_pipeline_for_each(
    z_engine: Engine, lora_files: dict[str, Path], stock_pipeline: Any
) -> None:
    loras = {lora_files["one"]: 0.7, lora_files["two"]: 1.5}
    pairs = tuple((str(path), scale) for path, scale in loras.items())
    batch = [request(seed=1, loras=pairs),
             request(seed=2, prompt="a quiet harbour at dawn", loras=pairs)]  # fmt: skip
    together = z_engine.generate_batch(batch)
    for alone, image in zip(batch, together, strict=True):
        assert max_diff(image, stock_with(stock_pipeline, alone, loras)) <= TOLERANCE


def test_scale_zero_gives_the_base_models_image(
    z_engine: Engine, lora_files: dict[str, Path]
) -> None:
    base = z_engine.generate(request(seed=5))
    zero = z_engine.generate(request(seed=5, loras=((str(lora_files["one"]), 0.0),)))
    assert max_diff(zero, base) <= TOLERANCE
    # ...and a job without LoRAs after one with them runs the base model again.
    z_engine.generate(request(seed=5, loras=((str(lora_files["one"]), 2.0),)))
    assert max_diff(z_engine.generate(request(seed=5)), base) == 0


def test_jobs_of_different_lora_sets_do_not_share_a_batch(
    z_engine: Engine, lora_files: dict[str, Path]
) -> None:
    with pytest.raises(IncompatibleBatchError):
        z_engine.generate_batch([request(loras=((str(lora_files["one"]), 1.0),)), request()])


@pytest.mark.parametrize("kind", ["keys", "shapes"])
def test_a_lora_that_does_not_fit_is_refused_and_the_engine_goes_on(
    z_engine: Engine, lora_files: dict[str, Path], kind: str
) -> None:
    z_engine.loras.model_id = Z_IMAGE_ID
    before = z_engine.pipeline.get_list_adapters()
    with pytest.raises(LoraMismatchError, match=f"this LoRA is not for {Z_IMAGE_ID}"):
        z_engine.generate(request(loras=((str(lora_files[kind]), 1.0),)))
    assert z_engine.pipeline.get_list_adapters() == before  # nothing half-loaded stays
    one = ((str(lora_files["one"]), 1.0),)
    assert (
        max_diff(z_engine.generate(request(loras=one)), z_engine.generate(request(loras=one))) == 0
    )


def test_loaded_loras_stay_within_their_bound(
    z_engine: Engine, lora_files: dict[str, Path]
) -> None:
    adapters = z_engine.loras
    adapters.capacity = 2
    try:
        for name in ("one", "two", "three", "one"):
            z_engine.generate(request(loras=((str(lora_files[name]), 1.0),)))
            loaded = z_engine.pipeline.get_list_adapters().get("transformer", [])
            assert len(loaded) <= 2
            assert len(adapters.loaded) <= 2
        # "one" was evicted by "three" and loaded again; "two" is the oldest now.
        assert [path.name for path in adapters.loaded.values()] == [
            "three.safetensors", "one.safetensors",
        ]  # fmt: skip
        # A set of three fits even past the bound (what one job needs is never evicted).
        three = tuple((str(lora_files[n]), 1.0) for n in ("one", "two", "three"))
        z_engine.generate(request(loras=three))
    finally:
        adapters.capacity = 8


# --- a compiled transformer: LoRAs swapped in place -----------------------------------------


def test_switching_loras_on_a_compiled_transformer_does_not_recompile(
    z_tiny_weights: Path, z_engine: Engine, lora_files: dict[str, Path]
) -> None:
    compiled = Engine.load(str(z_tiny_weights), device="cpu", dtype="float32")
    compiled.loras.model_id = Z_IMAGE_ID
    compilations: list[int] = []

    def counting(graph: torch.fx.GraphModule, _inputs: Any) -> Any:
        compilations.append(1)
        return graph.forward

    compiled.loras.prepare_hotswap(rank=4)  # what optimize() does before it compiles
    compiled.pipeline.transformer.compile_repeated_blocks(fullgraph=True, backend=counting)
    compiled.compiled = True
    one, two = str(lora_files["one"]), str(lora_files["two"])
    try:
        sets: list[tuple[tuple[str, float], ...]] = [
            (),
            ((one, 1.0),),
            ((two, 0.5),),
            ((one, 0.7), (two, 1.5)),
            (),
            ((one, 0.0),),
        ]
        images = [compiled.generate(request(seed=4, loras=loras)) for loras in sets[:1]]
        first = len(compilations)
        assert first > 0
        images += [compiled.generate(request(seed=4, loras=loras)) for loras in sets[1:]]
        assert len(compilations) == first  # five switches, no recompilation
        assert compiled.loras.loads == 2  # each file read once, however often it comes back
        # ...and each image is the uncompiled engine's with its LoRAs as separate adapters.
        for loras, image in zip(sets, images, strict=True):
            assert max_diff(image, z_engine.generate(request(seed=4, loras=loras))) <= TOLERANCE
        assert max_diff(images[1], images[0]) > TOLERANCE
        # A LoRA that does not fit is refused here too, and the slot keeps serving.
        with pytest.raises(LoraMismatchError, match=f"this LoRA is not for {Z_IMAGE_ID}"):
            compiled.generate(request(seed=4, loras=((str(lora_files["shapes"]), 1.0),)))
        with pytest.raises(LoraMismatchError):
            compiled.generate(request(seed=4, loras=((str(lora_files["keys"]), 1.0),)))
        again = compiled.generate(request(seed=4, loras=((one, 1.0),)))
        assert max_diff(again, images[1]) == 0
        assert len(compilations) == first
    finally:
        torch._dynamo.reset()


def test_generate_applies_the_operators_loras_by_name(
    tmp_path: Path, z_tiny_weights: Path, z_engine: Engine, lora_files: dict[str, Path]
) -> None:
    (tmp_path / "loras").mkdir()
    shutil.copy(lora_files["one"], tmp_path / "loras" / "watercolour.safetensors")
    out = tmp_path / "out.png"
    made = run_cli(
        "generate", "a lighthouse in a storm, oil painting", "-o", str(out), "--model",
        str(z_tiny_weights), "--model-id", Z_IMAGE_ID, "--lora", "watercolour:0.7", "--steps",
        "3", "--seed", "11", "--image-size", "128x128", "--data-dir", str(tmp_path),
    )  # fmt: skip
    assert "seed 11: wrote 128x128 png" in made.stderr
    wanted = z_engine.generate(request(loras=((str(lora_files["one"]), 0.7),)))
    with Image.open(out) as image:
        assert max_diff(image, wanted) <= TOLERANCE
        assert max_diff(image, z_engine.generate(request())) > TOLERANCE  # the LoRA counted

    refused = run_cli(
        "generate", "x", "-o", str(tmp_path / "no.png"), "--model", str(z_tiny_weights),
        "--model-id", Z_IMAGE_ID, "--lora", "no-such", "--data-dir", str(tmp_path), check=False,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "loras.0.path: this server has no LoRA called 'no-such'" in refused.stderr
    assert not (tmp_path / "no.png").exists()
