"""What a run uses, from the validated config: the device, the compute dtype, threads per
rank and the lane layout."""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

from ppinfer.config.schema import DEVICES, AnyConfig
from ppinfer.config.validate import fail
from ppinfer.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(cfg: AnyConfig, cuda_available: bool) -> str:
    """`cpu` or `cuda`: the configured device, with `auto` meaning cuda when one is visible."""
    device = cfg.runtime.device
    if device == "auto":
        return "cuda" if cuda_available else "cpu"
    if device not in ("cpu", "cuda"):
        fail("runtime.device", device, f"must be one of {', '.join(DEVICES)}")
    return device


def resolve_dtype(cfg: AnyConfig, device: str) -> torch.dtype:
    """The compute dtype: the configured one, else float32 on CPU and bfloat16 on CUDA."""
    name = cfg.runtime.dtype
    if name is None:
        # CPU kernels are fastest and exact in float32; GPUs have bf16 tensor cores.
        return torch.bfloat16 if device == "cuda" else torch.float32
    if name not in DTYPES:
        fail("runtime.dtype", name, f"must be one of {', '.join(DTYPES)} (or null)")
    return DTYPES[name]


def resolve_kv_dtype(cfg: AnyConfig) -> torch.dtype | str:
    """The KV cache's storage type (`runtime.kv_dtype`): a float dtype, or the name `q8_0`."""
    name = cfg.runtime.kv_dtype
    return DTYPES.get(name, name)


def resolve_threads(cfg: AnyConfig, local_world_size: int, cpu_count: int | None = None) -> int:
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
