"""The CPU probe never promises a path that would crash, and the baseline switch takes the
path that needs no optional CPU feature."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType
from stage_runner import full_logits, kl_and_top1, whole
from tiny_cases import ALL_CASES, TinyFiles, token_batch

from ppinfer.kernels import build
from ppinfer.kernels.capabilities import BASELINE_ENV, cpu_capabilities
from ppinfer.kernels.cpu import BlockLinear


def test_probe_promises_only_what_onednn_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the probe says oneDNN prepacks a dtype, packing and a product in that dtype work
    on this CPU (on an AVX2-only CPU bfloat16 packing raises, so the probe must say no)."""
    monkeypatch.delenv(BASELINE_ENV, raising=False)
    caps = cpu_capabilities()
    for dtype in (torch.float32, torch.bfloat16):
        if not caps.prepacks(dtype):
            continue
        weight = torch.randn(8, 16).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 4)
        x = torch.randn(4, 16).to(dtype)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        torch.testing.assert_close(y.float(), (x.float() @ weight.float().T), rtol=2e-2, atol=2e-2)


def test_baseline_switch_disables_optional_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BASELINE_ENV, "1")
    caps = cpu_capabilities()
    assert caps.baseline
    assert not caps.prepacks(torch.bfloat16) and not caps.prepacks(torch.float16)
    assert "plain F.linear" in caps.describe(torch.bfloat16) and "forced baseline" in caps.describe(torch.bfloat16)
    monkeypatch.setenv(BASELINE_ENV, "0")
    assert not cpu_capabilities().baseline


def test_baseline_quantized_stage_runs_the_portable_kernels(
    tiny_files: TinyFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CPU without AVX2 runs the portable block kernels, and they compute the model."""
    spec, path = ALL_CASES["llama_q4_1"], tiny_files.path("llama_q4_1")
    ids = token_batch(spec)
    exact = full_logits(whole(path, spec.n_layer), ids)
    monkeypatch.setenv(BASELINE_ENV, "1")
    stage = whole(path, spec.n_layer, "quantized")
    assert stage.weights_report.block_kernel == "block kernels (scalar)"
    got = full_logits(stage, ids)
    assert kl_and_top1(exact, got)[0] < 1e-3


def test_stage_table_names_the_instruction_set_taken(tiny_files: TinyFiles) -> None:
    """Without the baseline switch the stage takes the best variant this CPU runs, and says which
    and which types it holds packed (all its Q4_1 layers then are)."""
    spec, path = ALL_CASES["llama_q4_1"], tiny_files.path("llama_q4_1")
    stage = whole(path, spec.n_layer, "quantized")
    best = next(name for name in ("avx512vnni", "avxvnni", "avx2", "scalar") if not build.ops().isa_unavailable(name))
    if best == "scalar":
        assert stage.weights_report.block_kernel == "block kernels (scalar)"
        return
    assert stage.weights_report.block_kernel == f"block kernels ({best}; Q4_0/Q4_1/Q4_K/Q8_0 rows packed by 16)"
    layers = [m for m in stage.modules() if isinstance(m, BlockLinear) and m.qtype == GGMLQuantizationType.Q4_1]
    assert layers and all(m.packed for m in layers)
