"""Registers the schema in Hydra's ConfigStore: entry points call `register_configs()` once
before `@hydra.main` (or `compose`) reads `conf/`."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from ppinfer.config.schema import Config


def register_configs() -> None:
    """Register the schema so Hydra type-checks `conf/` and every override against it.

    `config_schema` is the first entry of `conf/config.yaml`'s defaults list; the group presets
    merge into its typed nodes, so they are checked too. Calling this twice is harmless (the
    store just replaces the entry).
    """
    ConfigStore.instance().store(name="config_schema", node=Config)
