"""``ppinfer-fetch`` / ``python -m ppinfer.hub``: fetch the models ppinfer knows by name and
print their paths (stdout carries only the paths; progress goes to stderr)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ppinfer.errors import PPInferError
from ppinfer.hub.catalog import DEFAULT_MODEL, KNOWN_MODELS
from ppinfer.hub.fetch import cached_path, ensure_model


def main(argv: Sequence[str] | None = None) -> int:
    """Fetch the named models (the default one when none is named); the exit code."""
    parser = argparse.ArgumentParser(
        prog="ppinfer-fetch", description="Fetch the models ppinfer knows by name."
    )
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"model names (default: {DEFAULT_MODEL})"
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="cache directory")
    parser.add_argument("--list", action="store_true", help="list known models and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    args = parser.parse_args(argv)

    if args.list:
        for name in KNOWN_MODELS:
            path = cached_path(name, args.cache_dir)
            state = "cached" if path.is_file() else "not cached"
            default = " (default)" if name == DEFAULT_MODEL else ""
            print(f"{name}{default}\t{state}\t{path}")
        return 0
    for name in args.names or [DEFAULT_MODEL]:
        try:
            path = ensure_model(name, args.cache_dir, progress=not args.quiet)
        except PPInferError as exc:
            print(f"ppinfer-fetch: {exc}", file=sys.stderr)
            return 1
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
