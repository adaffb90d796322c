"""The typed run configuration: schema, ConfigStore registration and validation.

The GGUF header describes the model; this schema only chooses how to run it. The dataclasses
are registered in Hydra's ConfigStore as `config_schema` (and one schema per group), so a
misspelt key or a wrongly typed value fails when Hydra composes the config, before any code
runs. `validate_config` then checks the values that a type cannot express (ranges, mutually
exclusive keys, the world size) without touching a process group, so every rank can run it
and fail the same way within seconds. Checks that need the model file (the layer list sum)
live in `ppinfer.pipeline.allocation`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, List, NamedTuple, NoReturn, Optional, Union

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from ppinfer.errors import ConfigError
from ppinfer.generation.params import GenerationParams
from ppinfer.model.loader import WEIGHT_MODES
from ppinfer.pipeline.allocation import parse_layers

TASKS = ("generate", "score")
DEVICES = ("cpu", "cuda", "auto")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
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
    path: Optional[str] = None
    """Path of a local GGUF file; overrides `name`."""
    family: Optional[str] = None
    """Expected `general.architecture`; when set, a file of another architecture is an error."""
    chat_template: Optional[str] = None
    """A Jinja chat template that replaces the file's `tokenizer.chat_template`."""


@dataclass(kw_only=True)
class PipelineConfig:
    """How the layers are split over ranks and how sequences are grouped into lanes."""

    stages: Optional[int] = None
    """Number of pipeline stages; null means the world size (any other value must equal it)."""
    layers: Any = "balanced"
    """`balanced` (cost model over the file's tensor sizes), `uniform`, or layers per stage."""
    microbatches: Optional[int] = None
    """Lanes in flight; null means as many as stages, capped by the number of sequences."""
    lane_size: Optional[int] = None
    """Max sequences per lane; null means ceil(sequences / lanes). Extra sequences wait and take
    a lane's row as soon as one frees."""
    prefill_chunk: int = 128
    """Prompt tokens per prefill step, so long prompts pipeline too and shapes stay static.
    A chunk longer than the longest prompt costs nothing: each prompt then goes in one step."""
    refill_chunk: int = 16
    """Prompt tokens per prefill step for sequences admitted next to rows that are decoding
    (at most `prefill_chunk`). Short refill chunks keep the ring moving while a newcomer's
    prompt goes through; 16 measured best or tied for lanes of 2 to 16 (docs/benchmarks.md)."""


@dataclass(kw_only=True)
class InputConfig:
    """What the `score` task scores: exactly one of `token_ids` and `text`."""

    token_ids: Optional[List[int]] = None
    """Token ids to score, used as given (no BOS is added)."""
    text: Optional[str] = None
    """Text to tokenize and score."""


@dataclass(kw_only=True)
class RuntimeConfig:
    """Where and how each rank computes."""

    device: str = "auto"
    """`cpu`, `cuda`, or `auto` (cuda when a GPU is visible)."""
    dtype: Optional[str] = None
    """`float32`, `bfloat16` or `float16`; null means float32 on CPU and bfloat16 on CUDA."""
    threads: Optional[int] = None
    """Torch intra-op threads per rank; null means CPU cores / local world size (at least 1)."""
    weights: str = "quantized"
    """`quantized`: weights stay in their GGUF blocks and are multiplied in place by a kernel
    for their type and device (types without one are dequantized); `dequantized`: every
    weight is dequantized to `dtype` at load (the exact reference path)."""
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
    api_key: Optional[str] = None
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
    context_length: Optional[int] = None
    """KV slots of one sequence (prompt plus generated); null means the model's context,
    capped at 2048 (every row of every lane preallocates this many KV slots)."""
    lane_size: int = 8
    """Sequences per lane when `pipeline.lane_size` is null."""


@dataclass(kw_only=True)
class ProfileConfig:
    """torch.profiler traces for TensorBoard."""

    enabled: bool = False
    """Record a trace of the decode loop."""
    dir: Optional[str] = None
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
    prompts: Optional[List[str]] = None
    """Prompts to continue, one sequence each."""
    prompts_file: Optional[str] = None
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


AnyConfig = Union[Config, DictConfig]


def register_configs() -> None:
    """Register the schema so Hydra type-checks `conf/` and every override against it.

    `config_schema` is the first entry of `conf/config.yaml`'s defaults list; the group presets
    merge into its typed nodes, so they are checked too. Calling this twice is harmless (the
    store just replaces the entry).
    """
    ConfigStore.instance().store(name="config_schema", node=Config)


# Registering at import means `import ppinfer.config` is all an entry point needs before
# `@hydra.main`; the store is a process-local registry, so this has no other side effect.
register_configs()


def _fail(key: str, value: object, why: str) -> NoReturn:
    raise ConfigError(f"{key}={value!r}: {why}")


def validate_config(cfg: AnyConfig, world_size: int, cuda_available: bool) -> None:
    """Check every value a type cannot; raise `ConfigError` naming the first bad key and value.

    Pure: reads nothing but `cfg` and its arguments, so it runs before any process group
    exists and gives the same verdict on every rank. Comparisons are written as
    `not (x >= lo)` where it matters so that NaN fails too.
    """
    if cfg.task not in TASKS:
        _fail("task", cfg.task, f"must be one of {', '.join(TASKS)}")
    _validate_pipeline(cfg.pipeline, world_size)
    _validate_inputs(cfg)
    _validate_generation(cfg.generation, cfg.task)
    _validate_runtime(cfg.runtime, cuda_available)
    _validate_profile(cfg.profile)
    _validate_server(cfg.server)


def _validate_server(s: Any) -> None:
    if not 1 <= s.port <= 65535:
        _fail("server.port", s.port, "must be a TCP port in [1, 65535]")
    if s.max_queue < 1:
        _fail("server.max_queue", s.max_queue, "must be >= 1 (requests waiting for a free row)")
    if s.max_request_bytes < MIN_REQUEST_BYTES:
        _fail("server.max_request_bytes", s.max_request_bytes, f"must be >= {MIN_REQUEST_BYTES}")
    if s.max_connections < 1:
        _fail("server.max_connections", s.max_connections, "must be >= 1")
    for key in ("header_timeout_s", "stall_timeout_s"):
        value = getattr(s, key)
        if not 0 < value <= TIMEOUT_RANGE_S[1]:  # NaN fails too
            _fail(f"server.{key}", value, f"must be in (0, {TIMEOUT_RANGE_S[1]:g}] seconds")
    if s.lane_size < 1:
        _fail("server.lane_size", s.lane_size, "must be >= 1")
    if s.api_key is not None and not str(s.api_key).strip():
        _fail("server.api_key", s.api_key, "must not be empty (null disables authentication)")


def _validate_pipeline(p: Any, world_size: int) -> None:
    if p.stages is not None and p.stages != world_size:
        _fail("pipeline.stages", p.stages, f"must equal the world size ({world_size})")
    for key in ("microbatches", "lane_size"):
        value = getattr(p, key)
        if value is not None and value < 1:
            _fail(f"pipeline.{key}", value, "must be at least 1 (or null for automatic)")
    if p.prefill_chunk < 1:
        _fail("pipeline.prefill_chunk", p.prefill_chunk, "must be at least 1")
    if p.refill_chunk < 1:
        _fail("pipeline.refill_chunk", p.refill_chunk, "must be at least 1")
    parse_layers(p.layers)


# Keys only one task reads: setting one for the other task is a mistake, not a no-op.
_TASK_KEYS = {"generate": ("prompts", "prompts_file"), "score": ("input.token_ids", "input.text")}


def _validate_inputs(cfg: AnyConfig) -> None:
    if cfg.prompts is not None and cfg.prompts_file is not None:
        _fail("prompts_file", cfg.prompts_file, "give either prompts or prompts_file, not both")
    for task, keys in _TASK_KEYS.items():
        if task == cfg.task:
            continue
        for key in keys:
            value = _select(cfg, key)
            if value is not None:
                _fail(key, _plain(value), f"only task={task} reads it, but this run has task={cfg.task}")
    if cfg.task == "score":
        has_ids = cfg.input.token_ids is not None
        has_text = cfg.input.text is not None
        if has_ids == has_text:
            raise ConfigError(
                "task='score' needs exactly one of input.token_ids and input.text; got "
                f"input.token_ids={cfg.input.token_ids!r}, input.text={cfg.input.text!r}"
            )
        if has_ids and len(cfg.input.token_ids) == 0:
            _fail("input.token_ids", list(cfg.input.token_ids), "must not be empty")


def _select(cfg: AnyConfig, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _plain(value: Any) -> Any:
    """A value as the user wrote it: lists from Hydra are ListConfig, shown as plain lists."""
    return value if isinstance(value, (str, int, float)) else list(value)


def _validate_generation(g: Any, task: str) -> None:
    if task == "score":
        return
    try:
        GenerationParams.from_config(g)
    except ValueError as exc:  # the message starts with `field=value`
        raise ConfigError(f"generation.{exc}") from exc


def _validate_runtime(r: Any, cuda_available: bool) -> None:
    if r.device not in DEVICES:
        _fail("runtime.device", r.device, f"must be one of {', '.join(DEVICES)}")
    if r.device == "cuda" and not cuda_available:
        _fail("runtime.device", r.device, "no CUDA GPU is available (use cpu or auto)")
    if r.dtype is not None and r.dtype not in DTYPES:
        _fail("runtime.dtype", r.dtype, f"must be one of {', '.join(DTYPES)} (or null)")
    if r.weights not in WEIGHT_MODES:
        _fail("runtime.weights", r.weights, f"must be one of {', '.join(WEIGHT_MODES)}")
    if r.threads is not None and r.threads < 1:
        _fail("runtime.threads", r.threads, "must be at least 1 (or null for automatic)")
    low, high = TIMEOUT_RANGE_S
    if not low <= r.timeout_s <= high:  # NaN fails too
        _fail("runtime.timeout_s", r.timeout_s, f"must be between {low:g} and {high:g} seconds (one day)")


def _validate_profile(p: Any) -> None:
    for key in ("wait", "warmup"):
        value = getattr(p, key)
        if value < 0:
            _fail(f"profile.{key}", value, "must be >= 0")
    if p.active < 1:
        _fail("profile.active", p.active, "must be at least 1")


def resolve_device(cfg: AnyConfig, cuda_available: bool) -> str:
    """`cpu` or `cuda`: the configured device, with `auto` meaning cuda when one is visible."""
    device = cfg.runtime.device
    if device == "auto":
        return "cuda" if cuda_available else "cpu"
    if device not in ("cpu", "cuda"):
        _fail("runtime.device", device, f"must be one of {', '.join(DEVICES)}")
    return device


def resolve_dtype(cfg: AnyConfig, device: str) -> torch.dtype:
    """The compute dtype: the configured one, else float32 on CPU and bfloat16 on CUDA."""
    name = cfg.runtime.dtype
    if name is None:
        # CPU kernels are fastest and exact in float32; GPUs have bf16 tensor cores.
        return torch.bfloat16 if device == "cuda" else torch.float32
    if name not in DTYPES:
        _fail("runtime.dtype", name, f"must be one of {', '.join(DTYPES)} (or null)")
    return DTYPES[name]


def resolve_threads(cfg: AnyConfig, local_world_size: int, cpu_count: Optional[int] = None) -> int:
    """Intra-op threads for one rank: the configured count, else an even share of the cores.

    Ranks on one host share its cores; letting each take all of them oversubscribes the CPU
    and makes every stage slower. `cpu_count` defaults to the cores this process may use.
    """
    if cfg.runtime.threads is not None:
        return int(cfg.runtime.threads)
    if cpu_count is None:
        cpu_count = _usable_cpus()
    return max(1, cpu_count // max(1, local_world_size))


def _usable_cpus() -> int:
    # The affinity mask honours taskset / container limits; os.cpu_count() does not.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class LaneLayout(NamedTuple):
    """How sequences are placed: `microbatches` lanes of up to `lane_size` rows."""

    microbatches: int
    lane_size: int


def resolve_lanes(cfg: AnyConfig, n_stages: int, n_sequences: int) -> LaneLayout:
    """Apply the `pipeline.microbatches` / `pipeline.lane_size` defaults for `n_sequences`.

    Lanes default to one per stage (a full ring) but never exceed the sequences, since an
    empty lane would only add bubbles. The lane size defaults to fitting every sequence in
    one wave; with a smaller explicit size the rest wait for free rows. A larger explicit size
    is capped by the sequences: a lane never holds more than there are, and everything sized
    per lane (the cost model, buffers) must see what it really holds.
    """
    if n_sequences < 1:
        raise ConfigError(f"nothing to run: {n_sequences} sequences")
    microbatches = cfg.pipeline.microbatches
    if microbatches is None:
        microbatches = n_stages
    microbatches = max(1, min(int(microbatches), n_sequences))
    lane_size = cfg.pipeline.lane_size
    if lane_size is None:
        lane_size = math.ceil(n_sequences / microbatches)
    lane_size = min(int(lane_size), n_sequences)
    return LaneLayout(microbatches=microbatches, lane_size=lane_size)
