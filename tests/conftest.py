"""Shared fixtures: the real models (fetched once into the user cache, outside the repo), the
tiny GGUF files of every family, and the compiled CPU kernels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_cases import TinyFiles

from ppinfer.config import register_configs
from ppinfer.hub import ensure_model
from ppinfer.kernels import build

register_configs()  # tests compose configs the way the entry points do


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (the default model)."""
    return ensure_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """gemma-3-270m Q4_K_M."""
    return ensure_model("gemma-3-270m")


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> TinyFiles:
    """The tiny GGUF files of every family, written once per session on first use."""
    return TinyFiles(tmp_path_factory.getbasetemp() / "tiny_gguf")


@pytest.fixture(scope="module")
def ops():
    """The compiled CPU block kernels (torch.ops.ppinfer_kernels); the tests need them built."""
    reason = build.unavailable_reason()
    assert reason is None, reason
    return torch.ops.ppinfer_kernels


@pytest.fixture
def use_isa(ops):
    """Yields a function that selects the kernels' instruction set ("auto", "scalar", ...),
    skipping the test where this CPU lacks it; restores "auto" after the test."""

    def select(isa: str) -> None:
        ops.set_isa(isa)
        if isa == "auto" and ops.isa() != "avx2":
            pytest.skip("this CPU has no AVX2+FMA+F16C")

    yield select
    ops.set_isa("auto")
