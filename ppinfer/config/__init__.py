"""The run configuration: schema (the only home of defaults), Hydra registration, validation
and run-time resolution."""

from ppinfer.config.resolve import (
    DTYPES,
    LaneLayout,
    resolve_device,
    resolve_dtype,
    resolve_kv_dtype,
    resolve_lanes,
    resolve_threads,
)
from ppinfer.config.schema import AnyConfig, Config
from ppinfer.config.store import register_configs
from ppinfer.config.validate import validate_config

__all__ = [
    "DTYPES", "AnyConfig", "Config", "LaneLayout", "register_configs", "resolve_device", "resolve_dtype",
    "resolve_kv_dtype", "resolve_lanes", "resolve_threads", "validate_config",
]
