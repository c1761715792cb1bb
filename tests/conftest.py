"""Fixtures shared by the suite: the tiny checkpoint and a loaded engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from ovis_server.engine.pipeline import Engine

from .helpers import run_cli


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint written once per session by ``ovis-server tiny-model``."""
    directory = tmp_path_factory.mktemp("weights") / "tiny"
    run_cli("tiny-model", str(directory))
    return directory


@pytest.fixture(scope="session")
def engine(tiny_weights: Path) -> Engine:
    return Engine.load(str(tiny_weights), device="cpu")
