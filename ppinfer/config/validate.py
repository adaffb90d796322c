"""`validate_config`: the values a type cannot check (ranges, mutually exclusive keys, the
world size), without touching a process group, so every rank can run it and fail the same
way within seconds. Checks that need the model file (the layer list sum) live in
`ppinfer.plan.allocation`.
"""

from __future__ import annotations

from typing import Any, NoReturn

from ppinfer.config.schema import (
    DEVICES,
    DTYPE_NAMES,
    KV_DTYPE_NAMES,
    MIN_REQUEST_BYTES,
    TASKS,
    TIMEOUT_RANGE_S,
    AnyConfig,
)
from ppinfer.errors import ConfigError
from ppinfer.kernels.select import WEIGHT_MODES
from ppinfer.plan.allocation import parse_layers
from ppinfer.sampling.params import GenerationParams


def fail(key: str, value: object, why: str) -> NoReturn:
    """Raise the `ConfigError` of a bad value: `key=value: why`."""
    raise ConfigError(f"{key}={value!r}: {why}")


def validate_config(cfg: AnyConfig, world_size: int, cuda_available: bool) -> None:
    """Check every value a type cannot; raise `ConfigError` naming the first bad key and value.

    Pure: reads nothing but `cfg` and its arguments, so it runs before any process group
    exists and gives the same verdict on every rank. Comparisons are written as
    `not (x >= lo)` where it matters so that NaN fails too.
    """
    if cfg.task not in TASKS:
        fail("task", cfg.task, f"must be one of {', '.join(TASKS)}")
    _validate_pipeline(cfg.pipeline, world_size)
    _validate_inputs(cfg)
    _validate_generation(cfg.generation, cfg.task)
    _validate_runtime(cfg.runtime, cuda_available)
    _validate_profile(cfg.profile)
    _validate_server(cfg.server)


def _validate_server(s: Any) -> None:
    if not 1 <= s.port <= 65535:
        fail("server.port", s.port, "must be a TCP port in [1, 65535]")
    if s.max_queue < 1:
        fail("server.max_queue", s.max_queue, "must be >= 1 (requests waiting for a free row)")
    if s.max_request_bytes < MIN_REQUEST_BYTES:
        fail("server.max_request_bytes", s.max_request_bytes, f"must be >= {MIN_REQUEST_BYTES}")
    if s.max_connections < 1:
        fail("server.max_connections", s.max_connections, "must be >= 1")
    for key in ("header_timeout_s", "stall_timeout_s"):
        value = getattr(s, key)
        if not 0 < value <= TIMEOUT_RANGE_S[1]:  # NaN fails too
            fail(f"server.{key}", value, f"must be in (0, {TIMEOUT_RANGE_S[1]:g}] seconds")
    if s.lane_size < 1:
        fail("server.lane_size", s.lane_size, "must be >= 1")
    if s.api_key is not None and not str(s.api_key).strip():
        fail("server.api_key", s.api_key, "must not be empty (null disables authentication)")


def _validate_pipeline(p: Any, world_size: int) -> None:
    if p.stages is not None and p.stages != world_size:
        fail("pipeline.stages", p.stages, f"must equal the world size ({world_size})")
    for key in ("microbatches", "lane_size"):
        value = getattr(p, key)
        if value is not None and value < 1:
            fail(f"pipeline.{key}", value, "must be at least 1 (or null for automatic)")
    if p.prefill_chunk < 1:
        fail("pipeline.prefill_chunk", p.prefill_chunk, "must be at least 1")
    if p.refill_chunk < 1:
        fail("pipeline.refill_chunk", p.refill_chunk, "must be at least 1")
    parse_layers(p.layers)


# Keys only one task reads: setting one for the other task is a mistake, not a no-op.
_TASK_KEYS = {"generate": ("prompts", "prompts_file"), "score": ("input.token_ids", "input.text")}


def _validate_inputs(cfg: AnyConfig) -> None:
    if cfg.prompts is not None and cfg.prompts_file is not None:
        fail("prompts_file", cfg.prompts_file, "give either prompts or prompts_file, not both")
    for task, keys in _TASK_KEYS.items():
        if task == cfg.task:
            continue
        for key in keys:
            value = _select(cfg, key)
            if value is not None:
                fail(key, _plain(value), f"only task={task} reads it, but this run has task={cfg.task}")
    if cfg.task == "score":
        has_ids = cfg.input.token_ids is not None
        has_text = cfg.input.text is not None
        if has_ids == has_text:
            raise ConfigError(
                "task='score' needs exactly one of input.token_ids and input.text; got "
                f"input.token_ids={cfg.input.token_ids!r}, input.text={cfg.input.text!r}"
            )
        if has_ids and len(cfg.input.token_ids) == 0:
            fail("input.token_ids", list(cfg.input.token_ids), "must not be empty")


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
        fail("runtime.device", r.device, f"must be one of {', '.join(DEVICES)}")
    if r.device == "cuda" and not cuda_available:
        fail("runtime.device", r.device, "no CUDA GPU is available (use cpu or auto)")
    if r.dtype is not None and r.dtype not in DTYPE_NAMES:
        fail("runtime.dtype", r.dtype, f"must be one of {', '.join(DTYPE_NAMES)} (or null)")
    if r.weights not in WEIGHT_MODES:
        fail("runtime.weights", r.weights, f"must be one of {', '.join(WEIGHT_MODES)}")
    on_cpu = r.device == "cpu" or (r.device == "auto" and not cuda_available)
    if on_cpu and r.dtype == "float16" and r.weights == "quantized":
        fail("runtime.dtype", r.dtype, "the CPU block kernels take float32 or bfloat16 activations "
             "(or use runtime.weights=dequantized)")
    if r.kv_dtype not in KV_DTYPE_NAMES:
        fail("runtime.kv_dtype", r.kv_dtype, f"must be one of {', '.join(KV_DTYPE_NAMES)}")
    if r.kv_cache_tokens is not None and r.kv_cache_tokens < 1:
        fail("runtime.kv_cache_tokens", r.kv_cache_tokens, "must be at least 1 (or null for automatic)")
    if r.threads is not None and r.threads < 1:
        fail("runtime.threads", r.threads, "must be at least 1 (or null for automatic)")
    low, high = TIMEOUT_RANGE_S
    if not low <= r.timeout_s <= high:  # NaN fails too
        fail("runtime.timeout_s", r.timeout_s, f"must be between {low:g} and {high:g} seconds (one day)")


def _validate_profile(p: Any) -> None:
    for key in ("wait", "warmup"):
        value = getattr(p, key)
        if value < 0:
            fail(f"profile.{key}", value, "must be >= 0")
    if p.active < 1:
        fail("profile.active", p.active, "must be at least 1")
