"""The typed run configuration: one dataclass per top-level key, the only home of defaults.

The GGUF header describes the model; this schema only chooses how to run it. `store.py`
registers it in Hydra's ConfigStore as `config_schema`, so a misspelt key or a wrongly typed
value fails when Hydra composes the config, before any code runs; `validate.py` checks what a
type cannot express; `resolve.py` turns the values into what a run uses (devices, dtypes,
threads, lanes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from ppinfer.sampling.params import GenerationParams

TASKS = ("generate", "score")
DEVICES = ("cpu", "cuda", "auto")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
KV_DTYPE_NAMES = ("float16", "bfloat16", "float32", "q8_0")
MIN_REQUEST_BYTES = 1024
"""The smallest `server.max_request_bytes`: room for a request's JSON fields."""
TIMEOUT_RANGE_S = (1.0, 86400.0)
"""Allowed `runtime.timeout_s`: below 1 s healthy ranks give up on each other while a peer is
still loading or computing a step; above a day is a hang, not a timeout (and `inf` overflows
the process group's timedelta)."""


@dataclass(kw_only=True)
class ModelConfig:
    """Which GGUF file to run."""

    name: str = "smollm2-135m-instruct"
    """A known model name fetched by `ppinfer.hub.ensure_model`; used only when `path` is null."""
    path: str | None = None
    """Path of a local GGUF file; overrides `name`."""
    family: str | None = None
    """Expected `general.architecture`; when set, a file of another architecture is an error."""
    chat_template: str | None = None
    """A Jinja chat template that replaces the file's `tokenizer.chat_template`."""


@dataclass(kw_only=True)
class PipelineConfig:
    """How the layers are split over ranks and how sequences are grouped into lanes."""

    stages: int | None = None
    """Number of pipeline stages; null means the world size (any other value must equal it)."""
    layers: Any = "balanced"
    """`balanced` (cost model over the file's tensor sizes), `uniform`, or layers per stage."""
    microbatches: int | None = None
    """Lanes in flight; null means as many as stages, capped by the number of sequences."""
    lane_size: int | None = None
    """Max sequences per lane; null means ceil(sequences / lanes). Extra sequences wait and take
    a lane's row as soon as one frees."""
    prefill_chunk: int = 128
    """Prompt tokens per prefill step, so long prompts pipeline too and shapes stay static.
    A chunk longer than the longest prompt costs nothing: each prompt then goes in one step."""
    refill_chunk: int = 16
    """Prompt tokens per prefill step for sequences admitted next to rows that are decoding
    (at most `prefill_chunk`). Short refill chunks keep the ring moving while a newcomer's
    prompt goes through; 16 measured best or tied for lanes of 2 to 16 (docs/benchmarks.md)."""
    fold_refill: bool = True
    """A refill chunk rides in its lane's decode step: one forward computes the decoding rows'
    next tokens and the newcomer's chunk, streaming every weight once for both (false: the
    chunk is an item of its own, right after the step)."""


@dataclass(kw_only=True)
class InputConfig:
    """What the `score` task scores: exactly one of `token_ids` and `text`."""

    token_ids: list[int] | None = None
    """Token ids to score, used as given (no BOS is added)."""
    text: str | None = None
    """Text to tokenize and score."""


@dataclass(kw_only=True)
class RuntimeConfig:
    """Where and how each rank computes."""

    device: str = "auto"
    """`cpu`, `cuda`, or `auto` (cuda when a GPU is visible)."""
    dtype: str | None = None
    """`float32`, `bfloat16` or `float16`; null means float32 on CPU and bfloat16 on CUDA."""
    threads: int | None = None
    """Torch intra-op threads per rank; null means CPU cores / local world size (at least 1)."""
    weights: str = "quantized"
    """`quantized`: weights stay in their GGUF blocks and are multiplied in place by a kernel
    for their type and device (types without one are dequantized); `dequantized`: every
    weight is dequantized to `dtype` at load (the exact reference path)."""
    kv_dtype: str = "float16"
    """Element type of the KV cache: `float16` (half the bytes of float32; attention widens
    each key and value as it reads it), `bfloat16`, `float32` (the exact reference path), or
    `q8_0` (blocks of 32 int8 values and a float16 scale, 34 bytes per 32 values, read in place
    by the CPU's fused decode attention; head sizes a multiple of 32)."""
    kv_cache_tokens: int | None = None
    """Tokens the KV cache of each stage holds, shared by every row of every lane in blocks of
    16 slots. A sequence is admitted when its prompt's blocks (and a block to grow into for each
    running sequence) are free, and is preempted (recomputed later) if the pool runs dry.
    Null: room for every row at full length (the server: at least 2,048 tokens a row). At least
    one full row (`server.context_length`, or the longest prompt plus its budget)."""
    timeout_s: float = 60.0
    """Process-group timeout, so a rank whose peer died fails instead of waiting forever.
    Seconds, from 1 to 86400 (one day); see `TIMEOUT_RANGE_S`."""


@dataclass(kw_only=True)
class OutputConfig:
    """Where results go."""

    dir: str = "outputs/latest"
    """One pinned directory shared by all ranks (also Hydra's run dir); one rank writes it
    and holds it (`.lock`) for the run, so a second run into it is refused."""


@dataclass(kw_only=True)
class ServerConfig:
    """The OpenAI-compatible server (`launch/serve.py`); the batch command ignores it."""

    host: str = "127.0.0.1"
    """Address the first rank listens on."""
    port: int = 8000
    """TCP port of the HTTP server."""
    api_key: str | None = None
    """When set, every /v1 request needs `Authorization: Bearer <api_key>` (401 otherwise)."""
    max_queue: int = 256
    """Requests waiting for a free row at most; beyond, 503 with Retry-After."""
    max_request_bytes: int = 8 * 2**20
    """Largest request body in bytes; a larger one is refused with 413 before it is parsed."""
    header_timeout_s: float = 10.0
    """A connection whose request headers have not all arrived this many seconds after it
    opened (or after its previous response) is closed."""
    max_connections: int = 1000
    """Open connections at most: beyond, new ones are closed as they open."""
    stall_timeout_s: float = 30.0
    """`/health` says `stalled` (503) when sequences run but no sampled token has come back
    for this many seconds."""
    prefix_cache: bool = True
    """Reuse the KV blocks of a prompt beginning that an earlier prompt already computed
    (full blocks of 16 tokens, on every stage); the batch command uses it too."""
    context_length: int | None = None
    """KV slots of one sequence (prompt plus generated); null means the model's context,
    capped at 2048 (every row of every lane preallocates this many KV slots)."""
    lane_size: int = 8
    """Sequences per lane when `pipeline.lane_size` is null."""


@dataclass(kw_only=True)
class ProfileConfig:
    """torch.profiler traces for TensorBoard."""

    enabled: bool = False
    """Record a trace of the decode loop."""
    dir: str | None = None
    """Trace directory; null means `<output.dir>/tensorboard`."""
    wait: int = 1
    """torch.profiler schedule: steps skipped before warming up."""
    warmup: int = 1
    """torch.profiler schedule: steps traced but discarded."""
    active: int = 4
    """torch.profiler schedule: steps recorded."""


@dataclass(kw_only=True)
class Config:
    """The whole run: one field per top-level key of the command line."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model file."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    """Stages, layer split and lanes."""
    task: str = "generate"
    """`generate` (continue prompts) or `score` (logits at every position of `input`)."""
    prompts: list[str] | None = None
    """Prompts to continue, one sequence each."""
    prompts_file: str | None = None
    """A file with one prompt per line (exclusive with `prompts`)."""
    chat: bool = False
    """Wrap each prompt as a user turn with the chat template."""
    input: InputConfig = field(default_factory=InputConfig)
    """What the `score` task scores."""
    generation: GenerationParams = field(default_factory=GenerationParams)
    """Sampling and stopping."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Device, dtype, threads, timeouts."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Output directory."""
    server: ServerConfig = field(default_factory=ServerConfig)
    """The HTTP server (`launch/serve.py` only)."""
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    """Profiling."""


AnyConfig = Config | DictConfig
