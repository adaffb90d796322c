"""Everything decided before any process group exists: the validated config, the model file,
the prompts as token ids, the layer allocation and the batches. Every rank computes the same
`Job`, so a bad input fails identically (and quickly) everywhere."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ppinfer.config import resolve_device, resolve_dtype, resolve_lanes, resolve_threads, validate_config
from ppinfer.errors import ConfigError, PromptError
from ppinfer.families import HParams, get_spec, read_hparams
from ppinfer.generation.tokenizer import Tokenizer, load_tokenizer
from ppinfer.gguf import GGUFFile
from ppinfer.hub import resolve_model_path
from ppinfer.kernels.select import block_backend
from ppinfer.model import StagePlan
from ppinfer.pipeline.allocation import allocate, plan_table
from ppinfer.pipeline.batches import Batch, make_batches
from ppinfer.pipeline.costs import layer_costs
from ppinfer.pipeline.outputs import output_dir_problem

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
    def from_environ(cls, environ: dict[str, str]) -> "DistEnv":
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
    batches: list[Batch]
    n_lanes: int
    lane_size: int
    """Sequences in the fullest lane (at most the prompts, whatever `pipeline.lane_size` says)."""
    prefill_chunk: int
    """The longest prefill chunk issued: `pipeline.prefill_chunk` capped by the longest prompt."""
    out_dir: Path

    @property
    def plan(self) -> StagePlan:
        return StagePlan.from_counts(self.layers, self.env.rank)

    @property
    def is_score(self) -> bool:
        return self.cfg.task == "score"

    def capacity(self) -> dict[int, int]:
        """KV slots each batch needs: its padded prompt plus every decode step."""
        extra = 0 if self.is_score else max(self.cfg.generation.max_new_tokens - 1, 0)
        return {b.index: b.width + extra for b in self.batches}


def _split_lines(text: str) -> list[str]:
    """The lines of a prompts file: split at "\n" only, dropping the "\r" of a CRLF ending.

    Not `str.splitlines()`, which also breaks at characters a prompt may hold (form feed,
    U+2028, U+0085, ...), nor Python's universal newlines, which break at a lone "\r" too.
    """
    return [line.removesuffix("\r") for line in text.split("\n")]


def read_prompts_file(path: str) -> list[str]:
    """The prompts of a `.txt` (one per non-blank line) or `.jsonl` (a JSON string or
    `{"prompt": ...}` per non-blank line) file; raises PromptError naming the file and line."""
    file = Path(path)
    try:
        lines = _split_lines(file.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptError(f"prompts_file={path}: cannot read it ({exc})") from exc
    if file.suffix != ".jsonl":
        return [line for line in lines if line.strip()]
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptError(f"prompts_file={path}: line {number} is not valid JSON ({exc.msg})") from exc
        if isinstance(value, dict) and isinstance(value.get("prompt"), str):
            value = value["prompt"]
        if not isinstance(value, str):
            raise PromptError(f'prompts_file={path}: line {number} must be a JSON string or {{"prompt": "..."}}')
        prompts.append(value)
    return prompts


def _prompt_texts(cfg: Any) -> list[str]:
    if cfg.prompts_file is not None:
        texts = read_prompts_file(cfg.prompts_file)
        source = f"prompts_file={cfg.prompts_file}"
    elif cfg.prompts is not None:
        texts, source = [str(p) for p in cfg.prompts], "prompts"
    else:
        return list(DEFAULT_PROMPTS)
    if not texts:
        raise PromptError(f"{source}: no prompts given")
    return texts


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


def _encode_prompts(cfg: Any, tok: Tokenizer, hp: HParams) -> tuple[list[str], list[list[int]]]:
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
        return [text], [ids]
    texts = _prompt_texts(cfg)
    if cfg.chat:
        texts = [
            tok.apply_chat_template([{"role": "user", "content": t}], template=cfg.model.chat_template)
            for t in texts
        ]
    prompts = []
    limit = hp.n_ctx - cfg.generation.max_new_tokens
    for i, text in enumerate(texts):
        ids = encode_prompt(tok, text, cfg.chat)
        if not ids:
            raise PromptError(f"prompt {i} ({text!r}) is empty after tokenization")
        if len(ids) > limit:
            raise PromptError(
                f"prompt {i} has {len(ids)} tokens; with generation.max_new_tokens="
                f"{cfg.generation.max_new_tokens} it exceeds the context of {hp.n_ctx}"
            )
        prompts.append(ids)
    return texts, prompts


def prepare(cfg: Any, env: DistEnv, cuda_available: bool, family_given: bool) -> Job:
    """Validate and resolve everything; raises a PPInferError naming the bad value."""
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
    texts, prompts = _encode_prompts(cfg, tokenizer, hp)
    lanes = resolve_lanes(cfg, env.world, len(prompts))
    batches = make_batches(prompts, lanes.lane_size)
    prefill_chunk = min(cfg.pipeline.prefill_chunk, max(b.width for b in batches))
    kv_tokens = sum(b.size * (b.width + cfg.generation.max_new_tokens) for b in batches[: lanes.microbatches])
    stored = block_backend(device).types if cfg.runtime.weights == "quantized" else frozenset()
    costs = layer_costs(
        str(model_path), torch.finfo(dtype).bits // 8, kv_tokens, reader=gf, step_tokens=lanes.lane_size,
        stored_types=stored,
    )
    layers = allocate(cfg.pipeline.layers, env.world, costs)
    if env.rank == 0:
        log.info("model %s (%s, %d layers) on %d stage(s):\n%s", model_path.name, hp.arch, hp.n_layer, env.world, plan_table(layers, costs))
    return Job(
        cfg=cfg, env=env, model_path=model_path, hparams=hp, tokenizer=tokenizer, device=device,
        dtype=dtype, threads=resolve_threads(cfg, env.local_world), layers=layers, texts=texts,
        prompts=prompts, batches=batches, n_lanes=min(lanes.microbatches, len(batches)),
        lane_size=lanes.lane_size, prefill_chunk=prefill_chunk, out_dir=Path(cfg.output.dir),
    )

