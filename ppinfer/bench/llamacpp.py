"""The llama.cpp peer: `python -I ppinfer/bench/llamacpp.py SPEC.json`, started by the sweep.

Times llama.cpp itself (through llama-cpp-python's low-level ctypes API, the optional
`bench` extra) on the same GGUF file and the same number of cores as ppinfer: one process per
point, `n_threads` (and `n_threads_batch`) fixed, the library's defaults otherwise (weights
mmapped, f16 KV cache).

One point is B sequences (B = 1 for the single-sequence points) in one context with
`n_seq_max = B` and a unified KV cache. Prefill is one `llama_decode` of every prompt's
tokens, each tagged with its sequence and asking for logits at its last token; every decode
step is one `llama_decode` of B tokens, one per sequence: llama.cpp's batched decoding.
Tokens are picked greedily by llama.cpp's own sampler and EOS is never checked, so every
sequence gets exactly `new_tokens` tokens (ignore-EOS). An untimed 2-token generation of the
same prompts comes first, then the cache is cleared. Figures match the other runners': TTFT
is prefill plus the first pick; prefill tok/s = prompt tokens / TTFT; decode tok/s =
B x (new_tokens - 1) / the time after the first pick.

Memory: the process's peak RSS above its RSS at start, before llama_cpp is imported. The file
runs as a plain script in isolated mode (`-I`) and imports only the standard library at module
level, so that baseline is a bare Python interpreter. Mapped weight pages count in RSS once
touched, and decoding touches all of them; the file-backed and anonymous shares at the end
are recorded too.

SPEC.json: {"model": FILE, "threads": T, "new_tokens": N, "prompts": [[ids...], ...], "out": FILE,
"drop_buffer_types": [NAME, ...], "context": {FIELD: VALUE, ...}}; the prompt ids come from ppinfer's
tokenizer, so llama.cpp sees exactly the runtime's ids; the named CPU buffer types (e.g. AMX) are
kept from llama.cpp (see `drop_buffer_types`); `context` sets fields of llama.cpp's context
parameters (e.g. `type_k`, `type_v`: GGML types, 0 = F32, 1 = F16; `flash_attn_type`: 0 off, 1 on).
The output holds each sequence's greedy tokens too (`tokens`).
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

DISTRIBUTION = "llama-cpp-python"
"""The package that provides the `llama_cpp` module."""
INSTALL_HINT = ("install the `bench` extra (llama-cpp-python compiles llama.cpp for about 15 minutes: build its "
                "wheel once, see docs/benchmarks.md)")
CTX_ROUND = 256


def current_rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_split_bytes() -> dict[str, int]:
    """The current RSS by kind: anonymous (private copies) and file-backed (mapped weights)."""
    split = {}
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                split[f"{key[3:].lower()}_rss_bytes_at_end"] = int(value.split()[0]) * 1024
    return split


@dataclass(frozen=True)
class Entry:
    """One token of a `llama_decode` batch."""

    token: int
    pos: int
    seq: int
    wants_logits: bool


def prefill_entries(prompts: Sequence[Sequence[int]]) -> tuple[list[Entry], list[int]]:
    """Every prompt's tokens as one batch, logits at each prompt's last token; and the batch
    index of those last tokens (where each sequence's first pick reads its logits)."""
    entries, last = [], []
    for seq, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {seq} has no tokens")
        for pos, token in enumerate(prompt):
            entries.append(Entry(token, pos, seq, pos == len(prompt) - 1))
        last.append(len(entries) - 1)
    return entries, last


def step_entries(tokens: Sequence[int], prompt_lengths: Sequence[int], step: int) -> list[Entry]:
    """Decode step `step` (1-based): each sequence's previous pick, at its next position."""
    return [Entry(t, n + step - 1, seq, True) for seq, (t, n) in enumerate(zip(tokens, prompt_lengths))]


def context_size(prompt_lengths: Sequence[int], new_tokens: int) -> int:
    """KV cells for every sequence's prompt and new tokens in one unified cache, rounded up."""
    needed = sum(prompt_lengths) + len(prompt_lengths) * new_tokens
    return -(-needed // CTX_ROUND) * CTX_ROUND


def _function(lib: ctypes.CDLL, name: str, restype: Any, *argtypes: Any) -> Any:
    fn = getattr(lib, name)
    fn.restype, fn.argtypes = restype, list(argtypes)
    return fn


def drop_buffer_types(lib_dir: Path, names: Sequence[str]) -> list[str]:
    """Take the named buffer types out of the CPU backend's extra buffer types; the names kept.

    llama.cpp puts each weight in the first of the CPU device's extra buffer types that can
    hold it (AMX, then CPU_REPACK), else in plain CPU memory. The backend hands that list out
    as one static NULL-terminated array, which is filtered here in place before the model
    loads, so llama.cpp then chooses among the remaining types as it would on a CPU without
    the dropped ones (this is how AMX is left out where its tile instructions fault).
    """
    ggml = ctypes.CDLL(str(lib_dir / "libggml.so"))
    base = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
    cpu = _function(ggml, "ggml_backend_dev_by_type", ctypes.c_void_p, ctypes.c_int)(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    reg = _function(base, "ggml_backend_dev_backend_reg", ctypes.c_void_p, ctypes.c_void_p)(cpu)
    address = _function(base, "ggml_backend_reg_get_proc_address", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p)(
        reg, b"ggml_backend_dev_get_extra_bufts")
    if not address:
        if names:
            raise RuntimeError(f"this llama.cpp build does not list its CPU buffer types, so {', '.join(names)} "
                               "cannot be left out")
        return []
    get_extra = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)
    buffer_name = _function(base, "ggml_backend_buft_name", ctypes.c_char_p, ctypes.c_void_p)
    types = get_extra(cpu)  # [buffer type, ..., NULL]
    listed = []
    while types[len(listed)]:
        listed.append(types[len(listed)])
    kept = [t for t in listed if buffer_name(t).decode() not in names]
    for i, t in enumerate([*kept, None]):
        types[i] = t
    return [buffer_name(t).decode() for t in kept]


class Session:
    """A llama.cpp model and context sized for `n_seq` sequences, with a batch and a greedy sampler."""

    def __init__(self, model_path: Path, threads: int, n_seq: int, n_ctx: int, n_batch: int,
                 drop_buffers: Sequence[str] = (), context: Mapping[str, int] | None = None) -> None:
        import llama_cpp  # after the caller's RSS baseline: loading the library is llama.cpp's memory

        self.lib = llama_cpp
        llama_cpp.llama_backend_init()
        self.buffer_types = drop_buffer_types(Path(llama_cpp.__file__).parent / "lib", drop_buffers)
        model_params = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model_path}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_seq_max = n_ctx, n_batch, n_seq
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = True
        for field, value in (context or {}).items():
            if not hasattr(params, field):
                raise ValueError(f"llama.cpp's context parameters have no field {field!r}")
            setattr(params, field, value)
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context (n_ctx={n_ctx}, n_seq_max={n_seq})")
        self.capacity = n_batch
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.sampler = llama_cpp.llama_sampler_init_greedy()

    def decode(self, entries: Sequence[Entry]) -> None:
        if len(entries) > self.capacity:
            raise ValueError(f"{len(entries)} tokens exceed the batch of {self.capacity}")
        b = self.batch
        for i, e in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = e.token, e.pos, 1, e.wants_logits
            b.seq_id[i][0] = e.seq
        b.n_tokens = len(entries)
        code = self.lib.llama_decode(self.ctx, b)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code} on a batch of {len(entries)} tokens")

    def pick(self, index: int) -> int:
        """The greedy token from the logits of batch entry `index`."""
        return int(self.lib.llama_sampler_sample(self.sampler, self.ctx, index))

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def close(self) -> None:
        self.lib.llama_sampler_free(self.sampler)
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


@dataclass(frozen=True)
class Generation:
    tokens: list[list[int]]
    """Each sequence's new tokens."""
    start: float
    first: float
    """When every sequence had its first token."""
    end: float


def generate(session: Session, prompts: Sequence[Sequence[int]], new_tokens: int) -> Generation:
    """Greedy, exactly `new_tokens` tokens per sequence (EOS never checked)."""
    lengths = [len(p) for p in prompts]
    entries, last = prefill_entries(prompts)
    start = time.perf_counter()
    session.decode(entries)
    tokens = [session.pick(i) for i in last]
    first = time.perf_counter()
    out = [[t] for t in tokens]
    for step in range(1, new_tokens):
        session.decode(step_entries(tokens, lengths, step))
        tokens = [session.pick(i) for i in range(len(prompts))]
        for seq, t in zip(out, tokens):
            seq.append(t)
    return Generation(out, start, first, time.perf_counter())


def library_version(lib: Any) -> str:
    """llama-cpp-python's version, libllama's, and ggml's version and commit when exposed."""
    parts = [f"{DISTRIBUTION} {version(DISTRIBUTION)}", f"libllama {lib.llama_version().decode()}"]
    ggml_dir = Path(lib.__file__).parent / "lib"
    base = ggml_dir / "libggml-base.so"
    if base.is_file():
        ggml = ctypes.CDLL(str(base))
        for name in ("ggml_version", "ggml_commit"):
            getattr(ggml, name).restype = ctypes.c_char_p
        parts.append(f"ggml {ggml.ggml_version().decode()} @ {ggml.ggml_commit().decode()}")
    return ", ".join(parts)


def measure(model: Path, threads: int, prompts: Sequence[Sequence[int]], new_tokens: int,
            drop_buffers: Sequence[str] = (), context: Mapping[str, int] | None = None) -> dict[str, Any]:
    lengths = [len(p) for p in prompts]
    session = Session(model, threads, len(prompts), context_size(lengths, new_tokens),
                      n_batch=max(sum(lengths), len(prompts)), drop_buffers=drop_buffers, context=context)
    try:
        # Untimed warm-up of the same shapes (prefill and one step): one-off initialisation and
        # first touches of the weights do not count against llama.cpp.
        generate(session, prompts, 2)
        session.clear()
        t = generate(session, prompts, new_tokens)
        lib = session.lib
        info = {
            "llama_cpp_version": library_version(lib),
            "llama_cpp_system_info": lib.llama_print_system_info().decode().strip(),
            "llama_cpp_extra_buffer_types": session.buffer_types,
        }
    finally:
        session.close()
    batch = len(prompts)
    ttft = t.first - t.start
    return {
        "runner": "llama.cpp",
        "stages": 1,
        "threads_per_rank": threads,
        "microbatches": 1,
        "lane_size": batch,
        "sequences": batch,
        "prompt_tokens": sum(lengths),
        "generated_tokens": batch * new_tokens,
        "prefill_tokens_per_s": sum(lengths) / ttft,
        "decode_tokens_per_s": batch * (new_tokens - 1) / (t.end - t.first) if new_tokens > 1 else 0.0,
        "time_to_first_token_s": ttft,
        "wall_s": t.end - t.start,
        **info,
        "context": dict(context or {}),
        "tokens": t.tokens,
    }


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    os.replace(partial, path)


def main(argv: Sequence[str]) -> int:
    baseline = current_rss_bytes()  # a bare interpreter: nothing but the standard library so far
    if len(argv) != 1:
        raise SystemExit("usage: python -I ppinfer/bench/llamacpp.py SPEC.json")
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    model = Path(spec["model"])
    metrics = measure(model, int(spec["threads"]), spec["prompts"], int(spec["new_tokens"]),
                      spec.get("drop_buffer_types", ()), spec.get("context"))
    peak = peak_rss_bytes()
    metrics["model"] = str(model)
    metrics["per_stage"] = [
        {"stage": 0, "peak_rss_bytes": peak, "peak_rss_above_baseline_bytes": peak - baseline, **rss_split_bytes()},
    ]
    write_json_atomic(Path(spec["out"]), metrics)
    print(f"[llama.cpp] {len(spec['prompts'])} sequences: prefill {metrics['prefill_tokens_per_s']:.1f} tok/s, "
          f"decode {metrics['decode_tokens_per_s']:.1f} tok/s, "
          f"peak RSS above baseline {(peak - baseline) / 2**20:.0f} MB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
