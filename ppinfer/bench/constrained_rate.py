"""`python -m ppinfer.bench.constrained_rate`: the decode rate of 8 concurrent chat streams
whose answers are constrained by a JSON schema (nested objects, enums, arrays), against the
same 8 streams unconstrained, through `launch/serve.py` on 2 ranks.

Each round sends the 8 constrained requests at once (greedy; each ends when its document is
complete), then the same 8 prompts unconstrained with the end token ignored and `max_tokens`
set to the token count of that prompt's constrained answer, so both sides generate the same
tokens per stream. A stream's decode rate is its tokens after the first over the time from its
first streamed token to its last; the figure is the sum over the 8 streams. Rounds alternate
which side runs first.

    python -m ppinfer.bench.constrained_rate [--rounds 3] [--nproc 2] [override ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from ppinfer.bench.server import running_server

STREAMS = 8
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "kind": {"type": "string", "enum": ["capital", "port", "village", "town"]},
        "mayor": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 24}, "party": {"type": "string", "enum": ["red", "blue", "green"]},
            "years": {"type": "integer"}}, "required": ["name", "party", "years"], "additionalProperties": False},
        "districts": {"type": "array", "minItems": 3, "maxItems": 5, "items": {
            "type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                             "kind": {"type": "string", "enum": ["old", "new", "harbour"]},
                                             "streets": {"type": "array", "minItems": 2, "maxItems": 3,
                                                         "items": {"type": "string", "maxLength": 16}}},
            "required": ["name", "kind", "streets"], "additionalProperties": False}},
    },
    "required": ["city", "kind", "mayor", "districts"],
    "additionalProperties": False,
}
CITIES = ("Paris", "Lisbon", "Oslo", "Naples", "Bruges", "Porto", "Split", "Tallinn")


def _stream(url: str, model: str, body: dict) -> tuple[int, float]:
    """(tokens, seconds from the first streamed token to the last) of one streamed request."""
    times: list[float] = []
    tokens = 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={"model": model, **body, "stream": True,
                      "stream_options": {"include_usage": True}}, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
    return tokens, times[-1] - times[0] if len(times) > 1 else 0.0


def _batch(url: str, model: str, bodies: list[dict]) -> list[tuple[int, float]]:
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: _stream(url, model, body), bodies))


def _rate(results: list[tuple[int, float]]) -> float:
    return sum((tokens - 1) / seconds for tokens, seconds in results if seconds > 0)


def run(rounds: int, nproc: int, port: int, overrides: Sequence[str]) -> list[tuple[float, float, int]]:
    """Per round: (constrained tok/s, unconstrained tok/s, constrained tokens in all)."""
    out = Path(tempfile.mkdtemp(prefix="ppinfer-constrained-"))
    messages = [[{"role": "user", "content": f"Describe the city of {city} as JSON."}] for city in CITIES[:STREAMS]]
    constrained = [{"messages": m, "max_tokens": 400, "temperature": 0,
                    "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}}
                   for m in messages]
    figures = []
    with running_server([f"output.dir={out}", *overrides], port, nproc, log=out / "server.log") as (url, model):
        _batch(url, model, constrained[:2])  # warm up: the vocabulary for the grammar is built once
        lengths = [tokens for tokens, _ in _batch(url, model, constrained)]
        free = [{"messages": m, "max_tokens": n, "temperature": 0, "ignore_eos": True}
                for m, n in zip(messages, lengths)]
        for r in range(rounds):
            if r % 2 == 0:
                with_grammar, without = _batch(url, model, constrained), _batch(url, model, free)
            else:
                without, with_grammar = _batch(url, model, free), _batch(url, model, constrained)
            figures.append((_rate(with_grammar), _rate(without), sum(t for t, _ in with_grammar)))
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ppinfer.bench.constrained_rate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--port", type=int, default=8731)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for launch/serve.py")
    args = parser.parse_args(argv)
    figures = run(args.rounds, args.nproc, args.port, args.overrides)
    for constrained, free, tokens in figures:
        print(f"constrained {constrained:7.1f} tok/s  unconstrained {free:7.1f} tok/s  "
              f"ratio {constrained / free:.3f}  ({tokens} tokens in 8 answers)")
    ratios = [c / f for c, f, _ in figures]
    print(f"median ratio {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
