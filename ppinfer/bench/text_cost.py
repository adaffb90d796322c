"""`python -m ppinfer.bench.text_cost`: the text work per generated token, at token 100 and at
token 4,000 of one answer, as a server stream does it (record the token, check stop strings,
hand out the text that became final).

`incremental` is the path ppinfer runs (`StopState` over `Tokenizer.stream`); `whole` decodes
the whole answer again for every token, as ppinfer did before, for comparison. Each figure is
the median over a window of tokens around the position, on the default model's tokenizer.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

from ppinfer.hub import ensure_model
from ppinfer.sampling.stopping import StopConditions, StopState
from ppinfer.text.tokenizer import Tokenizer, load_tokenizer

POSITIONS = (100, 4000)
WINDOW = 50
"""Tokens timed around each position."""
STOPS = ("\n\nUser:", "<|im_end|>")
"""Stop strings, as a chat client sends them (each token is checked against them)."""


def answer_ids(tokenizer: Tokenizer, length: int) -> list[int]:
    """`length` token ids of ordinary English prose (no stop string in it)."""
    text = "The lighthouse keeper climbed the stairs and looked out over the grey sea. "
    ids: list[int] = []
    while len(ids) < length:
        ids += tokenizer.encode(text, add_bos=False)
    return ids[:length]


def incremental_costs(tokenizer: Tokenizer, ids: Sequence[int]) -> list[float]:
    """Seconds per token of `StopState.append` and `stable_text`."""
    state = StopState(StopConditions(len(ids) + 1, stop_strings=STOPS), tokenizer.stream(skip_special=True))
    costs = []
    for token in ids:
        start = time.perf_counter()
        state.append(token)
        state.stable_text()
        costs.append(time.perf_counter() - start)
    return costs


def whole_costs(tokenizer: Tokenizer, ids: Sequence[int], positions: Sequence[int]) -> dict[int, list[float]]:
    """Seconds per token when the answer so far is decoded whole and searched for the stop
    strings, at the tokens around each of `positions`."""
    costs: dict[int, list[float]] = {}
    for position in positions:
        for n in range(position - WINDOW // 2, position + WINDOW // 2):
            start = time.perf_counter()
            text = tokenizer.decode(ids[:n], skip_special=True)
            for stop in STOPS:
                text.find(stop)
            costs.setdefault(position, []).append(time.perf_counter() - start)
    return costs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ppinfer.bench.text_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a GGUF file (default: the default model)")
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.model or ensure_model())
    ids = answer_ids(tokenizer, max(POSITIONS) + WINDOW)
    incremental = incremental_costs(tokenizer, ids)
    whole = whole_costs(tokenizer, ids, POSITIONS)
    print("| token | incremental (us/token) | whole answer decoded (us/token) |")
    print("|---|---|---|")
    for position in POSITIONS:
        window = incremental[position - WINDOW // 2: position + WINDOW // 2]
        print(
            f"| {position} | {statistics.median(window) * 1e6:.1f} | {statistics.median(whole[position]) * 1e6:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
