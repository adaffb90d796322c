"""Every tiny family file against llama.cpp itself: `python -m ppinfer.bench.family_logits [CASE ...]`.

The tests' writer makes one tiny random-weight GGUF file per family, quirk and storage type
(`tests/tiny_cases.py` `ALL_CASES`, plus the shapes of `tests/llamacpp_cases.py` that llama.cpp
loads where a test case's does not; run from a source checkout). Each is copied with a small
SentencePiece-style tokenizer section (llama.cpp refuses a file without `tokenizer.ggml.*`
arrays; ppinfer ignores it), then `--sequences` random sequences of 20 token ids are scored by

- ppinfer's exact path: one whole-model stage, float32, every weight dequantized;
- ppinfer's quantized path (`weights="quantized"`: the block kernels), for stored types other
  than F32;
- llama.cpp (llama-cpp-python, every position's logits, the same ids with no BOS added, one
  `llama_decode` of the whole sequence, an F32 KV cache so that the cache does not round to
  f16), in a child process so that an abort inside llama.cpp costs one row, not the run.

Printed per case: max |Δlogit| between ppinfer's exact path and llama.cpp over all positions,
divided by the range (max - min) of llama.cpp's logits; and, where the file is not F32, the
mean over positions of KL(exact || ppinfer quantized) and KL(exact || llama.cpp), with the
standard error of their per-position difference (on tiny random MoE files one expert choice
that flips on a near tie dominates the mean, so the error bar matters). A case that
llama.cpp does not load gets llama.cpp's loading error (or the last error line of its log)
instead.

    python -m ppinfer.bench.family_logits                       # every case
    python -m ppinfer.bench.family_logits llama gemma2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from ppinfer.bench.llamacpp import INSTALL_HINT, drop_buffer_types
from ppinfer.bench.sweep import llamacpp_installed
from ppinfer.families.hparams import read_hparams
from ppinfer.gguf.reader import GGUFFile
from ppinfer.model import build_stage
from ppinfer.plan import StagePlan

TESTS_DIR = Path(__file__).resolve().parents[2] / "tests"
"""Where `tiny_cases.py` lives in a source checkout."""
TOKENS = 20
"""Sequence length: the tiny cases' sliding windows (5 and 6) and long-rope switch (16) sit below it."""
SPECIAL = ("<unk>", "<s>", "</s>", "<0x0A>", "<|end|>", "<|endoftext|>")
"""The tokenizer's first tokens: unknown, BOS, EOS, the newline byte, and the two end tokens
llama.cpp looks up by name for phi3 (it fails to load a phi3 vocabulary without them); the
rest are plain `tN` pieces."""
ERROR_WORDS = ("error", "failed", "unknown", "invalid", "missing", "not supported", "assert")


def add_tokenizer(src: Path, dst: Path) -> Path:
    """Copy `src` to `dst` with a SentencePiece ("llama") tokenizer section of the file's own
    vocabulary size: the `SPECIAL` tokens then `t6` ... as normal tokens, all scores 0, and
    add_bos_token false (the scored ids go in as they are)."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    n_vocab = next(t.shape[-1] for t in reader.tensors if t.name == "token_embd.weight")  # ggml order: [E, V]
    writer = gguf.GGUFWriter(dst, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue
        if field.name.startswith("tokenizer."):
            raise ValueError(f"{src}: already has {field.name}")
        main = field.types[0]
        sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), main, sub_type=sub)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([*SPECIAL, *(f"t{i}" for i in range(len(SPECIAL), n_vocab))])
    writer.add_token_scores([0.0] * n_vocab)
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL, gguf.TokenType.BYTE,
             gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    writer.add_token_types([*types, *[gguf.TokenType.NORMAL] * (n_vocab - len(SPECIAL))])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@torch.no_grad()
def ppinfer_logits(path: Path, ids: np.ndarray, weights: str) -> np.ndarray:
    """[S, T, V] float32 logits of one whole-model stage over sequences `ids` [S, T] (one
    prefill each from position 0)."""
    n_layer = read_hparams(GGUFFile(path)).n_layer
    stage = build_stage(path, StagePlan.whole(n_layer), dtype=torch.float32, device="cpu", weights=weights)
    tokens = torch.from_numpy(ids)  # [S, T]
    positions = torch.arange(ids.shape[1], dtype=torch.int64).expand(ids.shape[0], -1).contiguous()  # [S, T]
    hidden = stage.embed(tokens)  # [S, T, E]
    hidden = stage.forward(hidden, positions, stage.new_cache(batch=ids.shape[0], max_len=ids.shape[1]))
    return stage.lm_head(hidden).float().numpy()


def llamacpp_logits(path: Path, ids: np.ndarray, threads: int) -> tuple[np.ndarray | None, str]:
    """llama.cpp's [S, T, V] logits over sequences `ids` [S, T] from a child process, or None and
    why it failed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "logits.npy"
        command = [sys.executable, "-m", "ppinfer.bench.family_logits", "--llamacpp-child", str(path),
                   json.dumps(ids.tolist()), str(out), str(threads)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode == 0 and out.exists():
            return np.load(out), ""
        return None, failure_reason(done.stderr, done.returncode)


def failure_reason(log: str, returncode: int) -> str:
    """The most telling line of a failed llama.cpp child's log: llama.cpp's own loading error
    where it printed one, else the last line naming an error."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    named = [line for line in lines if "error loading model" in line]
    named = named or [line for line in lines if any(w in line.lower() for w in ERROR_WORDS)]
    picked = named[-1] if named else (lines[-1] if lines else "no output")
    return f"exit {returncode}: {picked}"


def llamacpp_child(path: Path, ids: Sequence[Sequence[int]], out: Path, threads: int) -> None:
    """Score each sequence of `ids` with llama.cpp from an empty cache: F32 KV cache, one batch
    per sequence, logits for every position, weights kept out of AMX buffers (their tile
    instructions fault on some VMs; see `llamacpp.drop_buffer_types`); saves [S, T, V]."""
    import llama_cpp

    drop_buffer_types(Path(llama_cpp.__file__).parent / "lib", ["AMX"])

    length = len(ids[0])
    n_ctx = max(length, read_hparams(GGUFFile(path)).n_ctx)
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, n_batch=length, n_ubatch=length, n_threads=threads,
        n_threads_batch=threads, logits_all=True, verbose=True, type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
    )
    logits = []
    for seq in ids:
        llm.reset()  # the next eval starts at position 0 and drops the cache from there
        llm.eval(list(seq))
        logits.append(np.array(llm.scores[:length], dtype=np.float32))
    np.save(out, np.stack(logits))


def kl_per_position(exact: np.ndarray, other: np.ndarray) -> np.ndarray:
    """KL(exact || other) at every position of [..., V] logits, in float64, flattened."""
    p = torch.log_softmax(torch.from_numpy(exact).double(), -1)
    q = torch.log_softmax(torch.from_numpy(other).double(), -1)
    return (p.exp() * (p - q)).sum(-1).flatten().numpy()


def relative_gap(ours: np.ndarray, theirs: np.ndarray) -> float:
    """max |ours - theirs| over every position and token, over the range of `theirs`."""
    return float(np.abs(ours - theirs).max() / (theirs.max() - theirs.min()))


@dataclass(frozen=True)
class Row:
    case: str
    arch: str
    qtype: str
    gap: float | None
    """max |Δlogit| / logit range, ppinfer exact vs llama.cpp (None where llama.cpp failed)."""
    kl_ppinfer: float | None
    """Mean KL(exact || ppinfer quantized); None for F32 files."""
    kl_llamacpp: float | None
    """Mean KL(exact || llama.cpp)."""
    kl_diff_se: float | None
    """Standard error of the mean of the per-position difference of the two KLs (positions
    taken as independent): how far apart the two means may be by chance."""
    top1_llamacpp: float | None
    """Share of positions where llama.cpp's top token is the exact path's."""
    error: str = ""


def compare(case: str, path: Path, arch: str, qtype: str, ids: np.ndarray, threads: int, workdir: Path) -> Row:
    """One case's row: `ids` [S, T] scored by ppinfer's two paths and by llama.cpp."""
    exact = ppinfer_logits(path, ids, "dequantized")  # [S, T, V]
    quantized = ppinfer_logits(path, ids, "quantized") if qtype != "F32" else None
    theirs, error = llamacpp_logits(add_tokenizer(path, workdir / f"{case}.tok.gguf"), ids, threads)
    kl_ours = kl_per_position(exact, quantized) if quantized is not None else None  # [S T]
    mean_ours = None if kl_ours is None else float(kl_ours.mean())
    if theirs is None:
        return Row(case, arch, qtype, None, mean_ours, None, None, None, error)
    if theirs.shape != exact.shape:
        return Row(case, arch, qtype, None, mean_ours, None, None, None,
                   f"llama.cpp logits {theirs.shape} vs {exact.shape}")
    top1 = float((theirs.argmax(-1) == exact.argmax(-1)).mean())
    gap = relative_gap(exact, theirs)
    if kl_ours is None:
        return Row(case, arch, qtype, gap, None, None, None, top1)
    kl_theirs = kl_per_position(exact, theirs)  # [S T]
    diff = kl_ours - kl_theirs
    return Row(case, arch, qtype, gap, mean_ours, float(kl_theirs.mean()),
               float(diff.std(ddof=1) / np.sqrt(diff.size)), top1)


def load_cases(tests_dir: Path) -> tuple[dict[str, Any], Callable[[Path, Any], Path]]:
    """Every tiny case (`tiny_cases.ALL_CASES` and `llamacpp_cases.VARIANTS`) and the writer of
    a case's file, from the checkout's tests directory."""
    if not (tests_dir / "tiny_cases.py").is_file():
        raise SystemExit(f"{tests_dir}: no tiny_cases.py (this command runs from a source checkout)")
    sys.path.insert(0, str(tests_dir))
    import ggufgen
    import llamacpp_cases
    import tiny_cases

    return {**tiny_cases.ALL_CASES, **llamacpp_cases.VARIANTS}, ggufgen.write_tiny_gguf


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(rows: Sequence[Row]) -> str:
    lines = ["| case | arch | type | max gap / range | KL ppinfer quantized | KL llama.cpp | SE of KL difference "
             "| llama.cpp top-1 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.error and r.gap is None:
            lines.append(f"| {r.case} | {r.arch} | {r.qtype} | not loaded: {r.error} | "
                         f"{fmt(r.kl_ppinfer, '.2e')} | - | - | - |")
            continue
        lines.append(f"| {r.case} | {r.arch} | {r.qtype} | {fmt(r.gap, '.1e')} | {fmt(r.kl_ppinfer, '.2e')} | "
                     f"{fmt(r.kl_llamacpp, '.2e')} | {fmt(r.kl_diff_se, '.1e')} | {fmt(r.top1_llamacpp, '.2f')} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--llamacpp-child"]:
        path, ids, out, threads = argv[1:]
        llamacpp_child(Path(path), json.loads(ids), Path(out), int(threads))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", help="case names from tests/tiny_cases.py (default: all)")
    parser.add_argument("--tests-dir", type=Path, default=TESTS_DIR)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sequences", type=int, default=8, help=f"random sequences of {TOKENS} tokens per case")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if not llamacpp_installed():
        raise SystemExit(f"llama-cpp-python is not installed: {INSTALL_HINT}")
    all_cases, write = load_cases(args.tests_dir)
    unknown = [c for c in args.cases if c not in all_cases]
    if unknown:
        raise SystemExit(f"unknown case {unknown[0]!r}; known: {', '.join(all_cases)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases or list(all_cases):
            spec = all_cases[case]
            ids = np.random.default_rng(args.seed).integers(0, spec.n_vocab, (args.sequences, TOKENS))  # [S, T]
            path = write(Path(tmp) / f"{case}.gguf", spec)
            row = compare(case, path, spec.arch, spec.qtype.name, ids, args.threads, Path(tmp))
            print(markdown([row]).splitlines()[-1], flush=True)
            rows.append(row)
    print()
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
