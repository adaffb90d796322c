"""`output.dir`: checked before a run, then held by the one rank that writes it (the last).

That rank claims the directory before any result exists (`OutputDir.claim`): it creates it,
takes an exclusive `flock` on `output.dir/.lock` for the whole run (so a second run into the
same directory is refused instead of interleaving with this one; the OS drops the lock when
the process ends, however it ends, so there is never a stale lock to remove by hand) and
removes the files an earlier run left there, so that every file in the directory belongs to
this run. Then, as the run goes: results.jsonl (appended in prompt order as sequences
complete, whole lines only), logits.npy and metrics.json (each written whole, then renamed
into place). Every file is created with mode 0666 less the umask.

A write that fails (a full disk, a lost mount) raises `OutputDirError`, one line naming
`output.dir` and the file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

from ppinfer.errors import PPInferError

log = logging.getLogger("ppinfer")

RESULTS = "results.jsonl"
LOGITS = "logits.npy"
METRICS = "metrics.json"
TIMELINE = "timeline.png"
LOCK = ".lock"
RUN_FILES = (RESULTS, LOGITS, METRICS, TIMELINE)
"""What a run writes directly in `output.dir`."""
TEMP_FILES = (f".{METRICS}.*.tmp", f".{LOGITS}.*.tmp")
"""Files being written (see `_write_atomic`), left behind by a run that was killed."""
PROFILE_FILES = ("tensorboard/rank*.pt.trace.json*", "tensorboard/rank*/events.out.tfevents.*")
"""What a profiled run writes in the default `profile.dir` (see `ppinfer.profiling.tensorboard`)."""
FILE_MODE = 0o666
"""Mode of every output file before the umask (what `open(path, "w")` uses)."""


class OutputDirError(PPInferError):
    """`output.dir` cannot be created, locked or written (names output.dir)."""


def output_dir_problem(path: Path) -> str | None:
    """Why `output.dir` cannot be created or written (None when it can), without creating it:
    found on every rank before any of them starts working."""
    probe = path.absolute()
    try:
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        is_dir = probe.is_dir()
    except OSError as exc:  # e.g. a name longer than the file system allows
        return f"output.dir={path}: cannot create it ({exc.strerror or exc})"
    if not is_dir:
        return f"output.dir={path}: {probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"output.dir={path}: {probe} is not writable"
    return None


def make_output_dir(path: Path) -> str | None:
    """Create `output.dir` (and its parents); why it cannot be, in one line, else None. Also
    catches what `os.access` cannot tell, e.g. root under /proc or a read-only mount."""
    problem = output_dir_problem(path)
    if problem is not None:
        return problem
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"output.dir={path}: cannot create it ({exc.strerror or exc})"
    return None


def write_problem(out_dir: Path, name: str, exc: OSError) -> str:
    """One line for a failed write of file `name` in `out_dir`."""
    if exc.errno == errno.ENOSPC:
        return f"output.dir={out_dir}: no space left on device (writing {name})"
    if exc.errno == errno.EDQUOT:
        return f"output.dir={out_dir}: no space left in the disk quota (writing {name})"
    return f"output.dir={out_dir}: cannot write {name} ({exc.strerror or exc})"


@contextmanager
def writing(out_dir: Path, name: str) -> Iterator[None]:
    """Raise an `OSError` of the block as `OutputDirError` naming `out_dir` and `name`."""
    try:
        yield
    except OSError as exc:
        raise OutputDirError(write_problem(out_dir, name, exc)) from exc


class OutputDir:
    """The writing rank's hold on `output.dir` for one run (see the module docstring)."""

    def __init__(self, path: Path, lock: IO[str]) -> None:
        self.path = path
        self._lock = lock

    @classmethod
    def claim(cls, path: Path) -> OutputDir:
        """Create `path`, lock it and clear an earlier run's files; `OutputDirError` when
        another run holds it or it cannot be used."""
        problem = make_output_dir(path)
        if problem is not None:
            raise OutputDirError(problem)
        with writing(path, LOCK):
            lock = open(path / LOCK, "a+", encoding="utf-8")  # noqa: SIM115  (held for the run)
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(lock)
            lock.close()
            raise OutputDirError(
                f"output.dir={path}: in use by another run{holder}; wait for it to end or choose another output.dir"
            ) from None
        except OSError as exc:
            lock.close()
            raise OutputDirError(f"output.dir={path}: cannot lock {LOCK} ({exc.strerror or exc})") from exc
        claimed = cls(path, lock)
        try:
            claimed._note_holder()
            claimed._clear_previous()
        except BaseException:
            claimed.release()
            raise
        return claimed

    def release(self) -> None:
        """Drop the lock (the process ending does the same)."""
        self._lock.close()

    def _note_holder(self) -> None:
        """Say in the lock file who holds it, for the message of a refused run."""
        with writing(self.path, LOCK):
            self._lock.seek(0)
            self._lock.truncate()
            self._lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            self._lock.flush()

    def _clear_previous(self) -> None:
        old = [self.path / name for name in RUN_FILES if (self.path / name).exists()]
        old += [p for pattern in (*TEMP_FILES, *PROFILE_FILES) for p in self.path.glob(pattern)]
        for path in old:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                raise OutputDirError(
                    f"output.dir={self.path}: cannot remove {path.name} of an earlier run ({exc.strerror or exc})"
                ) from exc
        if old:
            names = [str(p.relative_to(self.path)) for p in old]
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            log.info("output.dir: removed %d file(s) of an earlier run from %s (%s)", len(old), self.path, shown)


def _read_holder(lock: IO[str]) -> str:
    """` (pid N on HOST)` from a held lock file, or '' when it says nothing yet."""
    lock.seek(0)
    text = lock.read().strip()
    return f" ({text})" if text else ""


class ResultsWriter:
    """Appends one JSON line per sequence, in prompt order: a result that completes early
    waits until every earlier prompt's line has been written. The file holds whole lines
    only: a write that fails partway (a full disk, an interrupt) is cut back to the last
    whole line before the error goes on."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.path = out_dir / RESULTS
        with writing(out_dir, RESULTS):
            self.path.write_text("")  # a run starts its own results
        self._size = 0  # bytes of whole lines on disk
        self._next = 0
        self._ready: dict[int, dict[str, Any]] = {}

    def add(self, index: int, record: dict[str, Any]) -> list[dict[str, Any]]:
        """Record sequence `index`; returns the records written now (in order)."""
        self._ready[index] = record
        end = self._next
        while end in self._ready:
            end += 1
        written = [self._ready[i] for i in range(self._next, end)]
        if written:
            data = "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in written)
            with writing(self.out_dir, RESULTS):
                self._append(data.encode("utf-8"))
            for i in range(self._next, end):
                del self._ready[i]
            self._next = end
        return written

    def _append(self, data: bytes) -> None:
        try:
            with open(self.path, "ab") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            self._cut_to_whole_lines(data)
            raise
        self._size += len(data)

    def _cut_to_whole_lines(self, data: bytes) -> None:
        """After a failed append of `data`: keep the lines of it that reached the file whole
        (all of them when the failure came after the write), cut off a part line."""
        landed = os.path.getsize(self.path) - self._size  # how much of `data` is on disk
        whole = data.rfind(b"\n", 0, landed) + 1  # the end of its last whole line there (0: none)
        os.truncate(self.path, self._size + whole)
        self._size += whole


def _write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write `path` whole or not at all: into a temporary file beside it (created with the
    umask applied, like any other output), then renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """`data` as indented JSON, written atomically."""
    text = json.dumps(data, indent=2) + "\n"
    _write_atomic(path, lambda fh: fh.write(text.encode("utf-8")))


def write_logits(out_dir: Path, logits: np.ndarray) -> Path:
    """float32 [T, vocab], written atomically."""
    path = out_dir / LOGITS
    _write_atomic(path, lambda fh: np.save(fh, logits.astype(np.float32, copy=False)))
    return path
