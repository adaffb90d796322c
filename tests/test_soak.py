"""Soak: 200 sequences through 2 stages with 3 lanes, against a 1-stage run of the same job.

Prompts of 3 to 53 tokens (prefilled in chunks of 16), lanes of up to 8 sequences served in
waves, and three ways to stop mixed together: the end-of-generation token, a stop string and
`max_new_tokens`. Every sequence must come back exactly once, in prompt order, with the same
tokens, text and finish reason as the single-stage run. Both runs use one thread per rank and
the same lane layout, so the only difference is the split into stages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pipeline_models import PIPELINE_SPECS, TokenizerChoice, write_pipeline_model
from torchrun_job import run_job

N_SEQUENCES = 200
WORDS = ("the", "cat", "sat", "on", "a", "mat", "in", "sun", "then", "ran")
EOS_ID = 2
"""The byte 0x02 as end-of-generation: this random model emits it now and then, so some
sequences end on it (any id of the vocabulary may be a file's EOS)."""
STOP = "%"
"""A character the model emits now and then: some sequences end on this stop string."""
MAX_NEW_TOKENS = 12
JOB_LIMIT_S = 240.0


def prompts() -> list[str]:
    """Mixed lengths: 3 to 53 tokens."""
    return [f"{i}: " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(i % 17)) for i in range(N_SEQUENCES)]


def run_generate(model: Path, prompts_file: Path, out_dir: Path, stages: int) -> list[dict[str, Any]]:
    overrides = [
        f"model.path={model}", f"output.dir={out_dir}", f"prompts_file={prompts_file}",
        "runtime.device=cpu", "runtime.threads=1", "pipeline.microbatches=3", "pipeline.lane_size=8",
        "pipeline.prefill_chunk=16", f"generation.max_new_tokens={MAX_NEW_TOKENS}",
        f"generation.stop=['{STOP}']",
    ]
    result = run_job(stages, overrides, JOB_LIMIT_S)
    assert result.returncode == 0, result.output[-4000:]
    assert not result.leftovers, result.leftovers
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert (metrics["stages"], metrics["microbatches"], metrics["sequences"]) == (stages, 3, N_SEQUENCES)
    return [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_200_sequences_two_stages_match_one_stage(tmp_path: Path) -> None:
    model = write_pipeline_model(tmp_path / "tiny.gguf", PIPELINE_SPECS["llama"], TokenizerChoice(eos_id=EOS_ID))
    texts = prompts()
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))

    piped = run_generate(model, prompts_file, tmp_path / "two", stages=2)
    single = run_generate(model, prompts_file, tmp_path / "one", stages=1)

    assert [r["index"] for r in piped] == list(range(N_SEQUENCES)), "each sequence exactly once, in order"
    assert [r["prompt"] for r in piped] == texts
    lengths = {len(r["prompt_ids"]) for r in piped}
    assert min(lengths) <= 5 and max(lengths) >= 40, f"prompt lengths not mixed: {sorted(lengths)}"
    fields = ("prompt_ids", "token_ids", "text", "finish_reason")
    for two, one in zip(piped, single, strict=True):
        assert {f: two[f] for f in fields} == {f: one[f] for f in fields}, f"sequence {two['index']}"

    # The soak must have exercised every way to stop, or it proves less than it claims.
    stopped = [r["token_ids"] for r in piped if r["finish_reason"] == "stop"]
    on_eos = [ids for ids in stopped if ids[-1] == EOS_ID]
    on_string = [ids for ids in stopped if ids[-1] != EOS_ID]
    on_length = [r["token_ids"] for r in piped if r["finish_reason"] == "length"]
    assert on_eos and on_string and on_length, (len(on_eos), len(on_string), len(on_length))
    assert all(len(ids) == MAX_NEW_TOKENS for ids in on_length)
