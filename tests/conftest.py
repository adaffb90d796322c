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


ISAS = ("avx512vnni", "avxvnni", "avx2", "scalar")  # the kernels' instruction sets, best first


def _select_isa(ops, isa: str) -> None:
    """Makes the kernels run `isa`, or skips the test with the reason this CPU or build lacks it."""
    reason = ops.isa_unavailable(isa)
    if reason:
        pytest.skip(f"{isa}: {reason}")
    ops.set_isa(isa)


@pytest.fixture(params=ISAS)
def isa(ops, request):
    """Runs the test once per instruction set of the kernels (those this CPU lacks are skipped
    with the reason); restores "auto" after it."""
    _select_isa(ops, request.param)
    yield request.param
    ops.set_isa("auto")


@pytest.fixture
def use_isa(ops):
    """Yields a function that selects the kernels' instruction set, skipping the test where this
    CPU lacks it; restores "auto" after the test."""
    yield lambda name: _select_isa(ops, name)
    ops.set_isa("auto")
