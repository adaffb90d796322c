"""`python -m ppinfer.bench.kv_greedy MODEL [--chat]`: how many greedy answers float16 keys and
values change against float32 ones, in ppinfer and in llama.cpp on the same GGUF file.

ppinfer: one `torchrun launch/infer.py` per KV type (`runtime.kv_dtype`), the first `--prompts`
built-in prompts (`ppinfer.bench.prompts`) in one lane on 1 rank, greedy, up to `--new-tokens`
tokens, stopping at an end-of-generation token; the token ids are read from results.jsonl.

llama.cpp: one fresh process per point (`ppinfer/bench/llamacpp.py`: llama-cpp-python's low-level
API, weights kept out of AMX buffers), fed the prompt ids of ppinfer's float32 run, so that
tokenization is no variable; every prompt in one batch and one unified cache, greedy, each answer
cut after its first end-of-generation token as ppinfer cuts it. Keys and values are F32 or F16
(`type_k = type_v` = GGML type 0 or 1) with flash attention off, and F16 with flash attention
on (llama.cpp's CPU default; its flash attention casts an F32 cache to F16 first, so F32 with
flash attention on would be the F16 run again).

Printed: for each pair of runs, the answers that differ (of the prompts), the index of the first
differing token of each (0 = the first new token), and their median. `--out DIR` keeps the
runs' token ids (one JSON file per run) and logs.

    python -m ppinfer.bench.kv_greedy ~/.cache/ppinfer/models/SmolLM2-135M-Instruct.Q4_1.gguf --chat
    python -m ppinfer.bench.kv_greedy MODEL -- runtime.weights=dequantized   # ppinfer overrides
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from ppinfer.bench.prompts import short_prompts
from ppinfer.bench.sweep import hydra_value, infer_script, llamacpp_command, llamacpp_installed, run_logged
from ppinfer.text.tokenizer import load_tokenizer

KV_TYPES = {"f32": ("float32", 0), "f16": ("float16", 1)}
"""KV type -> (ppinfer's `runtime.kv_dtype`, llama.cpp's GGML type)."""
TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class Answers:
    """One run's greedy answers: each prompt's new token ids."""

    name: str
    tokens: list[list[int]]


@dataclass(frozen=True)
class Change:
    """How two runs' answers to the same prompts differ."""

    changed: list[tuple[int, int]]
    """(prompt, index of the first differing token) of each answer that differs."""
    prompts: int

    @property
    def median_first(self) -> float | None:
        return statistics.median(i for _, i in self.changed) if self.changed else None


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first token where `a` and `b` differ (the shorter one's length when one
    is a prefix of the other), None when they are equal."""
    if list(a) == list(b):
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(a: Answers, b: Answers) -> Change:
    if len(a.tokens) != len(b.tokens):
        raise ValueError(f"{a.name} has {len(a.tokens)} answers, {b.name} {len(b.tokens)}")
    changed = [(p, i) for p, (x, y) in enumerate(zip(a.tokens, b.tokens)) if (i := first_difference(x, y)) is not None]
    return Change(changed, len(a.tokens))


def cut_at_end(tokens: Sequence[int], eog_ids: Collection[int]) -> list[int]:
    """`tokens` up to and including the first end-of-generation token (ppinfer's stop rule)."""
    out = []
    for t in tokens:
        out.append(t)
        if t in eog_ids:
            break
    return out


def run_ppinfer(model: Path, kv: str, prompts_file: Path, count: int, args: argparse.Namespace,
                out: Path) -> tuple[Answers, list[list[int]]]:
    """ppinfer's answers with keys and values in `kv`, and the prompts' token ids."""
    run_dir = out / f"ppinfer-{kv}"
    overrides = [
        f"model.path={hydra_value(str(model))}", f"prompts_file={hydra_value(str(prompts_file))}",
        f"output.dir={hydra_value(str(run_dir))}", f"pipeline.lane_size={count}", f"runtime.threads={args.threads}",
        "runtime.device=cpu", f"generation.max_new_tokens={args.new_tokens}", "generation.temperature=0.0",
        f"chat={'true' if args.chat else 'false'}", f"runtime.kv_dtype={KV_TYPES[kv][0]}", *args.overrides,
    ]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               str(infer_script()), *overrides]
    if run_logged(command, out / f"ppinfer-{kv}.log", TIMEOUT_S) != 0:
        raise RuntimeError(f"the ppinfer run failed, see {out / f'ppinfer-{kv}.log'}")
    lines = (run_dir / "results.jsonl").read_text(encoding="utf-8").splitlines()
    results = sorted((json.loads(line) for line in lines), key=lambda r: r["index"])
    return Answers(f"ppinfer {kv}", [r["token_ids"] for r in results]), [r["prompt_ids"] for r in results]


def run_llamacpp(model: Path, kv: str, flash: bool, prompts: list[list[int]], eog_ids: Collection[int],
                 args: argparse.Namespace, out: Path) -> Answers:
    """llama.cpp's answers with keys and values in `kv`, flash attention on or off."""
    name = f"llama.cpp {kv} fa={'on' if flash else 'off'}"
    stem = f"llamacpp-{kv}-fa{int(flash)}"
    ggml_type = KV_TYPES[kv][1]
    spec = {"model": str(model), "threads": args.threads, "new_tokens": args.new_tokens, "prompts": prompts,
            "out": str(out / f"{stem}.json"), "drop_buffer_types": ["AMX"],
            "context": {"type_k": ggml_type, "type_v": ggml_type, "flash_attn_type": int(flash)}}
    spec_file = out / f"{stem}.spec.json"
    spec_file.write_text(json.dumps(spec), encoding="utf-8")
    if run_logged(llamacpp_command(spec_file), out / f"{stem}.log", TIMEOUT_S) != 0:
        raise RuntimeError(f"the llama.cpp run failed, see {out / f'{stem}.log'}")
    tokens = json.loads((out / f"{stem}.json").read_text(encoding="utf-8"))["tokens"]
    return Answers(name, [cut_at_end(t, eog_ids) for t in tokens])


def table(pairs: Sequence[tuple[Answers, Answers]]) -> str:
    """Markdown rows: each pair's changed answers, first differing tokens and their median."""
    rows = ["| runs compared | answers changed | first differing token (prompt: index) | median index |",
            "|---|---|---|---|"]
    for a, b in pairs:
        change = compare(a, b)
        firsts = ", ".join(f"{p}: {i}" for p, i in change.changed) or "-"
        median = "-" if change.median_first is None else f"{change.median_first:g}"
        rows.append(f"| {b.name} vs {a.name} | {len(change.changed)} / {change.prompts} | {firsts} | {median} |")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> str:
    model = args.model.expanduser().resolve()
    out = args.out or Path(tempfile.mkdtemp(prefix="ppinfer-kv-greedy-"))
    out.mkdir(parents=True, exist_ok=True)
    prompts_file = out / "prompts.txt"
    prompts_file.write_text("".join(f"{p}\n" for p in short_prompts(args.prompts)), encoding="utf-8")
    f32, ids = run_ppinfer(model, "f32", prompts_file, args.prompts, args, out)
    f16, _ = run_ppinfer(model, "f16", prompts_file, args.prompts, args, out)
    pairs = [(f32, f16)]
    runs = [f32, f16]
    if llamacpp_installed() and not args.no_llamacpp:
        eog = load_tokenizer(model).eog_ids
        lc = {(kv, flash): run_llamacpp(model, kv, flash, ids, eog, args, out)
              for kv, flash in (("f32", False), ("f16", False), ("f16", True))}
        runs += lc.values()
        exact = lc["f32", False]
        pairs += [(exact, lc["f16", False]), (exact, lc["f16", True]), (f32, exact), (f16, lc["f16", False])]
    for answers in runs:
        name = answers.name.replace(" ", "-").replace("=", "")
        (out / f"answers-{name}.json").write_text(json.dumps(answers.tokens), encoding="utf-8")
    return table(pairs)


def title(args: argparse.Namespace) -> str:
    return (f"{args.model.name}: {args.prompts} prompts x {args.new_tokens} new tokens, greedy, "
            f"chat={'on' if args.chat else 'off'}, {args.threads} threads, {' '.join(args.overrides) or 'defaults'}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="the GGUF file")
    parser.add_argument("--chat", action="store_true", help="wrap the prompts in the model's chat template")
    parser.add_argument("--prompts", type=int, default=20, help="built-in prompts (default 20)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="directory for the runs' answers and logs (default: a new temp dir)")
    parser.add_argument("--no-llamacpp", action="store_true", help="ppinfer's runs only")
    parser.add_argument("overrides", nargs="*", help="more launch/infer.py overrides for ppinfer's runs")
    args = parser.parse_args(argv)
    print(title(args))
    print(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
