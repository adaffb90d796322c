"""Kernels over GGUF's stored blocks: `BlockLinear` and `BlockExperts` multiply them in place on
the CPU.

The exports are imported on first use, so `python -m ppinfer.kernels.build` runs its module
only once.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "BlockExperts": "experts",
    "BlockLinear": "cpu",
    "supported_types": "cpu",
    "isa": "build",
    "set_isa": "build",
    "unavailable_reason": "build",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ppinfer.kernels' has no attribute '{name}'")
    return getattr(importlib.import_module(f"ppinfer.kernels.{module}"), name)
