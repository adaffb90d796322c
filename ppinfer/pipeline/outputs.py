"""Result files in `output.dir`, written by one rank: results.jsonl (appended in prompt order
as sequences complete, one whole line each), logits.npy, metrics.json (atomic)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = "results.jsonl"
LOGITS = "logits.npy"
METRICS = "metrics.json"


class ResultsWriter:
    """Appends one JSON line per sequence, in prompt order: a result that completes early
    waits until every earlier prompt's line has been written."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / RESULTS
        self.path.write_text("")  # a run starts its own results
        self._next = 0
        self._ready: dict[int, dict[str, Any]] = {}

    def add(self, index: int, record: dict[str, Any]) -> list[dict[str, Any]]:
        """Record sequence `index`; returns the records written now (in order)."""
        self._ready[index] = record
        written = []
        with open(self.path, "a", encoding="utf-8") as fh:
            while self._next in self._ready:
                rec = self._ready.pop(self._next)
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                written.append(rec)
                self._next += 1
            fh.flush()
            os.fsync(fh.fileno())
        return written


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write to a temporary file in the same directory, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


def write_logits(out_dir: Path, logits: np.ndarray) -> Path:
    """float32 [T, vocab]."""
    path = out_dir / LOGITS
    np.save(path, logits.astype(np.float32, copy=False))
    return path
