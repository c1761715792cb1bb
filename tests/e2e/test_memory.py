"""Memory profiles: the planner's choices for common cards, and every profile that only moves
weights giving the ``full`` image."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ovis_server import config
from ovis_server.catalogue import OVIS_IMAGE
from ovis_server.config import SETTINGS_JSON_ENV, Settings
from ovis_server.engine import memory
from ovis_server.engine.loading import EngineLoadError
from ovis_server.engine.memory import (
    GiB,
    MemoryPlan,
    MemoryProfile,
    ModelSizes,
    model_sizes,
    plan,
)
from ovis_server.engine.pipeline import Engine
from ovis_server.engine.random_full import build_full_size_pipeline
from ovis_server.engine.request import GenerationRequest
from ovis_server.jobs.job import NewJob
from ovis_server.jobs.store import JobStore
from ovis_server.storage.local import LocalFileStore
from ovis_server.storage.signing import UrlSigner
from ovis_server.units import parse_memory_size
from ovis_server.worker.runner import Worker
from ovis_server.worker.supervisor import worker_environment

from .helpers import run_cli

REQUEST = GenerationRequest(
    prompt="a lighthouse at dusk",
    negative_prompt="",
    width=128,
    height=128,
    num_inference_steps=2,
    guidance_scale=5.0,
    seed=11,
)
ONLY_MOVE_WEIGHTS = [p for p in MemoryProfile if p.keeps_image and p is not MemoryProfile.FULL]


@pytest.fixture(scope="module")
def full_size() -> ModelSizes:
    """The real Ovis-Image-7B's parameter sizes in bf16, from the meta device."""
    return model_sizes(build_full_size_pipeline("meta", torch.bfloat16))


def test_planned_peaks_agree_with_the_h200_measurements(full_size: ModelSizes) -> None:
    # Measured at 1024x1024 in bf16: full 19.5 GiB, group offload (leaf, streams) 2.4 GiB.
    assert memory.planned_peak(full_size, MemoryProfile.FULL) / GiB == pytest.approx(19.5, abs=0.1)
    leaf = memory.planned_peak(full_size, MemoryProfile.GROUP_OFFLOAD_LEAF)
    assert leaf / GiB == pytest.approx(2.4, abs=0.1)
    peaks = [memory.planned_peak(full_size, profile) for profile in MemoryProfile]
    assert peaks == sorted(peaks, reverse=True)  # from the largest to the smallest


@pytest.mark.parametrize(
    ("card_gib", "profile", "batch"),
    [
        (80, MemoryProfile.FULL, 4),
        (24, MemoryProfile.FULL, 2),
        (20, MemoryProfile.TEXT_ENCODER_OFFLOAD, 1),
        (16, MemoryProfile.GROUP_OFFLOAD_BLOCK, 4),
        (12, MemoryProfile.GROUP_OFFLOAD_BLOCK, 4),
        (8, MemoryProfile.GROUP_OFFLOAD_BLOCK, 2),
    ],
)
def test_auto_picks_the_fastest_profile_that_keeps_the_image_and_fits(
    full_size: ModelSizes, card_gib: int, profile: MemoryProfile, batch: int
) -> None:
    chosen = plan(full_size, card_gib * GiB)
    assert (chosen.profile, chosen.batch_limit) == (profile, batch)
    assert chosen.peak_bytes + memory.margin(card_gib * GiB) <= card_gib * GiB
    assert f"fits {card_gib}.0 GiB" in chosen.reason


def test_auto_names_8bit_where_it_would_fit_but_never_takes_it(full_size: ModelSizes) -> None:
    for card_gib in (16, 12):
        reason = plan(full_size, card_gib * GiB).reason
        assert "8bit would fit too" in reason
        assert "changes the image a seed gives: --memory 8bit" in reason
    assert "8bit" not in plan(full_size, 8 * GiB).reason  # planned 10.3 GiB: no room


def test_a_profile_asked_for_is_kept_and_warned_about(full_size: ModelSizes) -> None:
    chosen = plan(full_size, 16 * GiB, "full")
    assert chosen.profile is MemoryProfile.FULL
    assert "DOES NOT fit 16.0 GiB" in chosen.reason
    tiny_card = plan(full_size, 1 * GiB)
    assert tiny_card.profile is MemoryProfile.GROUP_OFFLOAD_LEAF
    assert "nothing fits" in tiny_card.reason


def test_auto_on_a_cpu_is_full(full_size: ModelSizes) -> None:
    chosen = plan(full_size, None, device_type="cpu")
    assert (chosen.profile, chosen.batch_limit) == (MemoryProfile.FULL, 1)


def test_the_engine_records_its_plan(engine: Engine) -> None:
    assert engine.memory.profile is MemoryProfile.FULL
    assert "no GPU memory to plan" in engine.memory.describe()


@pytest.mark.parametrize("profile", ONLY_MOVE_WEIGHTS, ids=str)
def test_profiles_that_move_weights_keep_the_full_image(
    engine: Engine, tiny_weights: Path, profile: MemoryProfile
) -> None:
    moved = Engine.load(str(tiny_weights), device="cpu", memory=profile.value)
    assert moved.memory.profile is profile
    assert np.array_equal(np.asarray(moved.generate(REQUEST)), np.asarray(engine.generate(REQUEST)))
    assert np.array_equal(
        np.asarray(moved.generate_stock(REQUEST)), np.asarray(engine.generate_stock(REQUEST))
    )


def test_8bit_runs_on_a_cpu_as_int8_weights(tiny_weights: Path) -> None:
    pytest.importorskip("torchao", reason="the fp8 extra is not installed")
    quantized = Engine.load(str(tiny_weights), device="cpu", memory="8bit")
    assert not quantized.memory.profile.keeps_image
    weight = quantized.pipeline.transformer.transformer_blocks[0].ff.net[2].weight
    assert "Int8" in type(weight).__name__
    image = quantized.generate(REQUEST)
    assert image.size == (REQUEST.width, REQUEST.height)


def test_8bit_without_torchao_is_refused_saying_what_it_needs(
    tmp_path: Path, tiny_weights: Path
) -> None:
    # A Python in which torchao cannot be imported, as without the fp8 extra.
    hide_torchao = (
        "import sys; sys.modules['torchao'] = None; from ovis_server.cli import main; main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", hide_torchao, "generate", "x", "-o", str(tmp_path / "x.png"),
         "--model", str(tiny_weights), "--device", "cpu", "--memory", "8bit"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "--memory 8bit needs torchao" in result.stderr
    assert "pip install 'ovis-server[fp8]'" in result.stderr


def test_fp8_with_group_offload_is_refused(tiny_weights: Path) -> None:
    with pytest.raises(EngineLoadError, match="--fp8 does not go with --memory group-offload"):
        Engine.load(str(tiny_weights), device="cpu", memory="group-offload-leaf", fp8=True)


def test_generate_says_which_profile_it_used(tmp_path: Path, tiny_weights: Path) -> None:
    result = run_cli(
        "generate", "hello", "-o", str(tmp_path / "out.png"), "--model", str(tiny_weights),
        "--image-size", "128x128", "--steps", "2", "--device", "cpu",
        "--memory", "group-offload-block", "--data-dir", str(tmp_path),
    )  # fmt: skip
    assert "memory profile group-offload-block: asked for with --memory" in result.stderr


def test_memory_options_in_serve_help_and_passed_to_the_worker(tmp_path: Path) -> None:
    help_text = run_cli("serve", "--help").stdout
    assert "--memory [auto|full|text-encoder-offload|8bit|group-offload-block|" in help_text
    assert "--gpu-memory" in help_text
    assert "OVIS_SERVER_GPU_MEMORY" in help_text
    bad = run_cli("worker", "--gpu-memory", "lots", check=False)
    assert bad.returncode == 2
    assert "not a memory size such as 24GiB" in bad.stderr
    env = worker_environment(Settings(data_dir=tmp_path, memory="8bit", gpu_memory="12GiB"))
    passed = Settings.model_validate_json(env[SETTINGS_JSON_ENV])
    assert (passed.memory, passed.gpu_memory) == ("8bit", "12GiB")


def test_memory_sizes_and_choices() -> None:
    assert parse_memory_size("24GiB") == parse_memory_size("24") == 24 * GiB
    assert parse_memory_size("16GB") == 16e9
    assert parse_memory_size("12000 MiB") == 12000 * 2**20
    assert parse_memory_size("0.5") == 0.5  # a fraction of the GPU's memory
    for bad in ("", "0", "-3GiB", "24TB", "lots"):
        with pytest.raises(ValueError, match="not a memory size"):
            parse_memory_size(bad)
    assert config.MEMORY_CHOICES == memory.MEMORY_CHOICES
    settings = Settings(data_dir=Path())
    assert settings.batch_limit("cuda", planned=2) == 2
    assert settings.batch_limit("cuda", planned=9) == 4
    assert settings.batch_limit("cpu", planned=4) == 1


# --- the batch cap: how many of a size fit ----------------------------------------------------


def test_the_plan_caps_a_batch_by_the_size_of_its_images(full_size: ModelSizes) -> None:
    # A 24 GB card: two 1024x1024 images fit in one batch, four 512x512, one 2048x2048.
    card = plan(full_size, 24 * GiB)
    assert card.profile is MemoryProfile.FULL
    assert card.batch_fitting(1024, 1024, 4) == 2 == card.batch_limit
    assert card.batch_fitting(512, 512, 4) == 4
    assert card.batch_fitting(2048, 2048, 4) == 1
    assert card.batch_fitting(512, 512, 2) == 2  # never above the setting
    # Each batch the cap allows is planned to fit, and one more is not.
    usable = memory.usable_bytes(24 * GiB)
    assert memory.planned_peak(full_size, MemoryProfile.FULL, 1024, 1024, 2) <= usable
    assert memory.planned_peak(full_size, MemoryProfile.FULL, 1024, 1024, 3) > usable
    # On a CPU there is no budget: the setting is the cap.
    assert plan(full_size, None, device_type="cpu").batch_fitting(2048, 2048, 8) == 8


def test_the_worker_forms_batches_the_plan_has_room_for(
    store: JobStore, engine: Engine, tmp_path: Path, full_size: ModelSizes
) -> None:
    for size, preset in ((1024, "square_hd"), (512, "square")):
        for n in range(4):
            store.submit(
                NewJob(
                    id=f"{preset}-{n}",
                    token_id="tok_cap",
                    model_id="aidc-ai/ovis-image",
                    input={"prompt": f"a kite {n}", "image_size": preset, "num_inference_steps": 2},
                    seed=n,
                    progress_total=2,
                    batch_key=f"{size}:2",
                )
            )
    files = LocalFileStore(tmp_path / "files", UrlSigner("cap"))

    def worker(plan_made: MemoryPlan | None) -> Worker:
        return Worker(
            store=store,
            files=files,
            engine=engine,
            model=OVIS_IMAGE,
            worker_id="w-cap",
            max_batch=4,
            memory_plan=plan_made,
        )

    # The real model's sizes on a 24 GB card, though the tiny model is loaded: the cap
    # reads the plan, not the device.
    on_24gb = worker(plan(full_size, 24 * GiB))
    assert [len(on_24gb.claim()) for _ in range(3)] == [2, 2, 4]
    assert on_24gb.claim() == []
    # Without a budget (the CPU's plan), --max-batch alone caps it.
    head = store.get("square_hd-0")
    assert head is not None
    assert worker(None).batch_cap(head) == 4
