"""Builds ppinfer's CPU block kernels (csrc/*.cpp, a C++ torch extension) and loads them.

The library is compiled once per machine into a cache directory keyed by everything the
binary depends on (torch and Python versions, CPU architecture, compiler flags, source text):
`$XDG_CACHE_HOME/ppinfer/kernels/<key>` (`~/.cache/...` by default). It is loaded once per
process. Processes that start together (torchrun ranks) serialize on a file lock, so one
builds and the others load its result; the lock is released if its holder dies, unlike the
lock file torch's own build leaves behind when it is killed.

Where the kernels cannot be built (no compiler, no ninja, a compile error),
`unavailable_reason()` says why in one line, so the caller can fall back to dequantized
weights with a notice instead of failing.

`python -m ppinfer.kernels.build` builds now (`make install` runs it) and prints the result.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

NAME = "ppinfer_kernels"
CSRC = Path(__file__).resolve().parent / "csrc"
# No -march/-mavx2: the AVX2 and AVX-512 functions carry their own target attributes, so the
# library loads on any CPU of the architecture and runs each only where the CPU has it. No FMA
# contraction, so dequantization rounds like gguf-py. No -std: torch's own (C++17 or later, as
# its headers need). Where torch's intra-op threads are OpenMP's, at::parallel_for is an `omp
# parallel` region compiled into this library, so it needs -fopenmp (the runtime it links is
# the libgomp.so.1 torch has already loaded).
# On Linux the C++ runtime is named by its soname: where the compiler finds no libstdc++.so
# (only the static archive), g++ would otherwise copy a second runtime into the library, whose
# uninitialized locale facets crash the first error message that formats a number.
OPENMP = "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()
CFLAGS = ("-O3", "-ffp-contract=off") + (("-fopenmp",) if OPENMP else ())
LDFLAGS = (("-l:libstdc++.so.6",) if sys.platform.startswith("linux") else ()) + (("-fopenmp",) if OPENMP else ())
_BUILT = "built"  # marker file naming the library, written once a build has succeeded


@dataclass(frozen=True)
class KernelLibrary:
    path: Path | None  # the loaded shared library, or None
    reason: str | None  # why it is unavailable, one line; None when loaded


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ppinfer" / "kernels"


def _inputs() -> list[Path]:
    return sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.h"))


def build_key() -> str:
    """Names the build directory: changes whenever the library would compile differently."""
    digest = hashlib.sha256()
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    for part in (torch.__version__, python, platform.machine(), " ".join(CFLAGS + LDFLAGS)):
        digest.update(part.encode() + b"\0")
    for path in _inputs():
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return f"torch-{torch.__version__}-py{python}-{digest.hexdigest()[:16]}"


def build_dir() -> Path:
    return cache_root() / build_key()


def _toolchain_problem() -> str | None:
    """Why the sources cannot be compiled here, or None."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler: '{compiler}' is not on PATH (install g++, or set CXX)"
    if shutil.which("ninja") is None:
        try:
            import ninja  # the PyPI package ships the binary; its directory may not be on PATH
        except ImportError:
            return "ninja is not installed (pip install ninja)"
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    return None


def _compile(directory: Path) -> Path:
    """Compiles and loads the library in `directory` (the caller holds the build lock)."""
    from torch.utils import cpp_extension

    # The lock is ours, so a baton file of torch's here was left by a build that was killed.
    (directory / "lock").unlink(missing_ok=True)
    library = cpp_extension.load(
        name=NAME,
        sources=[str(p) for p in sorted(CSRC.glob("*.cpp"))],
        extra_cflags=list(CFLAGS),
        extra_ldflags=list(LDFLAGS),
        build_directory=str(directory),
        is_python_module=False,
        verbose=False,
    )
    return Path(library)


def _failure(err: Exception, directory: Path) -> str:
    """One line for a failed build or load: the first compiler error, where to look again."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    diagnostics = [line for line in lines if ": error:" in line or ": fatal error:" in line]
    detail = (diagnostics or lines or [type(err).__name__])[0]
    return f"building the CPU block kernels failed: {detail} (build files: {directory})"


@functools.cache
def library() -> KernelLibrary:
    """Builds the kernels if this machine has no build of these sources yet, and loads them
    into this process (once)."""
    directory = build_dir()
    marker = directory / _BUILT
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with FileLock(str(directory / "build.lock")):
            if marker.exists():
                path = directory / marker.read_text().strip()
                torch.ops.load_library(str(path))
                return KernelLibrary(path, None)
            problem = _toolchain_problem()
            if problem is not None:
                return KernelLibrary(None, problem)
            path = _compile(directory)
            marker.write_text(path.name)
            return KernelLibrary(path, None)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as err:
        return KernelLibrary(None, _failure(err, directory))


def unavailable_reason() -> str | None:
    """Why the CPU block kernels cannot run in this process (one line), or None."""
    return library().reason


def ops():
    """The loaded ops (torch.ops.ppinfer_kernels); RuntimeError with the reason if unavailable."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    return torch.ops.ppinfer_kernels


def isa() -> str:
    """The instruction set the dots run with now: "avx512vnni", "avxvnni", "avx2" or "scalar"."""
    return ops().isa()


def set_isa(name: str) -> None:
    """"auto": the best this CPU runs (AVX-512 VNNI, else AVX-VNNI, else AVX2 with FMA and F16C);
    a named one it runs ("avx512vnni", "avxvnni", "avx2"); "scalar": the portable C++ dots."""
    ops().set_isa(name)


def main() -> int:
    reason = unavailable_reason()
    if reason is not None:
        print(f"ppinfer CPU block kernels unavailable: {reason}; quantized weights will be dequantized")
        return 1
    print(f"ppinfer CPU block kernels: {isa()} ({library().path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
