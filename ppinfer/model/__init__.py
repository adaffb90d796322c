"""The model: one generic decoder driven by a `FamilySpec`, split into pipeline stages.

This package knows nothing of ranks or process groups (a test checks its imports): a stage is
a plain module that any runtime (one process, a pipeline of ranks, a test) can drive.
"""

from ppinfer.model.cache import KVCache, KVPool
from ppinfer.model.loader import build_stage
from ppinfer.model.stage import PipelineStage

__all__ = ["KVCache", "KVPool", "PipelineStage", "build_stage"]
