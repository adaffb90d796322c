"""`python -m ppinfer.bench.prefix_ttft`: time to first token of 8 chat requests that share a
long system prompt (868 tokens on SmolLM2's vocabulary), sent one after another to
`launch/serve.py` on 2 ranks, with prefix caching on and then off.

The first request prefills the whole prompt; with `server.prefix_cache` the later ones start
on its cached blocks and prefill only their question. Time to first token is measured to the
first streamed chunk with text (OpenAI's stream opens with an empty role chunk, sent before
any work).

    python -m ppinfer.bench.prefix_ttft [--nproc 2] [override ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from ppinfer.bench.server import running_server

PARAGRAPH = (
    "The lighthouse keeper climbed the narrow stairs every evening, trimmed the wick and polished the "
    "great lens until it shone over the harbour, the rocks and the grey water beyond. "
)
SYSTEM = "You answer questions about the harbour. Background: " + PARAGRAPH * 26
QUESTIONS = (
    "Who climbed the stairs?", "What was polished?", "What did the light shine over?", "When?",
    "What colour was the water?", "What was trimmed?", "Where is the harbour?", "Why the lens?",
)


def _first_text_s(url: str, model: str, question: str) -> float:
    body = {
        "model": model, "max_tokens": 8, "temperature": 0, "stream": True,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
    }
    start, first = time.perf_counter(), None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if first is None and line.startswith("data: {"):
                choices = json.loads(line.removeprefix("data: ")).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    first = time.perf_counter() - start
    if first is None:
        raise RuntimeError(f"no text streamed for {question!r}")
    return first


def run(nproc: int, port: int, overrides: Sequence[str]) -> list[float]:
    """Start the server, send the 8 requests in turn, stop it; each one's seconds to first text."""
    out = Path(tempfile.mkdtemp(prefix="ppinfer-prefix-ttft-"))
    with running_server([f"output.dir={out}", *overrides], port, nproc, log=out / "server.log") as (url, model):
        return [_first_text_s(url, model, q) for q in QUESTIONS]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    parser.add_argument("--port", type=int, default=8471)
    parser.add_argument("overrides", nargs="*", help="launch/serve.py overrides (e.g. model.path=...)")
    args = parser.parse_args(argv)
    print("| prefix cache | first request, ms | later requests, ms | later / first |")
    print("|---|---|---|---|")
    for cache in ("true", "false"):
        times = run(args.nproc, args.port, [*args.overrides, f"server.prefix_cache={cache}"])
        later = times[1:]
        print(f"| {cache} | {times[0] * 1e3:.0f} | {min(later) * 1e3:.0f}-{max(later) * 1e3:.0f} "
              f"| {max(later) / times[0]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
