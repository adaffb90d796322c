"""Shared fixtures: the real models (fetched once into the user cache, outside the repo)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ppinfer.hub import ensure_model


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (the default model)."""
    return ensure_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """gemma-3-270m Q4_K_M."""
    return ensure_model("gemma-3-270m")
