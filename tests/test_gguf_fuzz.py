"""Fuzzing the GGUF reading path (reader, hyperparameters, stage loader) with hypothesis.

Each example damages a tiny random-weight file (ggufgen's) and loads it. The only acceptable
outcomes are a `ModelFileError` that names the file, or the undamaged model: either the same
hyperparameters and the same tensor index (everything the loader reads), or else a whole
model whose logits are bit-identical to the undamaged file's (the damage hit something the
model does not use, such as `general.name` or alignment padding). Anything else - another
exception type, a hang, a runaway allocation, different logits - is a failure.

Truncation may cut anywhere. Bit flips hit the header: the fixed fields, key names, value
types and lengths, integer and string values, and every tensor info (name, dims, shape, type,
offset). They leave out the payload of floating-point values (norm epsilon, rope base) and the
tensor data: GGUF has no checksum, so a flipped bit there is a different but valid model file
that no reader can tell apart from the intended one.
"""

from __future__ import annotations

import itertools
import os
import resource
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import pytest
from ggufgen import TinySpec, write_tiny_gguf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stage_runner import full_logits, whole

from ppinfer.errors import ModelFileError
from ppinfer.families import HParams, read_hparams
from ppinfer.gguf import GGUFFile, TensorInfo

SPEC = TinySpec("llama", n_layer=2, n_embd=32, n_head=2, n_head_kv=1, head_dim=16, n_ff=32, n_vocab=64, seed=31)
IDS = np.array([[3, 17, 42, 8, 63, 0]], dtype=np.int64)
HANG_LIMIT_S = 10
"""A single load of this ~40 kB file takes milliseconds; this long means a hang."""
MEMORY_LIMIT_BYTES = 1 << 30
"""Loading it needs a few MB; a gigabyte more means a corrupt size was believed."""

FLOAT_TYPES = (gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.FLOAT64)
_COUNTER = itertools.count()


class Hang(Exception):
    """Raised by the alarm when loading one damaged file takes too long."""


@contextmanager
def guarded(seconds: int, extra_bytes: int) -> Iterator[None]:
    """Run the block with a time limit (`Hang` after `seconds`: the reader is pure Python, so
    the alarm's exception reaches any loop it could be stuck in) and an address-space limit of
    `extra_bytes` above the current size, so that a corrupt size asking for gigabytes fails
    with MemoryError in this test instead of bringing the machine down."""

    def on_alarm(signum: int, frame: object) -> None:
        # Python drops an exception raised inside a gc callback; ask again in a second.
        signal.alarm(1)
        raise Hang(f"loading took more than {seconds} s")

    page = os.sysconf("SC_PAGE_SIZE")
    current = int(Path("/proc/self/statm").read_text().split()[0]) * page
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    previous = signal.signal(signal.SIGALRM, on_alarm)
    resource.setrlimit(resource.RLIMIT_AS, (current + extra_bytes, hard))
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.signal(signal.SIGALRM, previous)


def header_bytes_to_flip(path: Path) -> list[int]:
    """Offsets of the header bytes a flip may hit, mapped with gguf-py's own reader (an
    independent parser): everything before the tensor data except floating-point values."""
    reader = gguf.GGUFReader(path)
    base = reader.data.ctypes.data
    excluded: set[int] = set()
    for kv in reader.fields.values():
        if kv.types and kv.types[-1] in FLOAT_TYPES:
            for index in kv.data:
                part = kv.parts[index]
                start = part.ctypes.data - base
                excluded.update(range(start, start + part.nbytes))
    return [i for i in range(reader.data_offset) if i not in excluded]


@dataclass(frozen=True)
class Original:
    """The undamaged file and what loading it gives."""

    raw: bytes = field(repr=False)
    logits: np.ndarray = field(repr=False)  # [1, T, V]
    hparams: HParams = field(repr=False)
    tensors: dict[str, TensorInfo] = field(repr=False)
    flippable: list[int] = field(repr=False)
    folder: Path


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Original:
    folder = tmp_path_factory.mktemp("fuzz")
    path = write_tiny_gguf(folder / "original.gguf", SPEC)
    gf = GGUFFile(path)
    return Original(
        raw=path.read_bytes(), logits=full_logits(whole(path, SPEC.n_layer), IDS),
        hparams=read_hparams(gf), tensors=dict(gf.tensors),
        flippable=header_bytes_to_flip(path), folder=folder,
    )


def check_damaged(data: bytes, original: Original) -> None:
    """Load `data` as a model: a clean ModelFileError naming the file, or the same model."""
    # A fresh name each time: a stage keeps its file memory-mapped, and rewriting a mapped
    # file in place would pull the bytes out from under it.
    path = original.folder / f"damaged-{next(_COUNTER)}.gguf"
    path.write_bytes(data)
    try:
        with guarded(HANG_LIMIT_S, MEMORY_LIMIT_BYTES):
            try:
                gf = GGUFFile(path)
                if read_hparams(gf) == original.hparams and gf.tensors == original.tensors:
                    # Same hyperparameters and the same tensors at the same places: the
                    # loader reads nothing else, so this is the undamaged model.
                    return
                logits = full_logits(whole(path, SPEC.n_layer), IDS)
            except ModelFileError as exc:
                assert str(path) in str(exc), f"the error does not name the file: {exc}"
                return
        assert np.array_equal(logits, original.logits), "a damaged file loaded as a different model"
    finally:
        path.unlink()


FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(data=st.data())
def test_truncated_file(original: Original, data: st.DataObject) -> None:
    keep = data.draw(st.integers(min_value=0, max_value=len(original.raw) - 1), label="bytes kept")
    check_damaged(original.raw[:keep], original)


@FUZZ
@given(data=st.data())
def test_bit_flips_in_header(original: Original, data: st.DataObject) -> None:
    flips = data.draw(
        st.lists(st.tuples(st.sampled_from(original.flippable), st.integers(0, 7)), min_size=1, max_size=3),
        label="(byte, bit) flips",
    )
    damaged = bytearray(original.raw)
    for offset, bit in flips:
        damaged[offset] ^= 1 << bit
    check_damaged(bytes(damaged), original)


@pytest.mark.slow
def test_every_header_byte_once(original: Original) -> None:
    """Systematic sweep: one flip in every flippable header byte (bit = offset mod 8)."""
    for offset in original.flippable:
        damaged = bytearray(original.raw)
        damaged[offset] ^= 1 << (offset % 8)
        check_damaged(bytes(damaged), original)
