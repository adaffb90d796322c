"""The grammar libraries compared on what the last stage pays per constrained token: computing
the mask of allowed tokens and advancing the matcher, on the default model's 49,152-token
vocabulary, along a JSON document valid for a schema with nested objects, an enum and an array.

    python -m ppinfer.bench.grammar_masks [--repeat 20]

Prints, per library, the schema's compile time and the median and 90th percentile of the
per-token mask time (and the advance time) in microseconds. Needs the `xgrammar` package
(the `dev` extra); llguidance is what the server uses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import llguidance
import llguidance.torch
import xgrammar

from ppinfer.hub import ensure_model
from ppinfer.pipeline.sinks import grammar_vocab
from ppinfer.text.tokenizer import load_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "kind": {"enum": ["capital", "port", "village"]},
        "population": {"type": "integer"},
        "location": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                     "required": ["lat", "lon"], "additionalProperties": False},
        "districts": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "kind", "population", "location", "districts"],
    "additionalProperties": False,
}
DOCUMENT = {"name": "Paris", "kind": "capital", "population": 2102650,
            "location": {"lat": 48.8566, "lon": 2.3522},
            "districts": ["Louvre", "Bourse", "Temple", "Hôtel-de-Ville", "Panthéon", "Luxembourg"]}


def _time(step: Callable[[], object]) -> float:
    start = time.perf_counter()
    step()
    return (time.perf_counter() - start) * 1e6


def run_llguidance(vocab, ids: list[int], repeat: int) -> tuple[float, list[float], list[float]]:
    start = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    compile_s = time.perf_counter() - start
    masks, advances = [], []
    bitmask = llguidance.torch.allocate_token_bitmask(1, vocab.size)
    for _ in range(repeat):
        matcher = llguidance.LLMatcher(vocab.tokenizer, grammar, log_level=0)
        for token in ids:
            masks.append(_time(lambda m=matcher: llguidance.torch.fill_next_token_bitmask(m, bitmask, 0)))
            advances.append(_time(lambda m=matcher, t=token: m.consume_token(t)))
            assert not matcher.is_error(), matcher.get_error()
    return compile_s, masks, advances


def run_xgrammar(
    pieces: list[bytes], eos: list[int], ids: list[int], repeat: int
) -> tuple[float, list[float], list[float]]:
    info = xgrammar.TokenizerInfo(pieces, vocab_type=xgrammar.VocabType.RAW, vocab_size=len(pieces),
                                  stop_token_ids=eos)
    compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
    compile_s = time.perf_counter() - start
    masks, advances = [], []
    bitmask = xgrammar.allocate_token_bitmask(1, len(pieces))
    for _ in range(repeat):
        matcher = xgrammar.GrammarMatcher(compiled)
        for token in ids:
            masks.append(_time(lambda m=matcher: m.fill_next_token_bitmask(bitmask)))
            advances.append(_time(lambda m=matcher, t=token: m.accept_token(t)))
    return compile_s, masks, advances


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    tokenizer = load_tokenizer(ensure_model("smollm2-135m-instruct"))
    ids = tokenizer.encode(json.dumps(DOCUMENT, separators=(",", ":"), ensure_ascii=False), add_bos=False,
                           parse_special=False)
    eos = sorted(tokenizer.eog_ids)
    ids.append(eos[0])
    pieces = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
    start = time.perf_counter()
    vocab = grammar_vocab(tokenizer)
    print(f"vocabulary {tokenizer.vocab_size} tokens, document {len(ids)} tokens x {args.repeat}; "
          f"llguidance vocabulary built in {time.perf_counter() - start:.2f} s")
    results = {"llguidance": run_llguidance(vocab, ids, args.repeat),
               "xgrammar": run_xgrammar(pieces, eos, ids, args.repeat)}
    print(f"{'library':<11} {'compile ms':>10} {'mask p50 us':>12} {'mask p90 us':>12} {'mask mean us':>13} "
          f"{'advance p50 us':>15}")
    for name, (compile_s, masks, advances) in results.items():
        p90 = statistics.quantiles(masks, n=10)[-1]
        print(f"{name:<11} {compile_s * 1e3:>10.1f} {statistics.median(masks):>12.1f} {p90:>12.1f} "
              f"{statistics.fmean(masks):>13.1f} {statistics.median(advances):>15.1f}")


if __name__ == "__main__":
    main()
