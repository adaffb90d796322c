"""How far the quantized path's next-token distributions sit from the exact path, beside
llama.cpp's on the same tokens: `python -m ppinfer.bench.quant_kl [--model FILE]`.

One fixed English text (prose, a little code, and the benchmark's 32 short prompts one per
line) is tokenized by ppinfer's tokenizer and
scored three times, each in chunks of `--chunk` tokens: ppinfer with `runtime.weights=dequantized`
(the exact float32 path: the reference), ppinfer with `runtime.weights=quantized` (the block
kernels: 8-bit activations), and llama.cpp (llama-cpp-python, `logits_all`, `n_batch` =
`n_ubatch` = the chunk). Printed per path: the mean over positions of KL(exact || path) and the
share of positions whose top token matches the exact path's; and, per position, ppinfer's KL
less llama.cpp's: its mean with the standard error of that mean, so a difference can be told
from the text's noise. The ppinfer runs go through
`torchrun launch/infer.py task=score` like any user's (logits.npy); llama.cpp runs in this
process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ppinfer.bench.prompts import SHORT_PROMPTS
from ppinfer.bench.sweep import infer_script, llamacpp_installed
from ppinfer.hub import ensure_model
from ppinfer.text.tokenizer import load_tokenizer

TEXT = (
    "Maps were drawn long before anyone could see the land from above. Early surveyors walked "
    "the roads with chains of fixed length, counting links and noting every bend, and the "
    "distances they wrote down were stitched together at night by candlelight. A coastline was "
    "the hardest part: the tide moved it twice a day, and a cliff that looked sharp from a boat "
    "became a gentle slope when seen from the beach. Some mapmakers filled the empty corners "
    "with sea serpents, not because they believed in them, but because a blank space made the "
    "buyer think the map was unfinished.\n\n"
    "Bread is a small miracle of chemistry. Flour and water alone make a paste; add yeast and "
    "time, and the paste fills with bubbles of gas that the gluten traps like a net. Bakers "
    "learned to read the dough with their hands long before anyone could explain why a cold "
    "kitchen slowed the rise or why salt made the crust brown. A good loaf still depends on "
    "patience more than on any machine.\n\n"
    "def mean(values):\n    total = 0\n    for v in values:\n        total += v\n"
    "    return total / len(values)\n\n"
    "The committee met on Tuesday to discuss the budget for the new library. Three members "
    "wanted more money for children's books, two argued for longer opening hours, and the "
    "chair, who had been a librarian for thirty years, asked everyone to visit the old building "
    "on a rainy Saturday before they voted. The vote was postponed until the following month."
)
"""Held-out prose, a little code and a list of facts: ordinary text the model has not been
tuned on here (written for this benchmark)."""


def kl_per_position(exact: np.ndarray, other: np.ndarray) -> np.ndarray:
    """exact, other [T, vocab] logits -> [T] KL(exact || other) at each position, in float64."""
    a = exact.astype(np.float64)
    b = other.astype(np.float64)
    log_p = a - a.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    log_q = b - b.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    return (np.exp(log_p) * (log_p - log_q)).sum(-1)  # [T]


def ppinfer_logits(model: Path, ids: Sequence[int], weights: str, chunk: int, threads: int) -> np.ndarray:
    """[T, vocab] logits of `task=score` over `ids` on one stage."""
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(infer_script()),
            f"model.path={model}", "task=score", f"input.token_ids={json.dumps(list(ids))}",
            f"runtime.weights={weights}", f"runtime.threads={threads}", f"pipeline.prefill_chunk={chunk}",
            f"output.dir={out}",
        ]
        subprocess.run(command, check=True, capture_output=True, text=True)
        return np.load(Path(out) / "logits.npy")


def llamacpp_logits(model: Path, ids: Sequence[int], chunk: int, threads: int) -> np.ndarray:
    """[T, vocab] logits of llama.cpp over `ids`, decoded `chunk` tokens per batch."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(model), n_ctx=len(ids) + 16, n_batch=chunk, n_ubatch=chunk, n_threads=threads,
        n_threads_batch=threads, logits_all=True, verbose=False,
    )
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--chunk", type=int, default=8, help="tokens per scoring step (default 8)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    model = args.model or ensure_model("smollm2-135m-instruct")
    ids = load_tokenizer(model).encode(TEXT + "\n\n" + "\n".join(SHORT_PROMPTS))
    exact = ppinfer_logits(model, ids, "dequantized", args.chunk, args.threads)
    rows = {"ppinfer quantized": ppinfer_logits(model, ids, "quantized", args.chunk, args.threads)}
    if llamacpp_installed():
        rows["llama.cpp"] = llamacpp_logits(model, ids, args.chunk, args.threads)
    else:
        print("llama-cpp-python is not installed: its row is left out")
    print(f"{model.name}: {len(ids)} tokens, chunks of {args.chunk}, KL(exact || path) over positions")
    kl = {name: kl_per_position(exact, logits) for name, logits in rows.items()}  # name -> [T]
    for name, logits in rows.items():
        top1 = float((exact.argmax(-1) == logits.argmax(-1)).mean())
        print(f"  {name:18s} mean KL {kl[name].mean():.5f}  top-1 agreement {top1:.1%}")
    if "llama.cpp" in kl:
        diff = kl["ppinfer quantized"] - kl["llama.cpp"]  # [T]
        se = diff.std(ddof=1) / np.sqrt(len(diff))
        print(f"  ppinfer - llama.cpp per position: mean {diff.mean():+.5f}, standard error {se:.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
