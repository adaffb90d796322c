"""`python -m ppinfer.bench.kv_memory`: the server's resident memory per cached token, and its
decode rate at 16 and at 64 concurrent sequences.

The server runs on 2 ranks with 64 rows (`server.lane_size=32`). After one warm-up request the
ranks' resident memory (summed) is the baseline; then 16 and then 64 concurrent completions of
distinct `--prompt-tokens`-token prompts (token ids, so every prompt caches its own blocks; the
64 include the 16) with `--new-tokens` new tokens each (`ignore_eos`), the memory read after
each wave. Growth per cached token = (memory after the 64 - baseline) / (64 x (prompt + new)),
set against float32 keys and values of the model (2 x layers x KV heads x head size x 4 bytes).

Decode rate: the same 16 and then 64 prompts again, streamed, with `--decode-tokens` new
tokens; their prompts are cached by then (prefix caching), so all of them decode together
after a short prefill. Rate = tokens generated while every request of the wave was decoding
(from the last first token to the first end; each request's tokens counted at an even pace
between its first token and its end) / that window's seconds.

    python -m ppinfer.bench.kv_memory model.path=FILE [--kv-dtype float16] [override ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil

from ppinfer.bench.server import running_server
from ppinfer.families import read_hparams
from ppinfer.gguf import GGUFFile

LANE_SIZE = 32
WAVES = (16, 64)


@dataclass
class Timing:
    """One streamed request: when its first text came, when it ended, tokens it generated."""

    first: float
    end: float
    tokens: int


def rank_rss(port: int) -> int:
    """Resident bytes of the server's ranks (not torchrun's own process), summed."""
    total = 0
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if f"server.port={port}" in cmd and "torch.distributed.run" not in cmd:
            total += proc.memory_info().rss
    return total


def kv_bytes_float32(path: Path) -> int:
    """Bytes of float32 keys and values one token takes over every layer of `path`'s model."""
    hp = read_hparams(GGUFFile(path))
    return sum(2 * layer.n_head_kv * hp.head_dim * 4 for layer in hp.layers)


def prompts(n: int, tokens: int, seed: int = 0) -> list[list[int]]:
    """`n` distinct prompts of `tokens` ordinary token ids (random, so no two share a block)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(1000, 20000, size=tokens).tolist() for _ in range(n)]


def _complete(url: str, model: str, prompt: list[int], new_tokens: int) -> Timing:
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    first, tokens = None, 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=3600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if first is None and any(c.get("text") for c in chunk.get("choices") or []):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    if first is None or tokens != new_tokens:
        raise RuntimeError(f"a request streamed no text or {tokens} of {new_tokens} tokens")
    return Timing(first, end, tokens)


def wave(url: str, model: str, batch: list[list[int]], new_tokens: int) -> list[Timing]:
    """Send `batch` at once; each request's timing."""
    with ThreadPoolExecutor(len(batch)) as pool:
        return list(pool.map(lambda p: _complete(url, model, p, new_tokens), batch))


def decode_rate(timings: list[Timing]) -> float:
    """Tokens per second while every request was decoding (0 if they never all were)."""
    start, end = max(t.first for t in timings), min(t.end for t in timings)
    if end <= start:
        return 0.0
    tokens = sum((t.tokens - 1) * (end - start) / (t.end - t.first) for t in timings)
    return tokens / (end - start)


def run(args: argparse.Namespace) -> dict[str, float]:
    model_path = Path(next(o for o in args.overrides if o.startswith("model.path=")).split("=", 1)[1])
    out = Path(tempfile.mkdtemp(prefix="ppinfer-kv-memory-"))
    overrides = [f"output.dir={out}", f"server.lane_size={LANE_SIZE}", f"runtime.kv_dtype={args.kv_dtype}",
                 *args.overrides]
    every = prompts(max(WAVES), args.prompt_tokens)
    figures: dict[str, float] = {}
    with running_server(overrides, args.port, args.nproc, log=out / "server.log") as (url, model):
        wave(url, model, prompts(1, args.prompt_tokens, seed=1), args.new_tokens)
        base = rank_rss(args.port)
        figures["baseline_mib"] = base / 2**20
        for n in WAVES:
            started = time.perf_counter()
            wave(url, model, every[:n], args.new_tokens)
            figures[f"wall_{n}_s"] = time.perf_counter() - started
            figures[f"growth_{n}_mib"] = (rank_rss(args.port) - base) / 2**20
        cached = max(WAVES) * (args.prompt_tokens + args.new_tokens)
        figures["cached_tokens"] = cached
        figures["growth_per_token_bytes"] = figures[f"growth_{max(WAVES)}_mib"] * 2**20 / cached
        figures["float32_kv_bytes"] = kv_bytes_float32(model_path)
        figures["ratio_to_float32"] = figures["growth_per_token_bytes"] / figures["float32_kv_bytes"]
        if args.decode_tokens:
            for n in WAVES:
                figures[f"decode_{n}_tok_s"] = decode_rate(wave(url, model, every[:n], args.decode_tokens))
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    parser.add_argument("--port", type=int, default=8473)
    parser.add_argument("--kv-dtype", default="float16")
    parser.add_argument("--prompt-tokens", type=int, default=500)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=128, help="new tokens of the decode-rate waves (0: none)")
    parser.add_argument("overrides", nargs="+", help="launch/serve.py overrides, model.path=... among them")
    args = parser.parse_args(argv)
    if not any(o.startswith("model.path=") for o in args.overrides):
        parser.error("name the model: model.path=FILE")
    print(json.dumps(run(args), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
