"""The transformers peer: `python -m ppinfer.bench.peer SPEC.json`, started by the sweep.

Loads the same GGUF file with transformers (`AutoModelForCausalLM.from_pretrained(dir,
gguf_file=..., dtype=float32)`), then for each job times `generate` on one left-padded batch
of the job's prompts, greedy, with exactly `max_new_tokens` new tokens (`min_new_tokens` keeps
EOS from ending a sequence early, the peer's equivalent of `ignore_eos`). The prompts are
tokenized with ppinfer's tokenizer so both sides see the same ids.

Measured like the pipeline runtime: time to first token (prefill plus the first sample),
prefill tokens/s = real (unpadded) prompt tokens / TTFT, decode tokens/s = tokens sampled after
the first / (total time - TTFT). A streamer stamps the time of each step's tokens, which
separates the two phases inside one `generate` call. Each job writes a metrics file shaped
like the runtime's (one "stage"), without the pipeline-only fields.

SPEC.json: {"model": FILE, "threads": T, "jobs": [{"prompts_file", "max_new_tokens", "out"}]}.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.generation.streamers import BaseStreamer

from ppinfer.pipeline.outputs import write_json_atomic
from ppinfer.profiling.metrics import current_rss_bytes, peak_rss_bytes
from ppinfer.text.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("ppinfer.bench.peer")


class TokenClock(BaseStreamer):
    """Records when `generate` hands over each step's tokens (the first call is the prompt)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        """Nothing to flush: only the times matter."""


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, both [B, T], each prompt right-aligned (left padding) so
    that every sequence's next token lands in the same column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # [B, T]
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def load_model(path: Path) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def _generate(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, pad_id: int,
              clock: BaseStreamer | None) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, num_beams=1, pad_token_id=pad_id, streamer=clock,
        )


def measure(model: PreTrainedModel, tokenizer: Tokenizer, texts: Sequence[str], new_tokens: int) -> dict[str, Any]:
    """Time one greedy `generate` of `new_tokens` tokens for all `texts` as one batch."""
    prompts = [tokenizer.encode(t) for t in texts]
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    ids, mask = left_padded(prompts, pad_id)
    # A short untimed call first, so one-off kernel initialisation does not count against the
    # peer (the comparison stays conservative for ppinfer).
    _generate(model, ids[:1], mask[:1], 2, pad_id, None)
    clock = TokenClock()
    start = time.perf_counter()
    out = _generate(model, ids, mask, new_tokens, pad_id, clock)
    end = time.perf_counter()
    produced = out.shape[1] - ids.shape[1]
    if produced != new_tokens or len(clock.stamps) != new_tokens + 1:
        raise RuntimeError(f"generate made {produced} tokens in {len(clock.stamps) - 1} steps, expected {new_tokens}")
    batch = len(prompts)
    ttft = clock.stamps[1] - start
    decode_s = end - clock.stamps[1]
    prompt_tokens = sum(len(p) for p in prompts)
    return {
        "runner": "transformers",
        "stages": 1,
        "threads_per_rank": torch.get_num_threads(),
        "microbatches": 1,
        "lane_size": batch,
        "sequences": batch,
        "prompt_tokens": prompt_tokens,
        "generated_tokens": batch * new_tokens,
        "prefill_tokens_per_s": prompt_tokens / ttft,
        "decode_tokens_per_s": batch * (new_tokens - 1) / decode_s if new_tokens > 1 else 0.0,
        "time_to_first_token_s": ttft,
        "wall_s": end - start,
    }


def main(argv: Sequence[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="[peer] %(message)s", stream=sys.stderr)
    if len(argv) != 1:
        raise SystemExit("usage: python -m ppinfer.bench.peer SPEC.json")
    # The baseline is a process that has imported torch and transformers but loaded nothing.
    baseline = current_rss_bytes()
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    torch.set_num_threads(int(spec["threads"]))
    path = Path(spec["model"])
    tokenizer = load_tokenizer(path)
    started = time.perf_counter()
    model = load_model(path)
    log.info("loaded %s in %.1f s", path.name, time.perf_counter() - started)
    for job in spec["jobs"]:
        lines = Path(job["prompts_file"]).read_text(encoding="utf-8").splitlines()
        texts = [line for line in lines if line.strip()]
        metrics = measure(model, tokenizer, texts, int(job["max_new_tokens"]))
        peak = peak_rss_bytes()
        metrics["model"] = str(path)
        metrics["transformers_version"] = version("transformers")
        metrics["per_stage"] = [
            {"stage": 0, "peak_rss_bytes": peak, "peak_rss_above_baseline_bytes": peak - baseline},
        ]
        write_json_atomic(Path(job["out"]), metrics)
        log.info("%d sequences: prefill %.1f tok/s, decode %.1f tok/s, TTFT %.3f s", len(texts),
                 metrics["prefill_tokens_per_s"], metrics["decode_tokens_per_s"], metrics["time_to_first_token_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
