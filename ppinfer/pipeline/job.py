"""Everything decided before any process group exists: the validated config, the model file,
the prompts as token ids with their settings, the layer allocation and the lanes. Every rank computes the same
`Job`, so a bad input fails identically (and quickly) everywhere."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ppinfer.config import (
    resolve_device,
    resolve_dtype,
    resolve_kv_dtype,
    resolve_lanes,
    resolve_threads,
    validate_config,
)
from ppinfer.errors import ConfigError, PromptError
from ppinfer.families import HParams, get_spec, read_hparams
from ppinfer.gguf import GGUFFile
from ppinfer.hub import resolve_model_path
from ppinfer.kernels.select import block_backend
from ppinfer.model import kvquant
from ppinfer.model.cache import BLOCK_SIZE, blocks_for
from ppinfer.model.kvquant import KVType
from ppinfer.pipeline.outputs import output_dir_problem
from ppinfer.pipeline.prefix import PrefixIndex
from ppinfer.pipeline.scheduler import Scheduler
from ppinfer.plan import StagePlan, allocate, layer_costs, plan_table
from ppinfer.sampling.params import GenerationParams
from ppinfer.sampling.sampler import stream_seed
from ppinfer.text.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("ppinfer")

DEFAULT_PROMPTS = (
    "The three most important things to know about the ocean are",
    "The lighthouse keeper climbed the stairs and",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the mountains,",
)


@dataclass(frozen=True)
class DistEnv:
    """torchrun's environment (one plain process when absent)."""

    rank: int
    world: int
    local_rank: int
    local_world: int

    @classmethod
    def from_environ(cls, environ: dict[str, str]) -> DistEnv:
        return cls(
            rank=int(environ.get("RANK", 0)),
            world=int(environ.get("WORLD_SIZE", 1)),
            local_rank=int(environ.get("LOCAL_RANK", 0)),
            local_world=int(environ.get("LOCAL_WORLD_SIZE", 1)),
        )


@dataclass(frozen=True)
class Job:
    """The fully resolved run, identical on every rank."""

    cfg: Any
    env: DistEnv
    model_path: Path
    hparams: HParams
    tokenizer: Tokenizer
    device: torch.device
    dtype: torch.dtype
    threads: int
    layers: list[int]
    texts: list[str]
    prompts: list[list[int]]
    params: list[GenerationParams]
    """Each prompt's generation settings: `generation.*` with its `.jsonl` line's keys."""
    stream_seeds: list[int]
    """Each prompt's random stream (see `_prompt_texts`)."""
    n_lanes: int
    lane_size: int
    """Sequences in the fullest lane (at most the prompts, whatever `pipeline.lane_size` says)."""
    prefill_chunk: int
    """The longest prefill chunk issued: `pipeline.prefill_chunk` capped by the longest prompt."""
    refill_chunk: int
    """The chunk of a group admitted next to decoding rows: `pipeline.refill_chunk`, at most
    `prefill_chunk`."""
    capacity: int
    """KV slots of one cache row: the longest prompt (a group pads to its longest) plus the
    largest token budget (for the server, `server.context_length`)."""
    kv_dtype: KVType
    kv_tokens: int
    """Slots of each stage's KV cache pool, a whole number of blocks (`runtime.kv_cache_tokens`)."""
    out_dir: Path

    @property
    def plan(self) -> StagePlan:
        return StagePlan.from_counts(self.layers, self.env.rank)

    def scheduler(self) -> Scheduler:
        """An empty scheduler for this job's lanes, chunks and rows."""
        return Scheduler(
            self.n_lanes, self.lane_size, self.prefill_chunk, self.capacity, self.refill_chunk,
            pool_blocks=blocks_for(self.kv_tokens), prefix=PrefixIndex() if self.cfg.server.prefix_cache else None,
            fold=self.cfg.pipeline.fold_refill,
        )

    @property
    def is_score(self) -> bool:
        return self.cfg.task == "score"

    @property
    def writer_rank(self) -> int:
        """The rank that writes `output.dir`: the first (it sees every sampled id) for
        generate, the last (it holds the logits) for score."""
        return self.env.world - 1 if self.is_score else 0



def row_capacity(prompts: list[list[int]], budgets: list[int]) -> int:
    """Slots a row needs so that any group of these prompts fits: the longest prompt plus
    the largest budget, less the last sampled token, which is never fed."""
    return max(len(p) for p in prompts) + max(max(budgets) - 1, 0)


def _split_lines(text: str) -> list[str]:
    """The lines of a prompts file: split at "\n" only, dropping the "\r" of a CRLF ending.

    Not `str.splitlines()`, which also breaks at characters a prompt may hold (form feed,
    U+2028, U+0085, ...), nor Python's universal newlines, which break at a lone "\r" too.
    """
    return [line.removesuffix("\r") for line in text.split("\n")]


def read_prompts_file(path: str) -> list[tuple[str, dict[str, Any]]]:
    """The prompts of a `.txt` (one per non-blank line) or `.jsonl` (a JSON string, or
    `{"prompt": ..., <generation settings>}` per non-blank line) file, each with its own
    settings; raises PromptError naming the file and line."""
    file = Path(path)
    try:
        lines = _split_lines(file.read_bytes().decode("utf-8-sig"))
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptError(f"prompts_file={path}: cannot read it ({exc})") from exc
    if file.suffix != ".jsonl":
        return [(line, {}) for line in lines if line.strip()]
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptError(f"prompts_file={path}: line {number} is not valid JSON ({exc.msg})") from exc
        settings: dict[str, Any] = {}
        if isinstance(value, dict) and isinstance(value.get("prompt"), str):
            settings = {k: v for k, v in value.items() if k != "prompt"}
            value = value["prompt"]
        if not isinstance(value, str):
            raise PromptError(f'prompts_file={path}: line {number} must be a JSON string or {{"prompt": "..."}}')
        prompts.append((value, settings))
    return prompts


def _prompt_texts(cfg: Any, defaults: GenerationParams) -> tuple[list[str], list[GenerationParams], list[int]]:
    """The prompts to continue, each one's settings (`generation.*` unless its `.jsonl` line
    says otherwise) and the seed of its random stream: from `generation.seed` and its index,
    or from its own `seed` alone (as a server request's), so that it samples the same tokens
    wherever it sits in the file."""
    if cfg.prompts_file is not None:
        lines = read_prompts_file(cfg.prompts_file)
        source = f"prompts_file={cfg.prompts_file}"
    elif cfg.prompts is not None:
        lines, source = [(str(p), {}) for p in cfg.prompts], "prompts"
    else:
        lines, source = [(p, {}) for p in DEFAULT_PROMPTS], "prompts"
    if not lines:
        raise PromptError(f"{source}: no prompts given")
    params = []
    for i, (_, settings) in enumerate(lines):
        try:
            params.append(defaults.updated(settings) if settings else defaults)
        except ValueError as exc:
            raise PromptError(f"{source}: prompt {i}: {exc}") from exc
    seeds = [
        stream_seed(p.seed or 0, 0 if "seed" in settings else i)
        for i, (p, (_, settings)) in enumerate(zip(params, lines))
    ]
    return [text for text, _ in lines], params, seeds


def encode_prompt(tok: Tokenizer, text: str, chat: bool) -> list[int]:
    """Token ids of one prompt to continue, with a BOS when the file's `add_bos_token` says so.

    A rendered chat prompt that already starts with the BOS token's text (templates that write
    `{{ bos_token }}`: Gemma, Llama 3) would get a second BOS; as llama.cpp's chat path does,
    that text is dropped and the tokenizer adds the one BOS id.
    """
    bos_text = tok.token_text(tok.bos_id) if tok.bos_id is not None else ""
    if chat and tok.add_bos and bos_text and text.startswith(bos_text):
        text = text[len(bos_text):]
    return tok.encode(text)


def _encode_prompts(
    cfg: Any, tok: Tokenizer, hp: HParams
) -> tuple[list[str], list[list[int]], list[GenerationParams], list[int]]:
    if cfg.task == "score":
        if cfg.input.token_ids is not None:
            ids = [int(i) for i in cfg.input.token_ids]
            bad = [i for i in ids if not 0 <= i < hp.n_vocab]
            if bad:
                raise PromptError(f"input.token_ids: id {bad[0]} is outside the vocabulary [0, {hp.n_vocab})")
            text = tok.decode(ids)
        else:
            text = str(cfg.input.text)
            ids = tok.encode(text)
        if not ids:
            raise PromptError("input: nothing to score (0 tokens)")
        if len(ids) > hp.n_ctx:
            raise PromptError(f"input: {len(ids)} tokens exceed the model's context of {hp.n_ctx}")
        return [text], [ids], [GenerationParams()], [0]
    defaults = _generation_defaults(cfg)
    texts, params, seeds = _prompt_texts(cfg, defaults)
    if cfg.chat:
        texts = [
            tok.apply_chat_template([{"role": "user", "content": t}], template=cfg.model.chat_template)
            for t in texts
        ]
    prompts = []
    for i, (text, p) in enumerate(zip(texts, params)):
        ids = encode_prompt(tok, text, cfg.chat)
        try:
            p.check_vocabulary(hp.n_vocab)
        except ValueError as exc:
            raise PromptError(f"prompt {i}: {exc}") from exc
        if not ids:
            raise PromptError(f"prompt {i} ({text!r}) is empty after tokenization")
        if len(ids) + p.max_new_tokens > hp.n_ctx:
            # The config's key, unless the prompt's own line set another budget.
            key = "generation.max_new_tokens" if p.max_new_tokens == defaults.max_new_tokens else "max_new_tokens"
            raise PromptError(
                f"prompt {i} has {len(ids)} tokens; with {key}={p.max_new_tokens} it "
                f"exceeds the context of {hp.n_ctx}"
            )
        prompts.append(ids)
    return texts, prompts, params, seeds


def prepare(cfg: Any, env: DistEnv, cuda_available: bool, family_given: bool, serve: bool = False) -> Job:
    """Validate and resolve everything; raises a PPInferError naming the bad value. With
    `serve`, there are no prompts: sequences arrive over HTTP (`launch/serve.py`)."""
    validate_config(cfg, env.world, cuda_available)
    problem = output_dir_problem(Path(cfg.output.dir))
    if problem is not None:
        raise ConfigError(problem)
    device_name = resolve_device(cfg, cuda_available)
    device = torch.device(device_name, env.local_rank) if device_name == "cuda" else torch.device("cpu")
    dtype = resolve_dtype(cfg, device_name)
    model_path = resolve_model_path(cfg.model.path or cfg.model.name)
    gf = GGUFFile(model_path)
    gf.check_tensor_types()
    if family_given and cfg.model.family is not None and cfg.model.family != gf.architecture:
        raise ConfigError(
            f"model.family={cfg.model.family} but {model_path} is {gf.architecture!r} (general.architecture)"
        )
    hp = read_hparams(gf, get_spec(gf.architecture, str(model_path)))
    tokenizer = load_tokenizer(model_path)
    if serve:
        texts, prompts, params, seeds = [], [], [_generation_defaults(cfg)], []
        capacity = _server_context(cfg, hp)
        n_lanes = cfg.pipeline.microbatches or env.world
        lane_size = cfg.pipeline.lane_size or cfg.server.lane_size
        prefill_chunk = min(cfg.pipeline.prefill_chunk, capacity)
    else:
        texts, prompts, params, seeds = _encode_prompts(cfg, tokenizer, hp)
        lanes = resolve_lanes(cfg, env.world, len(prompts))
        lane_size = lanes.lane_size
        n_lanes = min(lanes.microbatches, math.ceil(len(prompts) / lane_size))
        prefill_chunk = min(cfg.pipeline.prefill_chunk, max(len(p) for p in prompts))
        capacity = row_capacity(prompts, [0 if cfg.task == "score" else p.max_new_tokens for p in params])
    refill_chunk = min(cfg.pipeline.refill_chunk, prefill_chunk)
    kv_dtype = resolve_kv_dtype(cfg)
    for size in {hp.head_dim, hp.head_dim_v or hp.head_dim}:
        try:
            kvquant.storage(kv_dtype, size)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    kv_tokens = _kv_tokens(cfg, n_lanes * lane_size, capacity, serve)
    backend = block_backend(device)
    quantized = cfg.runtime.weights == "quantized"
    costs = layer_costs(
        str(model_path), torch.finfo(dtype).bits // 8, kv_tokens, reader=gf,
        step_tokens=lane_size, stored_types=backend.types if quantized else frozenset(),
        stored_expert_types=backend.expert_types if quantized else frozenset(),
        kv_dtype_bytes=kvquant.bytes_per_value(kv_dtype),
    )
    layers = allocate(cfg.pipeline.layers, env.world, costs)
    if env.rank == 0:
        log.info(
            "model %s (%s, %d layers) on %d stage(s):\n%s",
            model_path.name,
            hp.arch,
            hp.n_layer,
            env.world,
            plan_table(layers, costs),
        )
    return Job(
        cfg=cfg, env=env, model_path=model_path, hparams=hp, tokenizer=tokenizer, device=device,
        dtype=dtype, threads=resolve_threads(cfg, env.local_world), layers=layers, texts=texts,
        prompts=prompts, params=params, stream_seeds=seeds, n_lanes=n_lanes, lane_size=lane_size,
        prefill_chunk=prefill_chunk, refill_chunk=refill_chunk, capacity=capacity, kv_dtype=kv_dtype,
        kv_tokens=kv_tokens, out_dir=Path(cfg.output.dir),
    )


SERVER_ROW_TOKENS = 2048
"""Tokens per row that the server's default KV pool has room for (rows share the pool, so one
sequence may grow to the whole context while others are short)."""


def _kv_tokens(cfg: Any, rows: int, capacity: int, serve: bool) -> int:
    """Slots of each stage's KV pool: `runtime.kv_cache_tokens`, else room for every row at its
    full length (the server: at least `SERVER_ROW_TOKENS` a row); whole blocks, and at least one
    full row, so that any sequence that fits a row can run."""
    row = blocks_for(capacity) * BLOCK_SIZE
    wanted = cfg.runtime.kv_cache_tokens
    if wanted is None:
        return rows * row if not serve else max(row, rows * blocks_for(SERVER_ROW_TOKENS) * BLOCK_SIZE)
    if wanted < row:
        what = "server.context_length" if serve else "the longest prompt plus its token budget"
        raise ConfigError(
            f"runtime.kv_cache_tokens={wanted}: must be at least {row} (one row: {what}, {capacity} tokens, "
            f"in blocks of {BLOCK_SIZE})"
        )
    return blocks_for(int(wanted)) * BLOCK_SIZE


def _server_context(cfg: Any, hp: HParams) -> int:
    wanted = cfg.server.context_length
    if wanted is None:
        return hp.n_ctx
    if not 1 <= wanted <= hp.n_ctx:
        raise ConfigError(f"server.context_length={wanted}: must be in [1, {hp.n_ctx}] (the model's context)")
    return int(wanted)


def _generation_defaults(cfg: Any) -> GenerationParams:
    try:
        return GenerationParams.from_config(cfg.generation)
    except ValueError as exc:
        raise ConfigError(f"generation.{exc}") from exc
