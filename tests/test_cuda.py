"""The CUDA path (skipped without a GPU): Q4_0 / Q4_1 weights run through torch's int4 kernel
in bfloat16 and stay close to the exact float32 path on the CPU; the stage reports them as
kept in blocks."""

from __future__ import annotations

import pytest
import torch
from ggufgen import QType, with_changes, write_tiny_gguf
from stage_runner import chained_logits, kl_and_top1, whole
from tiny_cases import FAMILY_CASES, token_batch

from ppinfer.kernels.select import BLOCK_LINEARS
from ppinfer.model import build_stage
from ppinfer.plan import StagePlan

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q4_1], ids=lambda q: q.name)
def test_int4_stage_follows_the_exact_path(tmp_path, qtype: QType) -> None:
    spec = with_changes(FAMILY_CASES["llama"], qtype=qtype)
    path = write_tiny_gguf(tmp_path / f"llama_{qtype.name}.gguf", spec)
    ids = token_batch(spec)  # [2, 20]
    exact = chained_logits([whole(path, spec.n_layer)], ids)  # float32, CPU, dequantized
    stage = build_stage(path, StagePlan.whole(spec.n_layer), torch.bfloat16, "cuda", weights="quantized")
    assert stage.weights_report.kept[qtype.name] > 0 and not stage.weights_report.dequantized
    assert any(isinstance(m, BLOCK_LINEARS) for m in stage.modules())
    tokens = torch.from_numpy(ids).cuda()
    b, t = tokens.shape
    with torch.inference_mode():
        hidden = stage.forward(stage.embed(tokens), torch.arange(t, device="cuda").expand(b, t), stage.new_cache(b, t))
        got = stage.lm_head(hidden).float().cpu().numpy()
    kl, top1 = kl_and_top1(exact, got)
    assert kl < 0.01 and top1 >= 0.9, f"bf16 int4 vs exact: KL {kl:.4g}, top-1 {top1:.0%}"
